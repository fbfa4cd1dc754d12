"""The order in which ``backend="auto"`` tries the backends on a GPU: measured where a device class has run
``tools/gpu_check.py``, from the byte model elsewhere (docs/design.md, "Choosing a backend").

``MEASURED[arch][(x dtype, LoRA dtype)]`` maps the M buckets that gpu_check timed to the exact-mode backend
that was fastest there (its layer stage, Llama-3-8B projection shapes, geometric mean over shapes and open
fractions; the result files are named beside each table). An M bucket between two measured ones takes the
nearest below (the smallest measured one below that). The backend found fastest goes first; the others
follow in the byte model's order, so an input the fastest cannot take still finds a backend.

Without a measurement the byte model decides: the triton kernels read each byte of x, A, B and the output
once and run the rank-r products on tensor cores, so triton comes first at every M; the cuda adapter kernel
computes the rank products on the FMA units and re-reads x once per rank, a decode design, so it comes next
only up to 16 rows and never at prefill sizes.
"""
from __future__ import annotations

import torch

# sm_90: an H100 80GB HBM3 (torch 2.11, Triton 3.6), gpu_check's layer stage at commit e758e95
# (benchmarks/results/nvidia-h100-80gb-hbm3-e758e957e9fc.json; the stage ran out of time after q_proj's two
# dtype pairs and part of down_proj and up_proj, so bf16 LoRA weights were measured at K=N=4096 only). M <= 64:
# CUDA-graph replays of cuda and triton (the torch backend was not captured in that run); above, eager with L2
# flushed. The triton backend's times at M <= 64 are those of its two-pass path, timed beside the one-pass
# kernel that it ran then (q_proj; the two passes now run at every M, triton_backend.TWO_PASS_FROM_ROWS).
# Geometric-mean ratio to the base layer over open fractions 0, 6%, 75%, 100%:
#   bf16 x, fp32 LoRA: M=1 cuda 1.41 / triton 1.86; M=8 triton 2.17 / cuda 2.43; M=64 triton 1.49 / cuda 2.59;
#   M=512 triton 2.60 / cuda 2.82 / torch 2.93; M=4096 triton 1.47 / cuda 1.70 / torch 2.17.
#   bf16 x, bf16 LoRA: triton first at every M (M=1 1.31 against cuda 1.47; M=4096 1.27 against torch 1.31).
# One exception to "the fastest goes first": at M=1 with fp32 LoRA weights cuda won by 7% on q_proj (32.6
# against 35.0 us with the row open, 18.3 against 19.8 closed), but its first use builds the extension with
# nvcc (about a minute, in the middle of a generation) or, without nvcc, warns: auto does not start that for
# 7%. backend="cuda" asks for it by name.
MEASURED: dict[str, dict[tuple[str, str], dict[int, str]]] = {
    "sm_90": {
        ("bfloat16", "float32"): {1: "triton", 8: "triton", 64: "triton", 512: "triton", 4096: "triton"},
        ("bfloat16", "bfloat16"): {1: "triton", 8: "triton", 64: "triton", 512: "triton", 4096: "triton"},
    },
}

# The multi-adapter op (``gated_lora_multi``): its model-level comparison with four adapters, same H100 and
# versions, commit 9e1c12d (benchmarks/results/nvidia-h100-80gb-hbm3-9e1c12dec747.json, bf16 Llama-3-8B
# blocks, fp32 LoRA weights, decode replayed from CUDA graphs), time / base model: decode at batch 8 (8 rows
# a projection) torch 1.40, triton 2.00; at batch 32 torch 1.25, triton 1.60; prefill 8 x 512 (4096 rows)
# triton 1.45, torch 1.74. The torch backend there is two cuBLAS matmuls over every adapter at once.
MULTI_MEASURED: dict[str, dict[tuple[str, str], dict[int, str]]] = {
    "sm_90": {("bfloat16", "float32"): {8: "torch", 32: "torch", 4096: "triton"}},
}


def byte_model_order(m_bucket: int) -> tuple[str, ...]:
    """The GPU order without a measurement: triton, then cuda up to 16 rows, then torch."""
    return ("triton", "cuda", "torch") if m_bucket <= 16 else ("triton", "torch")


def device_class(device: torch.device) -> str:
    """``sm_XY`` of a CUDA device (the key of ``MEASURED``)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def measured_best(arch: str, x_dtype: torch.dtype, lora_dtype: torch.dtype, m_bucket: int,
                  table: dict | None = None) -> str | None:
    """The backend gpu_check found fastest for this class, dtype pair and M bucket, or None if unmeasured."""
    key = (str(x_dtype).replace("torch.", ""), str(lora_dtype).replace("torch.", ""))
    by_m = (MEASURED if table is None else table).get(arch, {}).get(key)
    if not by_m:
        return None
    below = [m for m in by_m if m <= m_bucket]
    return by_m[max(below)] if below else by_m[min(by_m)]


def gpu_order(device: torch.device, x_dtype: torch.dtype, lora_dtype: torch.dtype, m_bucket: int,
              table: dict | None = None) -> tuple[str, ...]:
    """The backends ``auto`` tries, in order, for CUDA tensors of these dtypes and M bucket."""
    order = byte_model_order(m_bucket)
    best = measured_best(device_class(device), x_dtype, lora_dtype, m_bucket, table)
    if best is None:
        return order
    return (best,) + tuple(name for name in order if name != best)
