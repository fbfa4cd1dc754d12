"""The triton backend: the kernel contract's reasons, and two launch paths chosen per configuration.

* From ``TWO_PASS_FROM_ROWS`` rows (every M, since an H100 measured it faster wherever a row is open):
  ``shrink_kernel`` then ``expand_kernel`` (triton_two_pass.py).
* Below it (no M at present), where a 16-row one-pass tile fits (not fp32 LoRA weights of rank above 64):
  one launch of ``gated_lora_add_kernel`` (triton_kernel.py), 16-row tiles, ``n_split`` programs along N;
  the layer benchmark times it beside the two passes.

Nothing here synchronises with the device: the gate is decided inside the kernels, ``gate_bias``
is passed by pointer, and every launch parameter comes from shapes, strides and dtypes. A call can
therefore be captured in a CUDA graph (after a first call has compiled it). The heuristic runs once
per configuration: the dispatcher caches the launch function built on its result.

Choosing ``n_split`` for the one-pass kernel (docs/design.md, "Numbers to design against")
------------------------------------------------------------------------------------------
The adapter term is memory bound at every shape of interest (r <= 128: at most 2*r FLOPs per
byte of x), so the heuristic compares bytes. With ``e_x``, ``e_l`` the element sizes of x and
the LoRA weights, ``rows = min(M, BLOCK_M)`` and ``S = n_split``, one program moves

    fixed = rows*K*e_x + r*K*e_l              x rows and A, re-read by each of the S programs
    share = (r*N*e_l + 2*rows*N*e_x) / S      its part of B and of the read+write of the output

and the whole grid (``blocks * S`` programs, ``blocks = cdiv(M, BLOCK_M)``) moves
``blocks * (S*fixed + S*share)`` bytes through L2, of which only x, A, B and the output are unique
(HBM). The time estimate is the largest of three bounds: waves * bytes-per-program / per-SM
bandwidth (latency of one program), L2 bytes / L2 bandwidth, unique bytes / HBM bandwidth. The
heuristic takes the S with the smallest estimate. The bandwidths are H100 SXM datasheet figures
(3.35 TB/s HBM3; about 5.5 TB/s L2; 64 B/clock/SM at 1.75 GHz = 112 GB/s per SM); they rank
choices, they do not predict times (an H100 measured 2.96 TB/s for a copy).

Worked example (bf16, r = 16, K = N = 4096, Llama-3-8B q_proj, M = 1; estimates from
``_estimate_seconds``): a program reads fixed = 8 KiB (x) + 128 KiB (A) and share = (128 KiB (B) +
16 KiB (out)) / S. Estimates for S = 1, 2, 4, ..., 64: 2.56, 1.90, 1.57, 1.41, 1.33, 1.28, 1.65 us.
S = 32 wins: one wave, 140 KiB a program; at S = 64 the 64 copies of A read through L2 (8.8 MB) cost
more than the shorter B share saves. Measured on an H100 (bf16 adapters, graph replays): 8.6 us, so the
per-program A read dominates more than the model says; the two-pass path splits that read over K.

The tiles (``TILE_CONFIGS`` for the one-pass kernel, ``two_pass_tiles`` for the two passes) are all
compiled for sm_80 and sm_90 by tools/aot_check.py, which fails on a spill or on shared memory over
the target's limit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import triton_kernel
from .args import GatedLoraArgs
from .backends import Backend, Launch, m_bucket, register_backend
from .contract import GateKind, ceil_div, kernel_reasons, staged_output, unit_inner_stride

# H100 SXM datasheet bandwidths in bytes/s (see the module docstring): the byte model's relative costs, not timings.
HBM_BANDWIDTH = 3.35e12
L2_BANDWIDTH = 5.5e12
SM_BANDWIDTH = 112e9
DEFAULT_NUM_SMS = 132  # used when there is no CUDA device to ask (interpreter)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one compiled variant of the kernel."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


def _tile_table() -> dict[tuple[int, int], TileConfig]:
    """(BLOCK_R, LoRA element size) -> 16-row tiles of the one-pass kernel, as tools/aot_check.py checks them on
    sm_80/sm_90.

    Registers bound every choice (fp32 accumulators; 4 warps = 128 threads): the rank-r accumulator takes
    16*BLOCK_R/threads registers a thread, the B tile BLOCK_R*BLOCK_N/threads and the output tile
    16*BLOCK_N/threads. Where a first choice spilled (STACK > 0 in the cubin), BLOCK_K or BLOCK_N was halved:
    * fp32 LoRA weights (tf32/tf32x3/ieee dots) halve BLOCK_K, and BLOCK_N = 32 where BLOCK_R >= 64;
    * BLOCK_R = 128 takes BLOCK_K = 32 (64 spilled 96 bytes on sm_90);
    * fp32 LoRA weights with BLOCK_R = 128 have no tile: each one tried (BLOCK_N 16 or 32, 4 or 8 warps, 2 or 3
      stages) spilled 8 to 48 bytes on sm_80; those configurations run the two-pass path at every M.
    """
    half, single = 2, 4
    rows = [
        # block_r, elt, block_n, block_k, warps, stages
        (16, half, 64, 128, 4, 3), (32, half, 64, 128, 4, 3), (64, half, 64, 64, 4, 3), (128, half, 64, 32, 4, 3),
        (16, single, 64, 32, 4, 3), (32, single, 64, 32, 4, 3), (64, single, 32, 32, 4, 3),
    ]
    return {(br, elt): TileConfig(16, bn, bk, br, warps, stages) for br, elt, bn, bk, warps, stages in rows}


TILE_CONFIGS = _tile_table()


def block_r_for(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(rank))


def _estimate_seconds(m: int, n: int, k: int, r: int, e_x: int, e_l: int, block_m: int, block_n: int,
                      n_split: int, num_sms: int) -> float:
    rows = min(m, block_m)
    blocks = ceil_div(m, block_m)
    fixed = rows * k * e_x + r * k * e_l
    per_block = r * n * e_l + 2 * rows * n * e_x
    per_program = fixed + per_block / n_split
    waves = ceil_div(blocks * n_split, num_sms)
    l2_bytes = blocks * (n_split * fixed + per_block)
    hbm_bytes = m * k * e_x + r * k * e_l + r * n * e_l + 2 * m * n * e_x
    return max(waves * per_program / SM_BANDWIDTH, l2_bytes / L2_BANDWIDTH, hbm_bytes / HBM_BANDWIDTH)


@functools.lru_cache(maxsize=4096)
def choose_launch(m_key: int, n: int, k: int, r: int, e_x: int, e_l: int, num_sms: int) -> tuple[TileConfig, int]:
    """(tile config, n_split) of the one-pass kernel for an M bucket, N, K, rank and element sizes; see the
    module docstring. Only for configurations with a tile (``has_one_pass_tile``)."""
    tiles = TILE_CONFIGS[(block_r_for(r), e_l)]
    n_tiles = ceil_div(n, tiles.block_n)
    best, split = None, 1
    while True:
        t = _estimate_seconds(m_key, n, k, r, e_x, e_l, tiles.block_m, tiles.block_n, split, num_sms)
        if best is None or t < best[0] * (1 - 1e-9):  # strictly better only: ties keep the smaller split
            best = (t, split)
        if split >= n_tiles:
            break
        split = min(2 * split, n_tiles)
    return tiles, best[1]


def has_one_pass_tile(r: int, e_l: int) -> bool:
    """Whether the one-pass kernel has a tile for this rank and LoRA element size (see ``_tile_table``)."""
    return (block_r_for(r), e_l) in TILE_CONFIGS


def kernel_is_interpreted() -> bool:
    """True when Triton was in interpreter mode (TRITON_INTERPRET=1) as the kernel was defined."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton_kernel.gated_lora_add_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> str:
    """How ``tl.dot`` multiplies when the LoRA weights are fp32 (16-bit operands ignore it).

    TF32 where PyTorch's matmuls would use it (``allow_tf32``), as PEFT's F.linear would. Otherwise fp32 x
    keeps IEEE fp32 products, and 16-bit x (PEFT's fp32 adapters on a bf16/fp16 model, the common case)
    takes "tf32x3": three TF32 tensor-core products whose sum carries about 22 mantissa bits, where the
    16-bit output keeps 8 (bf16) or 11 (fp16). IEEE fp32 has no tensor-core path: on an H100 the
    one-pass kernel took about 91 us with fp32 adapters against 8.6 us with bf16 ones at M=1
    (benchmarks/results/gpu-notes.md)."""
    if lora_dtype != torch.float32:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee" if x_dtype == torch.float32 else "tf32x3"


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    # Gate inputs enter the kernel as fp32 so that one compiled variant serves every gate dtype
    # (tools/aot_check.py compiles each variant). fp32 inputs, the common case, are not copied;
    # others cost one small cast kernel (no sync).
    return t if t.dtype == torch.float32 else t.float()


def _num_sms_for(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS


def heuristic_launch(args: GatedLoraArgs) -> tuple[TileConfig, int]:
    """(tile config, n_split) for this configuration (the dispatcher caches the launch built on it)."""
    return choose_launch(m_bucket(args.m), args.n, args.k, args.r, args.x.element_size(), args.lora_a.element_size(),
                         _num_sms_for(args.x.device))


def _gate_pointers(args: GatedLoraArgs, x: torch.Tensor) -> tuple:
    """(gate, gate_weight, gate_bias, stride_g) as the kernels take them: fp32 tensors. Pointers a gate kind
    does not read still need a value; each kind fills them the same way every time so that it has one
    signature (and one compiled variant) per dtype pair."""
    if args.gate_kind is GateKind.TOKEN:
        gate_weight = _as_fp32(args.gate_weight).contiguous()
        return gate_weight, gate_weight, _as_fp32(args.gate_bias), 0
    if args.gate_kind is GateKind.GIVEN:
        gate = _as_fp32(args.gate)
        return gate, gate, gate, gate.stride(0)
    return x, x, x, 0


def launch_plan(out: torch.Tensor, args: GatedLoraArgs, tiles: TileConfig,
                n_split: int) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, positional args, keyword args) of the kernel launch that adds into ``out`` [M, N].

    ``out`` must have unit stride along N (``contract.staged_output``); M, N and K are at least 1.
    tools/aot_check.py compiles from these same plans, so what it checks is what is launched.
    """
    x, a, b = unit_inner_stride(args.x), unit_inner_stride(args.lora_a), unit_inner_stride(args.lora_b)
    if tiles.block_r < args.r:
        raise ValueError(f"gated_lora (triton): BLOCK_R={tiles.block_r} is smaller than the rank {args.r}")
    n_split = max(1, min(n_split, ceil_div(args.n, tiles.block_n)))
    kind = args.gate_kind
    gate, gate_weight, gate_bias, stride_g = _gate_pointers(args, x)
    grid = (ceil_div(args.m, tiles.block_m), n_split)
    positional = (
        x, a, b, out, gate, gate_weight, gate_bias,
        args.m, args.n, args.k, args.r,
        x.stride(0), a.stride(0), b.stride(0), out.stride(0), stride_g,
        float(args.scaling), float(args.threshold), int(args.hard),
    )
    keywords = dict(
        GATE_KIND=int(kind),
        DOT_PRECISION=dot_precision(x.dtype, a.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=tiles.block_r,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return grid, positional, keywords


def launch(out: torch.Tensor, args: GatedLoraArgs, tiles: TileConfig, n_split: int) -> None:
    """Add the gated LoRA term into ``out`` [M, N] in place: one kernel launch, no host sync.
    ``tiles``/``n_split`` as the heuristic gives them, or any entry of ``TILE_CONFIGS`` (tests)."""
    target = staged_output(out)
    grid, positional, keywords = launch_plan(target, args, tiles, n_split)
    triton_kernel.gated_lora_add_kernel[grid](*positional, **keywords)
    if target is not out:
        out.copy_(target)


# --- the two-pass path (triton_two_pass.py): shrink split over K, then a 2-D expand -----------------------

# Row counts (M buckets) from which the two-pass path runs: every M. The H100's layer stage (e758e95, q_proj
# K=N=4096, r=16, graph replays; benchmarks/results/gpu-notes.md) timed both paths side by side: with a row
# open at M=1 and 8 the two passes took 35 us against the one-pass kernel's 72 us with fp32 LoRA weights
# (PEFT's default on a bf16 model; base layer 15.5 us, PEFT 33-40 us) and 24 against 30.5 us with bf16
# ones; with every row closed they cost 1.6 us more (two early-exiting launches, 19.7 against 18.1 us).
# The one-pass kernel re-reads A in each of its N-tile programs; the shrink reads it once, split over K.
# The one-pass kernel stays for that side-by-side timing (the layer stage's "triton one-pass").
TWO_PASS_FROM_ROWS = 1


@dataclass(frozen=True)
class TwoPassTiles:
    """Tiles of the shrink (rows x K) and expand (rows x N) kernels; BLOCK_R pads the rank as in TileConfig."""

    shrink_m: int
    block_k: int
    shrink_warps: int
    shrink_stages: int
    expand_m: int
    block_n: int
    expand_warps: int
    block_r: int


def two_pass_tiles(m_key: int, r: int, e_l: int) -> TwoPassTiles:
    """Tiles for an M bucket, rank and LoRA element size.

    Shrink: 16-row tiles for decode sizes, 64-row ones above (fewer re-reads of A per row). Expand: 32-row
    tiles beyond decode sizes and 128 columns (64 from rank 64), the best of the tiles the H100 probe timed at
    M=512 and M=4096 (benchmarks/results/gpu-notes.md). 16-bit LoRA weights keep BLOCK_K = 128 up to rank
    32, then 64 and 32, as the one-pass kernel does. fp32 LoRA weights follow a search over BLOCK_M, BLOCK_K,
    BLOCK_N and warps per rank on sm_80 and sm_90 (the worst of every dot precision and gate kind, checked
    since by tools/aot_check.py): their shrink spilled from BLOCK_K = 64 (up to 3.6 KiB at rank 32), and at
    32 with 16-row tiles on sm_90 (8 B), so it takes BLOCK_K = 16 there and 32 with 64-row tiles up to rank
    32; their expand spilled with 64 columns from rank 64 (8 B to 3.2 KiB) and with 32-row tiles at rank 128,
    so from rank 64 it takes 32 columns and 8 warps (4 left an 8-byte stack frame on sm_90 with token gates on
    misaligned inputs), and 16-row tiles at rank 128."""
    block_r = block_r_for(r)
    small = m_key <= 16
    if e_l == 2:
        return TwoPassTiles(shrink_m=16 if small else 64, block_k=128 if block_r <= 32 else 64 if block_r <= 64 else 32,
                            shrink_warps=4 if small else 8, shrink_stages=3, expand_m=16 if small else 32,
                            block_n=128 if block_r <= 32 else 64, expand_warps=4, block_r=block_r)
    return TwoPassTiles(shrink_m=16 if small else 64, block_k=32 if not small and block_r <= 32 else 16,
                        shrink_warps=4 if small else 8, shrink_stages=3,
                        expand_m=16 if small or block_r == 128 else 32, block_n=128 if block_r <= 32 else 32,
                        expand_warps=8 if block_r >= 64 else 4, block_r=block_r)


def choose_split_k(m_key: int, k: int, tiles: TwoPassTiles, num_sms: int) -> int:
    """How many K shares the shrink splits into: enough programs for two per SM, each share at least one
    BLOCK_K. One token (M=1, K=4096) takes 32 shares of 128, so its 256 KiB of A is read once over 32 SMs
    instead of by every program."""
    programs_m = ceil_div(m_key, tiles.shrink_m)
    return max(1, min(ceil_div(k, tiles.block_k), ceil_div(2 * num_sms, programs_m)))


def two_pass_plan(out: torch.Tensor, args: GatedLoraArgs, tiles: TwoPassTiles, split_k: int) -> list[tuple]:
    """[(kernel, grid, positional args, keyword args)] for the shrink and the expand launch into ``out``.

    Scratch [split_k, M, BLOCK_R] (and [split_k, M] for token-gate logits) in fp32 is allocated here,
    from PyTorch's caching allocator (inside a CUDA-graph capture: the graph's pool). tools/aot_check.py
    compiles from these plans."""
    from . import triton_two_pass

    x, a, b = unit_inner_stride(args.x), unit_inner_stride(args.lora_a), unit_inner_stride(args.lora_b)
    if tiles.block_r < args.r:
        raise ValueError(f"gated_lora (triton): BLOCK_R={tiles.block_r} is smaller than the rank {args.r}")
    m, k = args.m, args.k
    k_per_split = ceil_div(ceil_div(k, split_k), tiles.block_k) * tiles.block_k
    split_k = ceil_div(k, k_per_split)
    kind = args.gate_kind
    gate, gate_weight, gate_bias, stride_g = _gate_pointers(args, x)
    xa = torch.empty((split_k, m, tiles.block_r), dtype=torch.float32, device=x.device)
    # token gates' partial logits; other gate kinds never touch the pointer, so xa stands in (no allocation)
    logit = torch.empty((split_k, m), dtype=torch.float32, device=x.device) if kind is GateKind.TOKEN else xa
    precision = dot_precision(x.dtype, a.dtype)
    shrink = (triton_two_pass.shrink_kernel, (ceil_div(m, tiles.shrink_m), split_k),
              (x, a, gate, gate_weight, xa, logit, m, k, args.r, k_per_split, x.stride(0), a.stride(0), stride_g,
               float(args.threshold), int(args.hard)),
              dict(GATE_KIND=int(kind), DOT_PRECISION=precision, BLOCK_M=tiles.shrink_m, BLOCK_K=tiles.block_k,
                   BLOCK_R=tiles.block_r, num_warps=tiles.shrink_warps, num_stages=tiles.shrink_stages))
    expand = (triton_two_pass.expand_kernel, (ceil_div(m, tiles.expand_m), ceil_div(args.n, tiles.block_n)),
              (xa, logit, gate, gate_bias, b, out, m, args.n, args.r, split_k, stride_g, b.stride(0), out.stride(0),
               float(args.scaling), float(args.threshold), int(args.hard)),
              dict(GATE_KIND=int(kind), DOT_PRECISION=precision, BLOCK_M=tiles.expand_m, BLOCK_N=tiles.block_n,
                   BLOCK_R=tiles.block_r, num_warps=tiles.expand_warps))
    return [shrink, expand]


def launch_two_pass(out: torch.Tensor, args: GatedLoraArgs, tiles: TwoPassTiles, split_k: int) -> None:
    """Add the gated LoRA term into ``out`` [M, N] in place: a shrink and an expand launch, no host sync."""
    target = staged_output(out)
    for kernel, grid, positional, keywords in two_pass_plan(target, args, tiles, split_k):
        kernel[grid](*positional, **keywords)
    if target is not out:
        out.copy_(target)


def uses_two_pass(args: GatedLoraArgs) -> bool:
    """Whether this configuration runs the two-pass path (see ``TWO_PASS_FROM_ROWS`` and ``_tile_table``)."""
    return m_bucket(args.m) >= TWO_PASS_FROM_ROWS or not has_one_pass_tile(args.r, args.lora_a.element_size())


def two_pass_launch(args: GatedLoraArgs) -> tuple[TwoPassTiles, int]:
    """(tiles, split_k) for this configuration."""
    tiles = two_pass_tiles(m_bucket(args.m), args.r, args.lora_a.element_size())
    return tiles, choose_split_k(m_bucket(args.m), args.k, tiles, _num_sms_for(args.x.device))


def interpreter_multiplies_bf16() -> bool:
    """Whether Triton's interpreter multiplies bf16 right here: Triton 3.9's ``create_dot`` hands bf16 operands to
    NumPy as their uint16 bit patterns (triton-lang/triton issue 11584), so a bf16 kernel returns values near
    1e9, unless a workaround patched it (the test suite's conftest.py does, and marks the patch)."""
    from triton.runtime import interpreter

    return bool(getattr(interpreter.InterpreterBuilder.create_dot, "_gatedlora_bf16_fix", False))


def device_reasons(device: torch.device, *dtypes: torch.dtype) -> list[str]:
    """Why the Triton kernels cannot take tensors on ``device`` of these dtypes (empty: they can)."""
    if kernel_is_interpreted():
        if device.type not in ("cpu", "cuda"):
            return [f"tensors on {device} (the interpreter takes CPU or CUDA tensors)"]
        if torch.bfloat16 in dtypes and not interpreter_multiplies_bf16():
            return ["bfloat16 under TRITON_INTERPRET=1: Triton's interpreter multiplies bf16 as integers "
                    "(triton-lang/triton issue 11584); compiled kernels on a GPU are not affected"]
        return []
    if device.type != "cuda":
        return [f"tensors are on {device.type}; the kernel runs on CUDA tensors (or on CPU tensors under "
                "TRITON_INTERPRET=1, set before gatedlora is imported)"]
    return []


class TritonBackend(Backend):
    name = "triton"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        return kernel_reasons(args.x.dtype, args.lora_a.dtype, args.r) + device_reasons(
            args.x.device, args.x.dtype, args.lora_a.dtype)

    def launcher(self, args: GatedLoraArgs) -> Launch:
        if uses_two_pass(args):
            tiles, split_k = two_pass_launch(args)
            return functools.partial(launch_two_pass, tiles=tiles, split_k=split_k)
        tiles, n_split = heuristic_launch(args)
        return functools.partial(launch, tiles=tiles, n_split=n_split)


register_backend(TritonBackend())
