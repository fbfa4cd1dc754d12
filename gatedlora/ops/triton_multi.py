"""The triton backend of the multi-adapter op: one launch per call covers every adapter.

Kernel, launch plan and launcher in one file (vLLM's ``lora/ops`` layout). Per row m with
``i = adapter_index[m]`` in [0, A)::

    out[m] += scaling[i] * (x[m] @ A_i.T) @ B_i.T        (rows with any other index: not read, not written)

Grid ``(cdiv(M, BLOCK_M), A, n_split)``: program ``(b, i, j)`` owns the rows of block b whose index is i
(grouped by adapter, as SGMV does, with the grouping done by masks instead of a sort) and the N tiles
``j, j + n_split, ...``. It first loads its block's BLOCK_M indices; when none is i it returns, so an
adapter that no row of a block takes costs one small load. Otherwise it reads adapter i's weights
through the pointer table (``multi_weights.pointer_table``: A and B pointers, rank, row strides; no
stacked copy, any rank up to ``MAX_RANK``), computes the rank-r product of its rows in one K loop and adds
``B_i`` times it into them. Rows of other adapters and base rows are masked out of every load and store,
so a base row stays bitwise its base output. Nothing is read on the host: the index, the table and the
scalings stay on the device, and a call whose table is current can be captured in a CUDA graph.

Tiles: those of the one-adapter kernel (``triton_backend.TILE_CONFIGS``, chosen by its byte model for
the largest rank) but where they spill here (``TILE_OVERRIDES``), all compiled for sm_80 and sm_90 by
tools/aot_check.py. Per active (block, adapter)
pair the program moves what the one-adapter kernel's program moves for that adapter; the byte model
does not count the pairs that exit early.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .backends import m_bucket, register_multi
from .contract import ceil_div, kernel_reasons, staged_output, unit_inner_stride
from .multi_args import MultiLoraArgs
from .multi_weights import pointer_table
from .triton_backend import (TILE_CONFIGS, TileConfig, _num_sms_for, block_r_for, choose_launch, dot_precision,
                             device_reasons, has_one_pass_tile)

MAX_GRID_ADAPTERS = 65535  # CUDA's limit on grid dimension y

# Where the one-adapter kernel's tile spills in this kernel (tools/aot_check.py, sm_80: fp16 x with fp32 LoRA
# weights and TF32, 16 x 64 x 32 tiles at BLOCK_R = 32 spilled 16 bytes; the pointers, rank and strides read
# from the table take registers the one-adapter kernel keeps in its parameters), the tile this kernel uses.
# (Loading the rank and strides as 32-bit ints instead spilled in six other variants on sm_90.)
TILE_OVERRIDES = {(32, 4): TileConfig(16, 32, 32, 32, 4, 3)}  # (BLOCK_R, LoRA element size)


def multi_tile(tiles: TileConfig, lora_element_size: int) -> TileConfig:
    """The tile this kernel runs where the one-adapter heuristic chose ``tiles``."""
    return TILE_OVERRIDES.get((tiles.block_r, lora_element_size), tiles)


def multi_tiles() -> dict[tuple[int, int], TileConfig]:
    """Every tile config this kernel can run, by (BLOCK_R, LoRA element size): tools/aot_check.py."""
    return {key: TILE_OVERRIDES.get(key, tiles) for key, tiles in TILE_CONFIGS.items()}


@triton.jit(do_not_specialize=["M"])
def gated_lora_multi_add_kernel(
    x_ptr, out_ptr, index_ptr, table_ptr, scaling_ptr, lora_ptr,
    M, N, K,
    stride_xm, stride_om, stride_index, stride_table,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, :] += scaling[i] * (x[m] A_i^T) B_i^T for the rows m of this block with index[m] == i, i = program 1.

    x [M, K] and out [M, N] with unit stride along their last dim; index [M] int64; table int64
    [5, stride_table] (rows: A_i pointer, B_i pointer, r_i, A_i row stride, B_i row stride); scaling [A]
    fp32; lora_ptr: any adapter weight, for its element type. BLOCK_R >= every r_i, a power of two >= 16.
    """
    pid_m = tl.program_id(0)
    adapter = tl.program_id(1)
    pid_n = tl.program_id(2)
    n_split = tl.num_programs(2)
    lora_ty = lora_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = offs_m < M
    rows64 = offs_m.to(tl.int64)  # M * K can pass 2^31 elements at prefill sizes
    index = tl.load(index_ptr + rows64 * stride_index, mask=row_in, other=-1)
    mine = (index == adapter) & row_in
    # Decided before touching x or any weight: a block with no row of this adapter costs BLOCK_M indices.
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return

    a_ptr = tl.load(table_ptr + adapter).to(tl.pointer_type(lora_ty))
    b_ptr = tl.load(table_ptr + stride_table + adapter).to(tl.pointer_type(lora_ty))
    rank = tl.load(table_ptr + 2 * stride_table + adapter)
    stride_ar = tl.load(table_ptr + 3 * stride_table + adapter)
    stride_bn = tl.load(table_ptr + 4 * stride_table + adapter)
    scaling = tl.load(scaling_ptr + adapter)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < rank

    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + offs_k[None, :], mask=mine[:, None] & k_in[None, :],
                    other=0.0)
        a = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None], mask=k_in[:, None] & r_in[None, :],
                    other=0.0)
        # PEFT casts x to the LoRA dtype before lora_A.
        xa = tl.dot(x.to(lora_ty), a, xa, input_precision=DOT_PRECISION)

    # PEFT's lora_A output is a tensor in the LoRA dtype: round the rank-r product the same way.
    xa_l = xa.to(lora_ty)
    for n0 in range(pid_n * BLOCK_N, N, n_split * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        b = tl.load(b_ptr + offs_r[:, None] + offs_n[None, :] * stride_bn, mask=r_in[:, None] & n_in[None, :],
                    other=0.0)
        delta = tl.dot(xa_l, b, input_precision=DOT_PRECISION)
        o_ptrs = out_ptr + rows64[:, None] * stride_om + offs_n[None, :]
        # Rows of other adapters and base rows are neither read nor written.
        o_mask = mine[:, None] & n_in[None, :]
        base = tl.load(o_ptrs, mask=o_mask, other=0.0)
        y = base.to(tl.float32) + delta * scaling
        tl.store(o_ptrs, y.to(out_ty), mask=o_mask)


def _as_int64(index: torch.Tensor) -> torch.Tensor:
    # One compiled variant for every index dtype (tools/aot_check.py compiles each variant); the patched
    # layers pass int64 already (the torch backend indexes with it), an int32 index costs one small cast
    # kernel (no sync).
    return index if index.dtype == torch.int64 else index.to(torch.int64)


def launch_plan(out: torch.Tensor, args: MultiLoraArgs, tiles: TileConfig,
                n_split: int) -> tuple[tuple[int, int, int], tuple, dict]:
    """(grid, positional args, keyword args) of the launch that adds into ``out`` [M, N] (unit stride along N).

    tools/aot_check.py compiles from these same plans, so what it checks is what is launched."""
    if tiles.block_r < args.r_max:
        raise ValueError(f"gated_lora_multi (triton): BLOCK_R={tiles.block_r} is smaller than the largest rank "
                         f"{args.r_max}")
    x = unit_inner_stride(args.x)
    table, scaling = pointer_table(args)
    index = _as_int64(args.adapter_index)
    n_split = max(1, min(n_split, ceil_div(args.n, tiles.block_n)))
    grid = (ceil_div(args.m, tiles.block_m), args.adapters, n_split)
    positional = (x, out, index, table, scaling, args.lora_a[0], args.m, args.n, args.k,
                  x.stride(0), out.stride(0), index.stride(0), table.stride(0))
    keywords = dict(DOT_PRECISION=dot_precision(args.x.dtype, args.lora_dtype), BLOCK_M=tiles.block_m,
                    BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=tiles.block_r, num_warps=tiles.num_warps,
                    num_stages=tiles.num_stages)
    return grid, positional, keywords


def launch(out: torch.Tensor, args: MultiLoraArgs, tiles: TileConfig, n_split: int) -> None:
    """Add every row's adapter term into ``out`` [M, N] in place: one kernel launch for all adapters."""
    target = staged_output(out)
    grid, positional, keywords = launch_plan(target, args, tiles, n_split)
    gated_lora_multi_add_kernel[grid](*positional, **keywords)
    if target is not out:
        out.copy_(target)


def multi_reasons(args: MultiLoraArgs) -> list[str]:
    """Why the kernel cannot run ``args`` (empty: it can); depends only on the dispatch key."""
    reasons = kernel_reasons(args.x.dtype, args.lora_dtype, args.r_max)
    lora_size = args.lora_a[0].element_size()
    if not reasons and not has_one_pass_tile(args.r_max, lora_size):
        reasons.append(f"no tile for BLOCK_R={block_r_for(args.r_max)} with {args.lora_dtype} LoRA weights (each one "
                       "tried spilled registers; the one-adapter op runs its two-pass path there)")
    reasons += device_reasons(args.x.device, args.x.dtype, args.lora_dtype)
    if args.adapters > MAX_GRID_ADAPTERS:
        reasons.append(f"{args.adapters} adapters exceed the grid's {MAX_GRID_ADAPTERS}")
    return reasons


def multi_launcher(args: MultiLoraArgs):
    """The launch for this configuration: tiles and N split from the one-adapter byte model at the largest rank."""
    lora_size = args.lora_a[0].element_size()
    tiles, n_split = choose_launch(m_bucket(args.m), args.n, args.k, args.r_max, args.x.element_size(), lora_size,
                                   _num_sms_for(args.x.device))
    return functools.partial(launch, tiles=multi_tile(tiles, lora_size), n_split=n_split)


register_multi("triton", multi_reasons, multi_launcher)
