"""The functional op ``gated_lora``: validation, then the selected backend."""
from __future__ import annotations

import torch

from .backends import resolve_backend_name
from .checks import check_inputs
from .custom_op import add_into_rows, call_op


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

    Registered with torch.library as ``gatedlora::gated_lora_add_`` (see ``custom_op.py``), so
    ``torch.compile`` keeps a call in one graph node (calls that need autograd excepted).
    ``backend="auto"`` takes the torch backend for CPU tensors.

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
    k, n = x.shape[-1], base_out.shape[-1]
    x_rows = x.reshape(-1, k)
    gate_rows = None if gate is None else gate.reshape(-1)
    out = base_out if inplace else base_out.clone()
    if x_rows.shape[0] == 0 or n == 0:
        resolve_backend_name(backend)  # still reject an unknown backend name
        return out
    try:
        out_rows = out.view(-1, n)
        copy_back = False
    except RuntimeError:  # a non-contiguous layout that cannot be viewed as rows
        out_rows = out.reshape(-1, n).clone()
        copy_back = True
    differentiable = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (x, base_out, lora_a, lora_b, gate, gate_weight, gate_bias)
    )
    # The registered op keeps torch.compile graphs whole; eager calls skip the dispatcher round
    # trip (same implementation). The op has no autograd formula, so differentiable calls run the
    # eager code, where the torch backend is plain differentiable torch ops.
    if torch.compiler.is_compiling() and not differentiable:
        call_op(out_rows, x_rows, lora_a, lora_b, scaling, gate_rows, gate_weight, gate_bias, threshold, hard, backend)
    else:
        add_into_rows(out_rows, x_rows, lora_a, lora_b, scaling, gate_rows, gate_weight, gate_bias,
                      threshold, hard, backend)
    if copy_back:
        out.copy_(out_rows.view(out.shape))
    return out
