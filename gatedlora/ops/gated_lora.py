"""``gated_lora``, the functional op: arguments checked and normalised once, then the backend's
in-place add (``custom_op.gated_lora_add_``), through autograd when the call is recorded."""
from __future__ import annotations

import torch

from .args import GatedLoraArgs, check_inputs, make_args, overlaps
from .autograd import (GatedLoraFunction, Options, apart_from, records_gradients, writable_in_place,
                       written_through_a_copy)
from .backends import resolve_backend_name, torch_runs_on_cpu
from .custom_op import gated_lora_add_
from .torch_backend import addmm_lora_


def gated_lora(
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
    backend: str = "auto",
    inplace: bool = False,
    straight_through: bool = False,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """``base_out + scaling * g * (x A^T) B^T`` with one gate value ``g`` per row.

    Per row m: ``y[m] = base_out[m] + scaling * g[m] * (x[m] @ lora_a.T) @ lora_b.T`` where ``g[m]`` is
    1 without a gate, ``p[m] >= threshold`` (hard) or ``p[m]`` (soft), and ``p`` is ``gate`` (given)
    or ``sigmoid(x @ gate_weight + gate_bias)`` (token gate). Rows with ``g[m] == 0`` are bitwise
    ``base_out[m]``. Registered with torch.library as ``gatedlora::gated_lora_add_``, so
    ``torch.compile`` keeps a call in one graph node. Calls that autograd records run the same backend
    forward and a PyTorch backward (``autograd.py``), double backward included.

    Args:
        x: [..., K] LoRA input (fp32, fp16 or bf16; fp64 on the torch backend).
        base_out: [..., N] base layer output, same leading dims and dtype as ``x``.
        lora_a: [r, K] (PEFT ``lora_A.weight``). ``x`` is cast to its dtype, as PEFT does.
        lora_b: [N, r] (PEFT ``lora_B.weight``).
        scaling: PEFT's ``scaling`` (lora_alpha / r).
        gate: [M] or ``x.shape[:-1]`` given gate probabilities in [0, 1] (M = rows of x), or bool
            decisions (True: open; hard or soft, the gate is then 1 or 0 and ``threshold`` is unused), or None.
        gate_weight: [K] token-gate weight: ``p = sigmoid(x . gate_weight + gate_bias)``.
        gate_bias: token-gate bias: a float, a one-element tensor, or None (no bias).
        threshold: hard gates open where ``p >= threshold``; a NaN probability closes the gate.
        hard: 0/1 gates (inference) if True, ``g = p`` (soft) if False.
        backend: ``auto``, ``torch``, ``triton`` or ``cuda`` (``GATEDLORA_BACKEND`` overrides ``auto``).
        inplace: write into ``base_out`` and return it instead of a new tensor (a ``base_out`` that
            shares memory with an input is computed through a copy, then written). Under autograd a view is
            written too, except one autograd refuses to modify in place (one of several views from ``split``,
            ``chunk`` or ``unbind``, or one made under ``no_grad``): that call returns a new tensor and leaves
            ``base_out`` as it was.
        straight_through: with ``hard=True``, the gate gets the gradient of a soft gate
            (forward hard, backward as ``g = p``); without it a hard gate gets no gradient.
            Soft gates always get exact gradients. Closed rows give the LoRA weights no gradient.
        validate: check every argument (the default). ``False`` is for callers whose arguments are
            valid by construction (``GatedLoRALinear``): the checks cost more host time than the
            rest of a decode-sized call (docs/design.md, "The hot path").

    With neither ``gate`` nor ``gate_weight`` this is plain LoRA (g = 1). A given ``gate`` on the CPU
    is checked for values outside [0, 1] and NaN (error); on a GPU that check would sync, and under
    ``torch.compile`` a graph cannot raise on a value, so there a NaN closes the gate and other values are used
    as they are.

    Returns: [..., N] in the dtype of ``base_out``.
    """
    if validate:
        check_inputs(x, base_out, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                     inplace, straight_through)
        scaling, threshold = float(scaling), float(threshold)
    overlapping = compiling = False
    if validate and inplace:  # (the layers' calls, validate=False, pay none of this)
        inputs = (x, lora_a, lora_b, gate, gate_weight, gate_bias)
        compiling = torch.compiler.is_compiling()
        overlapping = not compiling and overlaps(base_out, inputs)
        if overlapping and records_gradients([base_out] + [t for t in inputs if isinstance(t, torch.Tensor)]):
            x, lora_a, lora_b, gate, gate_weight, gate_bias = apart_from(base_out, inputs)
    args = make_args(x, base_out.shape[-1], lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard)
    if overlapping or compiling:
        # a kernel would read x (or a weight) while writing base_out: compute into a copy first. Under torch.compile,
        # whose tracing cannot read storage addresses, always: right whatever overlaps (the layers pass no check)
        result = run(args, base_out, backend, inplace=False, straight_through=straight_through)
        return written_through_a_copy(base_out, result, (base_out,) + args.tensors())
    return run(args, base_out, backend, inplace, straight_through)


def add_lora_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              backend: str = "auto") -> torch.Tensor:
    """Plain LoRA added in place, outside autograd: ``out += scaling * (x A^T) B^T`` on every row; returns out.

    For callers whose arguments are valid by construction and whose rows are all open (the layers' rows that
    the host already knows are open): ``gated_lora(x, out, ..., inplace=True, validate=False)`` without a
    gate. Where the torch backend runs a CPU call and every dtype is the same, its one ``F.linear`` and one
    ``addmm_`` run here directly: the op's frames around them cost more in a model than alone (on one CPU core,
    the bench model: 0.04x of a batch-1 prefill and 0.08-0.10x of a batch-1 decode step; docs/design.md,
    "The hot path").

    out: [..., N] (contiguous for the direct path); x: [..., K], the same leading dims; lora_a: [r, K];
    lora_b: [N, r].
    """
    if x.is_cpu and out.dtype == x.dtype == lora_a.dtype == lora_b.dtype and out.is_contiguous() \
            and out.numel() and x.shape[-1] and torch_runs_on_cpu(backend) \
            and not torch.is_autocast_enabled("cpu"):  # (no rows, K = 0, or autocast: the op's way)
        addmm_lora_(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), lora_a, lora_b, scaling)
        return out
    return gated_lora(x, out, lora_a, lora_b, scaling, backend=backend, inplace=True, validate=False)


def run(args: GatedLoraArgs, base_out: torch.Tensor, backend: str, inplace: bool,
        straight_through: bool) -> torch.Tensor:
    """``gated_lora`` on normalised arguments: through autograd when an input requires grad."""
    if torch.is_grad_enabled() and records_gradients((base_out,) + args.tensors()):  # (no tuple in inference)
        inplace = inplace and writable_in_place(base_out)
        resolve_backend_name(backend)  # reject an unknown backend name even when there is no row
        return GatedLoraFunction.apply(args, Options(straight_through, backend, inplace), base_out, args.x,
                                       args.lora_a, args.lora_b, args.gate, args.gate_weight, args.gate_bias)
    out = base_out if inplace else base_out.clone()
    gated_lora_add_(out, args, backend)
    return out
