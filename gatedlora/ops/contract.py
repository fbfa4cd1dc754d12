"""The kernel contract: what the triton and cuda kernels assume about their inputs, written once.

Both kernels take the same ``GatedLoraArgs`` (``args.py``) and add into an output ``out`` [M, N]
in place. They share:

* the gate kinds (``GateKind``): the Triton kernel compares against these values by name, and
  csrc/gated_lora.h mirrors them as ``kGateNone``, ``kGateGiven``, ``kGateToken`` (the extension
  exports them and ``cuda_backend`` refuses a module whose values differ; a CPU test reads the header);
* the dtypes (``KERNEL_DTYPES``; x and LoRA weights of one dtype, or 16-bit x with fp32 LoRA weights)
  and the largest rank (``MAX_RANK``, csrc's ``kMaxRank``);
* the layout rule: unit stride along the last dim of x, A, B and out (rows may have any stride);
  other inputs are copied (``unit_inner_stride``) and other outputs staged (``staged_output``);
  an out that overlaps an input never reaches a kernel (``args.py`` stages it at the op boundary);
* bool gates (decisions, ``GateKind.GIVEN``) reach both kernels as fp32 0/1, which the hard rule
  ``p >= threshold`` (threshold in (0, 1)) and soft gates read as the decisions themselves;
* the reasons a backend gives when an input falls outside this contract (``kernel_reasons``).

The derivation of these rules (why unit inner strides, why fp32 gate inputs) is in docs/design.md,
"The kernel contract".
"""
from __future__ import annotations

import enum

import torch


class GateKind(enum.IntEnum):
    """Where a row's gate probability comes from (docs/design.md, "The operation")."""

    NONE = 0  # plain LoRA: g = 1 for every row
    GIVEN = 1  # per-row probabilities (or bool decisions) given by the caller (a router, a mask)
    TOKEN = 2  # p = sigmoid(x . w_g + b_g), computed in the same pass over x as x A^T


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 128  # csrc/gated_lora.h kMaxRank: rank products live in shared memory


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def dtype_pair_supported(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> bool:
    """x and LoRA weights of one dtype, or 16-bit x with fp32 LoRA weights (what PEFT creates on a
    bf16/fp16 model: its autocast_adapter_dtype keeps adapters in fp32). The pairs both kernels compile."""
    if x_dtype not in KERNEL_DTYPES or lora_dtype not in KERNEL_DTYPES:
        return False
    return x_dtype == lora_dtype or lora_dtype == torch.float32


def kernel_reasons(x_dtype: torch.dtype, lora_dtype: torch.dtype, rank: int) -> list[str]:
    """Why a kernel of this contract cannot take inputs of these dtypes and rank (empty: it can)."""
    reasons = []
    for label, dtype in (("x", x_dtype), ("lora weights", lora_dtype)):
        if dtype not in KERNEL_DTYPES:
            reasons.append(f"{label} dtype {dtype} is not supported ({dtype_names(KERNEL_DTYPES)})")
    if x_dtype in KERNEL_DTYPES and lora_dtype in KERNEL_DTYPES and not dtype_pair_supported(x_dtype, lora_dtype):
        reasons.append(f"x in {x_dtype} with lora weights in {lora_dtype} is not compiled (same dtype, or "
                       "16-bit x with float32 lora weights as PEFT makes them)")
    if rank > MAX_RANK:
        reasons.append(f"rank {rank} exceeds the kernel's maximum of {MAX_RANK}")
    return reasons


def unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last dim has unit stride (or one element), else a contiguous copy.

    The kernels read rows as contiguous vectors: with a runtime inner stride every element needs its
    own 64-bit address, which made 64-row Triton tiles spill on sm_90 (tools/aot_check.py). Other
    layouts (a transposed A, say) cost one extra read and write of that tensor, on an uncommon path.
    """
    return t if has_unit_inner_stride(t) else t.contiguous()


def has_unit_inner_stride(t: torch.Tensor) -> bool:
    """Whether the kernels read ``t`` where it lives (``unit_inner_stride``'s rule)."""
    return t.stride(-1) == 1 or t.shape[-1] <= 1


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's grid and split arithmetic. (``triton.cdiv`` is a constexpr function in
    Triton 3.9 whose Python call costs several microseconds: the two-pass launch plan's six took 46 us of host
    time a call on one CPU core, more than all its other work.)"""
    return -(-a // b)


def staged_output(out: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel should write: ``out`` itself when it has unit stride along N, else a
    contiguous copy that the caller copies back into ``out`` after the launch (the kernels store rows
    as contiguous vectors; an out with another column stride is an uncommon path)."""
    return unit_inner_stride(out)
