"""The functional op ``gated_lora``: validation, then the selected backend."""
from __future__ import annotations

import torch

from .backends import select_backend
from .checks import GatedLoraArgs, check_given_gate_values, check_inputs


def gated_lora(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: torch.Tensor | None = None,
    gate_weight: torch.Tensor | None = None,
    gate_bias: float | torch.Tensor = 0.0,
    threshold: float = 0.5,
    hard: bool = True,
    backend: str = "auto",
    inplace: bool = False,
) -> torch.Tensor:
    """``base_out + scaling * g * (x A^T) B^T`` with one gate value ``g`` per row.

    Args:
        x: [..., K] LoRA input (fp32, fp16 or bf16; fp64 on the torch backend).
        base_out: [..., N] base layer output, same leading dims and dtype as ``x``.
        lora_a: [r, K] (PEFT ``lora_A.weight``). ``x`` is cast to its dtype, as PEFT does.
        lora_b: [N, r] (PEFT ``lora_B.weight``).
        scaling: PEFT's ``scaling`` (lora_alpha / r).
        gate: [M] or ``x.shape[:-1]`` given gate probabilities (M = rows of x), or None.
        gate_weight: [K] token-gate weight: ``p = sigmoid(x . gate_weight + gate_bias)``.
        gate_bias: token-gate bias, a float or a 0-dim tensor.
        threshold: hard gates open where ``p >= threshold``; a NaN probability closes the gate.
        hard: 0/1 gates (inference) if True, ``g = p`` (soft) if False.
        backend: ``auto``, ``torch``, ``triton`` or ``cuda`` (``GATEDLORA_BACKEND`` overrides ``auto``).
        inplace: write into ``base_out`` and return it instead of a new tensor.

    With neither ``gate`` nor ``gate_weight`` this is plain LoRA (g = 1). Rows whose gate is 0
    are bitwise equal to ``base_out``. A given ``gate`` on the CPU is checked for NaN (error);
    on a GPU that check would sync, so there NaN closes the gate.

    Returns: [..., N] in the dtype of ``base_out``.
    """
    check_inputs(x, base_out, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold)
    if gate is not None:
        check_given_gate_values(gate)
    k, n = x.shape[-1], base_out.shape[-1]
    args = GatedLoraArgs(
        x=x.reshape(-1, k),
        lora_a=lora_a,
        lora_b=lora_b,
        scaling=float(scaling),
        gate=None if gate is None else gate.reshape(-1),
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        threshold=float(threshold),
        hard=bool(hard),
    )
    impl = select_backend(backend, args)
    out = base_out if inplace else base_out.clone()
    if args.rows == 0 or n == 0:
        return out
    try:
        out_rows = out.view(-1, n)
    except RuntimeError:  # a non-contiguous layout that cannot be viewed as rows
        out_rows = out.reshape(-1, n).clone()
        impl.add_into(out_rows, args)
        out.copy_(out_rows.view(out.shape))
        return out
    impl.add_into(out_rows, args)
    return out
