"""``gatedlora::gated_lora_add_``: the op registered with torch.library, so torch.compile keeps it whole.

Dynamo cannot see into a Triton launch or the torch backend's data-dependent row selection
(``nonzero``) without breaking the graph; as a custom op with a fake implementation the whole
call is one node whose output (``out``, mutated in place) has a known shape.

The op mutates ``out`` (the base output, [M, N]) and returns nothing; ``gated_lora`` clones
``base_out`` first unless ``inplace=True``. Under functionalization (torch.compile) that becomes
``auto_functionalized`` and Inductor re-inplaces it.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations to infer the schema.
from typing import Optional

import torch

from .backends import select_backend
from .checks import GatedLoraArgs

OP_NAME = "gatedlora::gated_lora_add_"


def add_into_rows(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias: "float | torch.Tensor",
    threshold: float,
    hard: bool,
    backend: str,
) -> None:
    """Select a backend and add ``scaling * g * (x A^T) B^T`` into ``out`` in place (eager code).

    out: [M, N] holding the base output; x: [M, K]; lora_a: [r, K]; lora_b: [N, r];
    gate: [M] or None; gate_weight: [K] or None; gate_bias: float or 0-dim tensor.
    Inputs must already have passed ``checks.check_inputs`` (and a caller's gate the NaN check).
    """
    args = GatedLoraArgs(
        x=x, lora_a=lora_a, lora_b=lora_b, scaling=float(scaling), gate=gate, gate_weight=gate_weight,
        gate_bias=gate_bias, threshold=float(threshold), hard=bool(hard),
    )
    select_backend(backend, args).add_into(out, args)  # auto sends CPU tensors to torch


@torch.library.custom_op(OP_NAME, mutates_args=("out",))
def gated_lora_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias_tensor: Optional[torch.Tensor],
    gate_bias_value: float,
    threshold: float,
    hard: bool,
    backend: str,
) -> None:
    """The registered op: ``gate_bias`` travels as a tensor or a float (a schema has no union type).

    out: [M, N] (mutated); x: [M, K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] or None;
    gate_weight: [K] or None; gate_bias_tensor: 0-dim or None (then gate_bias_value is used).
    """
    bias = gate_bias_tensor if gate_bias_tensor is not None else gate_bias_value
    add_into_rows(out, x, lora_a, lora_b, scaling, gate, gate_weight, bias, threshold, hard, backend)


@gated_lora_add_.register_fake
def _gated_lora_add_fake(out, x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias_tensor,
                         gate_bias_value, threshold, hard, backend) -> None:
    # In-place on out: nothing new to allocate, no shape to compute.
    return None


def call_op(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
            gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor], gate_bias: "float | torch.Tensor",
            threshold: float, hard: bool, backend: str) -> None:
    """``gated_lora_add_`` through the dispatcher (shapes as in ``add_into_rows``)."""
    bias_tensor = gate_bias if isinstance(gate_bias, torch.Tensor) else None
    bias_value = 0.0 if bias_tensor is not None else float(gate_bias)
    torch.ops.gatedlora.gated_lora_add_(
        out, x, lora_a, lora_b, float(scaling), gate, gate_weight, bias_tensor, bias_value,
        float(threshold), bool(hard), backend,
    )
