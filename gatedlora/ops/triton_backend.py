"""The triton backend: constraint checks, a config heuristic, one launch of ``gated_lora_add_kernel``.

Nothing here synchronises with the device: the gate is decided inside the kernel, ``gate_bias``
given as a tensor is passed by pointer, and every launch parameter comes from shapes, strides and
dtypes. A call can therefore be captured in a CUDA graph (after a first call has compiled it).

Choosing a configuration (DESIGN.md section 5)
----------------------------------------------
The adapter term is memory bound at every shape of interest (r <= 128: at most 2*r FLOPs per
byte of x), so the heuristic compares bytes. With ``e_x``, ``e_l`` the element sizes of x and
the LoRA weights, ``rows = min(M, BLOCK_M)`` and ``S = n_split``, one program moves

    fixed = rows*K*e_x + r*K*e_l              x rows and A, re-read by each of the S programs
    share = (r*N*e_l + 2*rows*N*e_x) / S      its part of B and of the read+write of the output

and the whole grid (``blocks * S`` programs, ``blocks = cdiv(M, BLOCK_M)``) moves
``blocks * (S*fixed + S*share)`` bytes through L2, of which only x, A, B and the output are unique (HBM). The time estimate is the
largest of three bounds: waves * bytes-per-program / per-SM bandwidth (latency of one program),
L2 bytes / L2 bandwidth, unique bytes / HBM bandwidth. The heuristic takes the (BLOCK_M, S) with
the smallest estimate. The bandwidths are H100 SXM figures (3.35 TB/s HBM3; about 5.5 TB/s L2;
64 B/clock/SM at 1.75 GHz = 112 GB/s per SM). They are assumptions, not measurements: no GPU has
run this code yet, and the constants are meant to be replaced by measured ones.

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
  (fewer redundant reads). This 30 us is the exact-mode floor of DESIGN.md section 5.

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
from .backends import Backend, register_backend
from .checks import GatedLoraArgs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128
BLOCK_R_CHOICES = (16, 32, 64, 128)

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


def m_bucket(m: int) -> int:
    """Power-of-two bucket of the row count: the heuristic's cache key, so decode and every prefill
    length do not each get their own entry."""
    return triton.next_power_of_2(max(1, m))


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


@functools.lru_cache(maxsize=4096)
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


def dtype_pair_supported(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> bool:
    """The kernel runs x and LoRA weights of one dtype, and 16-bit x with fp32 LoRA weights (what PEFT
    creates by default on a bf16/fp16 model: autocast_adapter_dtype upcasts adapters to fp32)."""
    if x_dtype not in SUPPORTED_DTYPES or lora_dtype not in SUPPORTED_DTYPES:
        return False
    return x_dtype == lora_dtype or lora_dtype == torch.float32


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    # Gate inputs enter the kernel as fp32 so that one compiled variant serves every gate dtype
    # (tools/aot_check.py compiles each variant). fp32 inputs, the common case, are not copied;
    # others cost one small cast kernel (no sync).
    return t if t.dtype == torch.float32 else t.float()


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernel assumes stride 1 along the last dim (contiguous vector loads; see the kernel's
    # docstring). Layouts without it (a transposed x, for instance) are copied: one extra read and
    # write of the tensor, on an uncommon path. Row strides are passed as they are.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def launch_plan(out: torch.Tensor, args: GatedLoraArgs, tiles: TileConfig | None = None,
                n_split: int | None = None) -> tuple[tuple[int, int], tuple, dict] | None:
    """(grid, positional args, keyword args) of the kernel launch for ``out`` [M, N] and ``args``;
    None when there is nothing to do (M or N is 0).

    ``tiles``/``n_split`` override the heuristic (tests run every configuration through this).
    tools/aot_check.py compiles from these same plans, so what it checks is what is launched.
    """
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError("gated_lora (triton): out must have unit stride along N (launch() copies otherwise)")
    x, a, b = (_unit_inner_stride(t) for t in (args.x, args.lora_a, args.lora_b))
    m, k = x.shape
    n = out.shape[1]
    r = a.shape[0]
    if m == 0 or n == 0:
        return None
    if tiles is None or n_split is None:
        if x.device.type == "cuda":
            sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        else:
            sms = DEFAULT_NUM_SMS
        chosen, split = choose_launch(m_bucket(m), n, k, r, x.element_size(), a.element_size(), sms)
        tiles = tiles or chosen
        n_split = n_split or split
    if tiles.block_r < r:
        raise ValueError(f"gated_lora (triton): BLOCK_R={tiles.block_r} is smaller than the rank {r}")
    n_split = max(1, min(n_split, triton.cdiv(n, tiles.block_n)))

    # Pointers a mode does not read still need a value; each mode fills them the same way every
    # time so that it has one signature (and one compiled variant) per dtype pair.
    bias_is_tensor = isinstance(args.gate_bias, torch.Tensor)
    if args.gate_weight is not None:
        mode = triton_kernel.GATE_TOKEN
        gate_weight = _as_fp32(args.gate_weight).contiguous()
        gate = gate_weight
        gate_bias = _as_fp32(args.gate_bias) if bias_is_tensor else gate_weight
        stride_g = 0
    elif args.gate is not None:
        mode = triton_kernel.GATE_GIVEN
        gate = _as_fp32(args.gate)
        gate_weight = gate_bias = gate
        stride_g = gate.stride(0)
        bias_is_tensor = False
    else:
        mode = triton_kernel.GATE_NONE
        gate = gate_weight = gate_bias = x
        stride_g = 0
        bias_is_tensor = False
    gate_bias_value = 0.0 if isinstance(args.gate_bias, torch.Tensor) else float(args.gate_bias)

    grid = (triton.cdiv(m, tiles.block_m), n_split)
    positional = (
        x, a, b, out, gate, gate_weight, gate_bias,
        m, n, k, r,
        x.stride(0), a.stride(0), b.stride(0), out.stride(0), stride_g,
        float(args.scaling), float(args.threshold), gate_bias_value,
        int(args.hard), int(bias_is_tensor),
    )
    keywords = dict(
        GATE_MODE=mode,
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_R=tiles.block_r,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return grid, positional, keywords


def launch(out: torch.Tensor, args: GatedLoraArgs, tiles: TileConfig | None = None, n_split: int | None = None) -> None:
    """Add the gated LoRA term into ``out`` [M, N] in place: one kernel launch, no host sync.

    x: [M, K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] or None; gate_weight: [K] or None.
    """
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        staged = out.contiguous()
        launch(staged, args, tiles, n_split)
        out.copy_(staged)
        return
    plan = launch_plan(out, args, tiles, n_split)
    if plan is None:
        return
    grid, positional, keywords = plan
    triton_kernel.gated_lora_add_kernel[grid](*positional, **keywords)


class TritonBackend(Backend):
    name = "triton"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        reasons = []
        x, a = args.x, args.lora_a
        for label, dtype in (("x", x.dtype), ("lora weights", a.dtype)):
            if dtype not in SUPPORTED_DTYPES:
                reasons.append(f"{label} dtype {dtype} is not supported (float16, bfloat16, float32)")
        if x.dtype in SUPPORTED_DTYPES and a.dtype in SUPPORTED_DTYPES and not dtype_pair_supported(x.dtype, a.dtype):
            reasons.append(
                f"x in {x.dtype} with lora weights in {a.dtype} is not compiled (same dtype, or "
                "16-bit x with float32 lora weights as PEFT makes them)"
            )
        if args.gate is not None and not args.gate.is_floating_point():
            reasons.append(f"gate dtype {args.gate.dtype} is not floating point")
        if a.shape[0] > MAX_RANK:
            reasons.append(f"rank {a.shape[0]} exceeds the kernel's maximum of {MAX_RANK}")
        if kernel_is_interpreted():
            if x.device.type not in ("cpu", "cuda"):
                reasons.append(f"tensors on {x.device} (the interpreter takes CPU or CUDA tensors)")
        elif x.device.type != "cuda":
            reasons.append(
                f"tensors are on {x.device.type}; the kernel runs on CUDA tensors (or on CPU tensors "
                "under TRITON_INTERPRET=1, set before gatedlora is imported)"
            )
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (x, a, args.lora_b, args.gate, args.gate_weight, args.gate_bias)
        ):
            reasons.append("inputs require grad and the kernel has no backward yet (the torch backend has)")
        return reasons

    def add_into(self, out: torch.Tensor, args: GatedLoraArgs) -> None:
        launch(out, args)


register_backend(TritonBackend())
