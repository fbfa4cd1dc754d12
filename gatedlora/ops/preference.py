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

MEASURED: dict[str, dict[tuple[str, str], dict[int, str]]] = {}


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
