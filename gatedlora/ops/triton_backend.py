"""The triton backend: the kernel contract's reasons, a launch heuristic, one launch of ``gated_lora_add_kernel``.

Nothing here synchronises with the device: the gate is decided inside the kernel, ``gate_bias``
is passed by pointer, and every launch parameter comes from shapes, strides and dtypes. A call can
therefore be captured in a CUDA graph (after a first call has compiled it). The heuristic runs once
per configuration: the dispatcher caches the launch function built on its result.

Choosing a configuration (docs/design.md, "Numbers to design against")
----------------------------------------------------------------------
The adapter term is memory bound at every shape of interest (r <= 128: at most 2*r FLOPs per
byte of x), so the heuristic compares bytes. With ``e_x``, ``e_l`` the element sizes of x and
the LoRA weights, ``rows = min(M, BLOCK_M)`` and ``S = n_split``, one program moves

    fixed = rows*K*e_x + r*K*e_l              x rows and A, re-read by each of the S programs
    share = (r*N*e_l + 2*rows*N*e_x) / S      its part of B and of the read+write of the output

and the whole grid (``blocks * S`` programs, ``blocks = cdiv(M, BLOCK_M)``) moves
``blocks * (S*fixed + S*share)`` bytes through L2, of which only x, A, B and the output are unique
(HBM). The time estimate is the largest of three bounds: waves * bytes-per-program / per-SM
bandwidth (latency of one program), L2 bytes / L2 bandwidth, unique bytes / HBM bandwidth. The
heuristic takes the (BLOCK_M, S) with the smallest estimate. The bandwidths are H100 SXM figures
(3.35 TB/s HBM3; about 5.5 TB/s L2; 64 B/clock/SM at 1.75 GHz = 112 GB/s per SM). They are
assumptions, not measurements: no GPU has run this code yet, and the constants are meant to be
replaced by measured ones.

Worked examples (bf16, r = 16, K = N = 4096, Llama-3-8B q_proj; estimates from
``_estimate_seconds``, not measurements):

* decode, M = 1, BLOCK_M = 16: a program reads fixed = 8 KiB (x) + 128 KiB (A) and share =
  (128 KiB (B) + 16 KiB (out)) / S. Estimates for S = 1, 2, 4, ..., 64: 2.56, 1.90, 1.57, 1.41,
  1.33, 1.28, 1.65 us. S = 32 wins: one wave, 140 KiB a program; at S = 64 the 64 copies of A
  read through L2 (8.8 MB) cost more than the shorter B share saves. The floor of this design is
  one program's A read (about 1.2 us): splitting K too would need a second pass, which the
  one-launch design rules out.
* batched decode, M = 64: BLOCK_M = 16 with S = 8 (32 programs, 2.8 us) beats BLOCK_M = 64 at
  any S (6.2 us at best), whose programs each read 512 KiB of x.
* prefill, M = 4096, BLOCK_M = 64: HBM bound. x (32 MiB) plus the output read and write (64 MiB)
  take 30 us at 3.35 TB/s for S = 1 or 2; S = 4 needs two waves (44 us). The tie goes to S = 1
  (fewer redundant reads). This 30 us is the exact-mode floor of docs/design.md.

Tile shapes per (BLOCK_M, BLOCK_R, LoRA element size) are in ``TILE_CONFIGS``; all of them are
compiled for sm_80 and sm_90 by tools/aot_check.py, which fails on a spill or on shared memory
over the target's limit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import triton_kernel
from .args import GatedLoraArgs
from .backends import Backend, Launch, m_bucket, register_backend
from .contract import GateKind, kernel_reasons, staged_output, unit_inner_stride

# Assumed H100 SXM bandwidths in bytes/s (see the module docstring); unmeasured.
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


def _tile_table() -> dict[tuple[int, int, int], TileConfig]:
    """(BLOCK_M, BLOCK_R, LoRA element size) -> tiles, as tuned by tools/aot_check.py on sm_80/sm_90.

    Registers bound every choice (fp32 accumulators; 4 warps = 128 threads): the rank-r
    accumulator takes BLOCK_M*BLOCK_R/threads registers a thread, the B tile
    BLOCK_R*BLOCK_N/threads and the output tile BLOCK_M*BLOCK_N/threads. Where a first choice
    spilled (STACK > 0 in the cubin), BLOCK_K or BLOCK_N was halved or the warps doubled:
    * 64-row tiles use 8 warps: with 4 they spilled from BLOCK_R = 64 up, and every fp32 one;
    * fp32 LoRA weights (tf32/ieee dots) halve BLOCK_K, and BLOCK_N = 32 where BLOCK_R >= 64;
    * 16-row tiles with BLOCK_R = 128 take BLOCK_K = 32 (64 spilled 96 bytes on sm_90);
    * fp32 LoRA weights with BLOCK_R = 128 have no 16-row tile: each one tried (BLOCK_N 16 or 32,
      4 or 8 warps, 2 or 3 stages) spilled 8 to 48 bytes on sm_80, so M <= 16 runs the 64-row
      tile (masked rows: no extra bytes, idle tensor-core lanes); the 64-row tile spills with 3
      stages and not with 2.
    """
    half, single = 2, 4
    rows = [
        # block_m, block_r, elt, block_n, block_k, warps, stages
        (16, 16, half, 64, 128, 4, 3), (16, 32, half, 64, 128, 4, 3), (16, 64, half, 64, 64, 4, 3),
        (16, 128, half, 64, 32, 4, 3),
        (64, 16, half, 64, 64, 8, 3), (64, 32, half, 64, 64, 8, 3), (64, 64, half, 64, 64, 8, 3),
        (64, 128, half, 64, 32, 8, 3),
        (16, 16, single, 64, 32, 4, 3), (16, 32, single, 64, 32, 4, 3), (16, 64, single, 32, 32, 4, 3),
        (64, 16, single, 64, 16, 8, 3), (64, 32, single, 64, 32, 8, 3), (64, 64, single, 32, 16, 8, 3),
        (64, 128, single, 32, 16, 8, 2),
    ]
    return {(bm, br, elt): TileConfig(bm, bn, bk, br, warps, stages) for bm, br, elt, bn, bk, warps, stages in rows}


TILE_CONFIGS = _tile_table()
# Larger tile first: on equal estimates the first candidate stays (fewer redundant reads).
BLOCK_M_CHOICES = (64, 16)


def block_r_for(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(rank))


def _estimate_seconds(m: int, n: int, k: int, r: int, e_x: int, e_l: int, block_m: int, block_n: int,
                      n_split: int, num_sms: int) -> float:
    rows = min(m, block_m)
    blocks = triton.cdiv(m, block_m)
    fixed = rows * k * e_x + r * k * e_l
    per_block = r * n * e_l + 2 * rows * n * e_x
    per_program = fixed + per_block / n_split
    waves = triton.cdiv(blocks * n_split, num_sms)
    l2_bytes = blocks * (n_split * fixed + per_block)
    hbm_bytes = m * k * e_x + r * k * e_l + r * n * e_l + 2 * m * n * e_x
    return max(waves * per_program / SM_BANDWIDTH, l2_bytes / L2_BANDWIDTH, hbm_bytes / HBM_BANDWIDTH)


def choose_launch(m_key: int, n: int, k: int, r: int, e_x: int, e_l: int, num_sms: int) -> tuple[TileConfig, int]:
    """(tile config, n_split) for an M bucket, N, K, rank and element sizes; see the module docstring."""
    block_r = block_r_for(r)
    best = None
    # A tile taller than M only adds masked rows: no bytes, but tensor-core work on padding that the
    # byte model does not see.
    compiled = [bm for bm in BLOCK_M_CHOICES if (bm, block_r, e_l) in TILE_CONFIGS]
    for block_m in [bm for bm in compiled if bm <= max(m_key, min(compiled))]:
        tiles = TILE_CONFIGS[(block_m, block_r, e_l)]
        n_tiles = triton.cdiv(n, tiles.block_n)
        split = 1
        while True:
            t = _estimate_seconds(m_key, n, k, r, e_x, e_l, block_m, tiles.block_n, split, num_sms)
            # Strictly better only: ties keep the larger tile and the smaller split.
            if best is None or t < best[0] * (1 - 1e-9):
                best = (t, tiles, split)
            if split >= n_tiles:
                break
            split = min(2 * split, n_tiles)
    return best[1], best[2]


def kernel_is_interpreted() -> bool:
    """True when Triton was in interpreter mode (TRITON_INTERPRET=1) as the kernel was defined."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton_kernel.gated_lora_add_kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(lora_dtype: torch.dtype) -> str:
    """fp32 LoRA weights use TF32 only where PyTorch's matmuls would (allow_tf32), as PEFT's
    F.linear would; 16-bit operands ignore the setting."""
    if lora_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


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


def launch_plan(out: torch.Tensor, args: GatedLoraArgs, tiles: TileConfig,
                n_split: int) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, positional args, keyword args) of the kernel launch that adds into ``out`` [M, N].

    ``out`` must have unit stride along N (``contract.staged_output``); M, N and K are at least 1.
    tools/aot_check.py compiles from these same plans, so what it checks is what is launched.
    """
    x, a, b = unit_inner_stride(args.x), unit_inner_stride(args.lora_a), unit_inner_stride(args.lora_b)
    if tiles.block_r < args.r:
        raise ValueError(f"gated_lora (triton): BLOCK_R={tiles.block_r} is smaller than the rank {args.r}")
    n_split = max(1, min(n_split, triton.cdiv(args.n, tiles.block_n)))
    # Pointers a gate kind does not read still need a value; each kind fills them the same way every
    # time so that it has one signature (and one compiled variant) per dtype pair.
    kind = args.gate_kind
    if kind is GateKind.TOKEN:
        gate_weight = _as_fp32(args.gate_weight).contiguous()
        gate, gate_bias, stride_g = gate_weight, _as_fp32(args.gate_bias), 0
    elif kind is GateKind.GIVEN:
        gate = _as_fp32(args.gate)
        gate_weight = gate_bias = gate
        stride_g = gate.stride(0)
    else:
        gate = gate_weight = gate_bias = x
        stride_g = 0
    grid = (triton.cdiv(args.m, tiles.block_m), n_split)
    positional = (
        x, a, b, out, gate, gate_weight, gate_bias,
        args.m, args.n, args.k, args.r,
        x.stride(0), a.stride(0), b.stride(0), out.stride(0), stride_g,
        float(args.scaling), float(args.threshold), int(args.hard),
    )
    keywords = dict(
        GATE_KIND=int(kind),
        DOT_PRECISION=dot_precision(a.dtype),
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


class TritonBackend(Backend):
    name = "triton"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        reasons = kernel_reasons(args.x.dtype, args.lora_a.dtype, args.r)
        device = args.x.device
        if kernel_is_interpreted():
            if device.type not in ("cpu", "cuda"):
                reasons.append(f"tensors on {device} (the interpreter takes CPU or CUDA tensors)")
        elif device.type != "cuda":
            reasons.append(f"tensors are on {device.type}; the kernel runs on CUDA tensors (or on CPU tensors "
                           "under TRITON_INTERPRET=1, set before gatedlora is imported)")
        return reasons

    def launcher(self, args: GatedLoraArgs) -> Launch:
        tiles, n_split = heuristic_launch(args)
        return functools.partial(launch, tiles=tiles, n_split=n_split)


register_backend(TritonBackend())
