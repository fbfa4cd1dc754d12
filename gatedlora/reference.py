"""The gated LoRA operation in plain PyTorch, in high precision: the oracle for every test.

    y_m = base_m + s * g_m * B (A x_m)

with ``g_m`` a hard (0/1) or soft (probability) gate per row. Nothing here is tuned
for speed; every backend is checked against these two functions.
"""
from __future__ import annotations

import torch


def gate_probabilities_reference(
    x: torch.Tensor,
    gate: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_bias: float | torch.Tensor | None = 0.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | None:
    """Per-row gate probability ``p_m``, or None when there is no gate (plain LoRA).

    x: [..., K]; gate: [M] or x.shape[:-1]; gate_weight: [K]; gate_bias: a scalar (one-element tensor,
    float, or None for no bias). Returns [M] in ``dtype``.
    """
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    if gate_weight is not None:
        bias = torch.as_tensor(0.0 if gate_bias is None else gate_bias, dtype=dtype, device=x.device).reshape(())
        logit = rows.to(dtype) @ gate_weight.to(dtype) + bias
        return torch.sigmoid(logit)
    if gate is not None:
        return gate.reshape(-1).to(dtype)
    return None


def gate_values_reference(probabilities: torch.Tensor | None, threshold: float, hard: bool,
                          threshold_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Gate value ``g_m`` from probabilities [M]: hard ``p >= threshold`` or soft ``p``; NaN closes.

    A hard gate compares in ``threshold_dtype`` (default: the probabilities' dtype): the op compares
    probabilities in fp32 (fp64 for fp64 inputs) with the threshold in that dtype, so a reference computed in
    fp64 for fp32 inputs rounds both to fp32 to decide the rows at the threshold alike (a given fp64 gate of
    0.5 - 1e-10 is 0.5 in fp32, and opens at threshold 0.5)."""
    if probabilities is None:
        return None
    closed = torch.isnan(probabilities)
    if hard:
        compared = threshold_dtype or probabilities.dtype
        rounded = torch.tensor(threshold, dtype=compared)
        return (probabilities.to(compared) >= rounded).to(probabilities.dtype)
    return torch.where(closed, torch.zeros_like(probabilities), probabilities)


def gated_lora_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_bias: float | torch.Tensor | None = 0.0,
    threshold: float = 0.5,
    hard: bool = True,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``base_out + scaling * g * (x A^T) B^T`` computed in ``dtype`` (fp64 by default).

    x: [..., K]; base_out: [..., N]; lora_a: [r, K]; lora_b: [N, r]. Returns [..., N] in ``dtype``.
    Rows whose gate is 0 are exactly ``base_out`` (converted to ``dtype``).
    """
    k, n = x.shape[-1], base_out.shape[-1]
    m = x.shape[:-1].numel()
    rows = x.reshape(m, k).to(dtype)
    base = base_out.reshape(m, n).to(dtype)
    delta = (rows @ lora_a.to(dtype).T) @ lora_b.to(dtype).T * scaling
    g = gate_values_reference(
        gate_probabilities_reference(x, gate, gate_weight, gate_bias, dtype), threshold, hard,
        torch.float64 if x.dtype == torch.float64 else torch.float32,
    )
    if g is None:
        out = base + delta
    else:
        out = torch.where((g != 0)[:, None], base + g[:, None] * delta, base)
    return out.reshape(base_out.shape)


def gated_lora_multi_reference(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_index: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Several adapters, one per row: ``base_out[m] + scaling[i] * (x[m] A_i^T) B_i^T`` with ``i = adapter_index[m]``.

    x: [..., K]; base_out: [..., N]; lora_a[i]: [r_i, K]; lora_b[i]: [N, r_i]; adapter_index: [M] or
    x.shape[:-1]. Rows whose index is not in [0, A) (-1: the base model) are exactly ``base_out``.
    Returns [..., N] in ``dtype``.
    """
    k, n = x.shape[-1], base_out.shape[-1]
    m = x.shape[:-1].numel()
    rows = x.reshape(m, k).to(dtype)
    out = base_out.reshape(m, n).to(dtype).clone()
    index = adapter_index.reshape(m)
    for i, (a, b, s) in enumerate(zip(lora_a, lora_b, scaling)):
        mine = index == i
        out[mine] += (rows[mine] @ a.to(dtype).T) @ b.to(dtype).T * s
    return out.reshape(base_out.shape)
