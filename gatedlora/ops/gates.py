"""Gate probabilities and values in PyTorch, shared by the torch backend, autograd and the layers."""
from __future__ import annotations

import torch


def probability_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gates are evaluated in fp32 (fp64 when the inputs are fp64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_gate_probabilities(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x . w_g + b_g)`` per row. x: [M, K]; gate_weight: [K]; gate_bias: 0-dim.
    Returns [M] in fp32 (fp64 for fp64 x), the precision the kernels use. One ``addmv`` and an in-place
    sigmoid: two calls where ``x @ w + b`` then ``sigmoid`` are three (host time, docs/design.md)."""
    dtype = probability_dtype(x.dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    gate_weight = gate_weight if gate_weight.dtype == dtype else gate_weight.to(dtype)
    gate_bias = gate_bias if gate_bias.dtype == dtype else gate_bias.to(dtype)
    return torch.addmv(gate_bias, x, gate_weight).sigmoid_()


def gate_is_open(probability: float, threshold: float, hard: bool) -> bool:
    """The rule of ``gate_values`` for one probability read on the host: hard ``p >= threshold``, soft
    ``p != 0``; NaN closes either way."""
    if hard:
        return probability >= threshold
    return probability == probability and probability != 0.0


def gate_values(probabilities: torch.Tensor, threshold: float, hard: bool) -> torch.Tensor:
    """Hard gates ``p >= threshold`` as 0/1, soft gates ``p``; a NaN probability closes the gate. [M] -> [M]."""
    if hard:
        return (probabilities >= threshold).to(probabilities.dtype)
    return torch.nan_to_num(probabilities, nan=0.0)
