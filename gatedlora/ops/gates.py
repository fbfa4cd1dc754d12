"""Gate probabilities and values in PyTorch, shared by the torch backend, autograd and the layers."""
from __future__ import annotations

import struct

import torch


_SCALARS: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def cpu_scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor holding ``value``, for operations with CPU tensors of ``dtype``: fp64 for fp64
    operands, else fp32, the precision PyTorch computes a Python float in, so results are bitwise those
    of the float. An operation with a Python float costs about 2 us more host time than with a 0-dim
    tensor (one core: 4.4 against 2.1 us for ``p >= 0.5``), more than its arithmetic at decode sizes."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = _SCALARS.get((value, dtype))
    if t is None:
        if len(_SCALARS) > 1024:
            _SCALARS.clear()
        t = _SCALARS[(value, dtype)] = torch.tensor(value, dtype=dtype)
    return t


def open_rows(probabilities: torch.Tensor, threshold: float, hard: bool) -> torch.Tensor:
    """Which rows are open, [M] bool: hard ``p >= threshold``, soft ``p != 0``; NaN closes either way."""
    if hard:
        on_cpu = probabilities.device.type == "cpu"
        return probabilities.ge(cpu_scalar(threshold, probabilities.dtype) if on_cpu else threshold)
    return torch.nan_to_num(probabilities, nan=0.0) != 0


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
    if x.numel() == 0:  # M = 0 or K = 0: with the 0-dim bias addmv would return its shape, not [M]
        # (still through addmv, so that gate_weight is in the graph: a backward with create_graph=True then
        # gives it its zero gradient)
        return torch.addmv(gate_bias.expand(x.shape[0]), x, gate_weight).sigmoid_()
    return torch.addmv(gate_bias, x, gate_weight).sigmoid_()


_FP32 = struct.Struct("f")
_FP32_THRESHOLDS: dict[float, float] = {}
# A positive float times this is below its fp32 rounding (half an fp32 ulp is at most 2^-24 of the value).
_BELOW_FP32_ROUNDING = 1.0 - 2.0 ** -24


def gate_is_open(probability: torch.Tensor, threshold: float, hard: bool) -> bool:
    """The rule of ``gate_values`` for one probability [1] or [] (fp32, or fp64), read on the host: hard
    ``p >= threshold``, soft ``p != 0``; NaN closes either way.

    A tensor compared with a Python float compares in the tensor's dtype, so a batch compares an fp32
    probability with the threshold rounded to fp32; so does this (float32(0.7) < 0.7: with the unrounded
    threshold a row of p = float32(0.7) opened in a batch and stayed closed alone). Rounding is monotonic, so
    an fp32 p >= threshold is also >= its rounding, and the rounding is within half an fp32 ulp of the
    threshold: only a p within that of it looks the rounding up (cached per threshold). Measured on one core:
    no cost for an open row, 0.05 us for a closed one (0.3 us when every call looked the rounding up)."""
    value = probability.item()
    if hard:
        if value >= threshold:
            return True
        if value < threshold * _BELOW_FP32_ROUNDING or probability.dtype is torch.float64:
            return False
        rounded = _FP32_THRESHOLDS.get(threshold)
        if rounded is None:
            if len(_FP32_THRESHOLDS) > 1024:
                _FP32_THRESHOLDS.clear()
            rounded = _FP32_THRESHOLDS[threshold] = _FP32.unpack(_FP32.pack(threshold))[0]
        return value >= rounded
    return value == value and value != 0.0


def gate_values(probabilities: torch.Tensor, threshold: float, hard: bool) -> torch.Tensor:
    """Hard gates ``p >= threshold`` as 0/1, soft gates ``p``; a NaN probability closes the gate. [M] -> [M]."""
    if hard:
        return (probabilities >= threshold).to(probabilities.dtype)
    return torch.nan_to_num(probabilities, nan=0.0)
