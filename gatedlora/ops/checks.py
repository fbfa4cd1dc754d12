"""Input validation for ``gated_lora``: every error names the tensor, what was expected and what came."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class GatedLoraArgs:
    """The op's inputs, flattened to rows: what every backend receives.

    x: [M, K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] probabilities or None;
    gate_weight: [K] or None; gate_bias: float or 0-dim tensor.
    """

    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    gate: torch.Tensor | None
    gate_weight: torch.Tensor | None
    gate_bias: float | torch.Tensor
    threshold: float
    hard: bool

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_inputs(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: torch.Tensor | None,
    gate_weight: torch.Tensor | None,
    gate_bias: float | torch.Tensor,
    threshold: float,
) -> None:
    """Raise TypeError/ValueError naming the first input that is wrong."""
    for name, t in (("x", x), ("base_out", base_out), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gated_lora: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"gated_lora: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
            )
    if x.dim() < 1:
        raise ValueError("gated_lora: x must have shape [..., K], got a 0-dim tensor")
    k = x.shape[-1]
    if base_out.shape[:-1] != x.shape[:-1] or base_out.dim() != x.dim():
        raise ValueError(
            f"gated_lora: base_out must have the leading dims of x, shape {_shape(x)[:-1] + ['N']}, "
            f"got {_shape(base_out)}"
        )
    n = base_out.shape[-1]
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"gated_lora: lora_a must have shape [r, K] = [r, {k}], got {_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"gated_lora: rank r must be at least 1, lora_a has shape {_shape(lora_a)}")
    if lora_b.dim() != 2 or lora_b.shape[0] != n:
        raise ValueError(f"gated_lora: lora_b must have shape [N, r] = [{n}, {r}], got {_shape(lora_b)}")
    if lora_b.shape[1] != r:
        raise ValueError(
            f"gated_lora: rank mismatch: lora_a has rank {r} (shape {_shape(lora_a)}) but lora_b has "
            f"rank {lora_b.shape[1]} (shape {_shape(lora_b)}); expected lora_b of shape [{n}, {r}]"
        )
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"gated_lora: lora_a and lora_b must share a dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if x.dtype != base_out.dtype:
        raise TypeError(f"gated_lora: x and base_out must share a dtype, got {x.dtype} and {base_out.dtype}")
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"gated_lora: scaling must be a finite Python float, got {scaling!r}")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
        raise ValueError(f"gated_lora: threshold must be a float in (0, 1), got {threshold!r}")
    if gate is not None and gate_weight is not None:
        raise ValueError("gated_lora: pass either gate (given per-row values) or gate_weight (token gate), not both")
    named = [("x", x), ("base_out", base_out), ("lora_a", lora_a), ("lora_b", lora_b)]
    if gate is not None:
        m = x.numel() // k if k else 0
        if not isinstance(gate, torch.Tensor) or not gate.is_floating_point():
            raise TypeError(f"gated_lora: gate must be a floating-point tensor of probabilities, got {gate!r:.80}")
        if tuple(gate.shape) not in ((m,), tuple(x.shape[:-1])):
            raise ValueError(
                f"gated_lora: gate must have one value per row of x: shape [{m}] or {_shape(x)[:-1]}, "
                f"got {_shape(gate)}"
            )
        named.append(("gate", gate))
    if gate_weight is not None:
        if not isinstance(gate_weight, torch.Tensor) or gate_weight.shape != (k,):
            shape = _shape(gate_weight) if isinstance(gate_weight, torch.Tensor) else type(gate_weight).__name__
            raise ValueError(f"gated_lora: gate_weight must have shape [K] = [{k}], got {shape}")
        named.append(("gate_weight", gate_weight))
    if isinstance(gate_bias, torch.Tensor):
        if gate_bias.numel() != 1:
            raise ValueError(f"gated_lora: gate_bias must be a scalar, got shape {_shape(gate_bias)}")
        named.append(("gate_bias", gate_bias))
    device = x.device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"gated_lora: {name} is on {t.device} but x is on {device}; all tensors must share a device")


def check_given_gate_values(gate: torch.Tensor) -> None:
    """Reject NaN in a caller-supplied gate where the check costs no device sync (CPU tensors).

    On a GPU the check would force a host sync, so there a NaN simply closes the gate
    (the rule for computed probabilities, DESIGN.md section 2).
    """
    if gate.device.type != "cpu":
        return
    bad = torch.isnan(gate.reshape(-1))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"gated_lora: gate contains NaN at rows {rows} (of {gate.numel()}); "
            "pass probabilities in [0, 1] (use 0.0 to close a row's gate)"
        )
