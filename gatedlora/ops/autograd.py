"""Autograd for ``gated_lora``: the forward runs the selected backend, the backward is PyTorch.

    y_m = base_m + s * g_m * Δ_m,   Δ_m = B (A x_m),   g_m = gate(p_m)

Backward, with ``go`` = dL/dy [M, N], ``u = x A^T`` [M, r] and ``w_m`` the forward gate value
(1 without a gate, p_m soft, 0/1 hard):

    dL/dbase = go                         dL/dB = s (w ⊙ go)^T u
    dL/du    = s (w ⊙ go) B               dL/dA = (dL/du)^T x          dL/dx += (dL/du) A
    dL/dg_m  = s <go_m B, u_m>            (only where the gate gets a gradient, see below)

A closed row (w_m = 0) adds nothing to dL/dA, dL/dB or the LoRA part of dL/dx, whatever its x holds
(inf included): with hard gates on the CPU those rows are left out of the matmuls, elsewhere they
are zeroed with ``torch.where`` (no host sync). Gate gradients: soft gates get the exact derivative;
hard gates get ``dL/dp = dL/dg`` (straight-through estimator) when ``straight_through=True`` and
none otherwise. A NaN probability closes the gate and gets no gradient. Token gates
``p = sigmoid(x . w_g + b_g)`` chain ``dL/dp`` into x, w_g and b_g in the probability dtype (fp32,
fp64 for fp64 inputs).

Double backward (``create_graph=True``): the backward then recomputes the term in differentiable
PyTorch and differentiates it, so second derivatives (gradient penalties, ``gradgradcheck``) are
exact, soft gates included.

Why the backward is PyTorch on every backend, and what it costs against PEFT: docs/design.md,
"Autograd".
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .args import GatedLoraArgs, overlaps
from .contract import GateKind
from .custom_op import gated_lora_add_
from .gates import gate_values, probability_dtype, token_gate_probabilities

# base_out is the first tensor input: when a Function writes a view in place, autograd's rebase (CopySlices) routes
# the backward's first tensor gradient to the view's base, and base_out's gradient is what belongs there.
INPUTS = ("args", "options", "base_out", "x", "lora_a", "lora_b", "gate", "gate_weight", "gate_bias")

_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)


def records_gradients(tensors) -> bool:
    """Whether autograd records a call on ``tensors`` (None among them is skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apart_from(base_out: torch.Tensor, tensors: tuple) -> tuple:
    """``tensors`` with a clone in place of each one that shares memory with ``base_out``: for an in-place call that
    autograd records, which saves the inputs it reads for the backward, where the write into base_out that follows
    would change them (autograd's version check then failed in the backward, naming nothing of the op)."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) and overlaps(base_out, (t,)) else t for t in tensors)


def written_through_a_copy(base_out: torch.Tensor, result: torch.Tensor, tensors) -> torch.Tensor:
    """An in-place call computed into ``result`` (a new tensor): base_out written from it and returned, or, where
    autograd records the call and refuses to modify base_out in place (``writable_in_place``), ``result``, as an
    in-place call with such a base_out returns. (Under torch.compile a view's check breaks the graph; a tensor
    that is no view is decided in the graph.)"""
    if records_gradients(tensors) and not writable_in_place(base_out):
        return result
    return base_out.copy_(result)


def writable_in_place(base_out: torch.Tensor) -> bool:
    """Whether a Function recorded by autograd may write ``base_out`` in place: not a view, or a view autograd can
    rebase. Not one of several views one op returned (``split``, ``chunk``, ``unbind``), nor one made under
    ``no_grad`` or inference mode, nor a leaf that requires grad or a view of one: autograd refuses to modify those
    in place (about 1.4 us, for views only)."""
    source = base_out._base  # (None: not a view; Dynamo traces this, not ``_is_view()``)
    if source is None:
        return not (base_out.is_leaf and base_out.requires_grad)
    if source.is_leaf and source.requires_grad:
        return False
    return _creation_meta is not None and _creation_meta(base_out) == torch._C._autograd.CreationMeta.DEFAULT


class Options(NamedTuple):
    """What the autograd function needs beyond ``GatedLoraArgs``."""

    straight_through: bool
    backend: str
    inplace: bool


class GatedLoraFunction(torch.autograd.Function):
    """``gated_lora`` with gradients. The tensors are passed again after ``args`` (base_out as given, first: see
    ``INPUTS``; x as its [M, K] rows) so that autograd tracks them."""

    @staticmethod
    def forward(ctx: Any, args: GatedLoraArgs, options: Options, base_out: torch.Tensor, x: torch.Tensor,
                lora_a: torch.Tensor, lora_b: torch.Tensor, gate: Optional[torch.Tensor],
                gate_weight: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = base_out if options.inplace else base_out.clone()
        gated_lora_add_(out, args, options.backend)
        if options.inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_a, lora_b, gate, gate_weight, gate_bias)
        ctx.gate_kind = args.gate_kind
        ctx.options = (args.scaling, args.threshold, args.hard, options.straight_through)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, lora_a, lora_b, gate, gate_weight, gate_bias = ctx.saved_tensors
        scaling, threshold, hard, straight_through = ctx.options
        need = dict(zip(INPUTS, ctx.needs_input_grad))
        gate_grad = (need["gate"] or (ctx.gate_kind is GateKind.TOKEN and (
            need["x"] or need["gate_weight"] or need["gate_bias"]))) and (not hard or straight_through)
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = differentiable_backward(grad_out, x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias,
                                            threshold, hard, straight_through, need)
        else:
            grads = lora_backward(grad_out, x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold,
                                  hard, gate_grad=gate_grad, need_x=need["x"],
                                  need_weights=need["lora_a"] or need["lora_b"])
        grads["base_out"] = grad_out
        return tuple(grads.get(name) if need[name] else None for name in INPUTS)


def _probabilities(x_rows: torch.Tensor, gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                   gate_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if gate_weight is not None:
        return token_gate_probabilities(x_rows, gate_weight, gate_bias)
    if gate is not None:
        return gate.reshape(-1).to(probability_dtype(x_rows.dtype))
    return None


def lora_backward(
    grad_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor], gate_bias: Optional[torch.Tensor],
    threshold: float, hard: bool, gate_grad: bool, need_x: bool = True, need_weights: bool = True,
    select_rows: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Gradients of ``gated_lora`` w.r.t. x (if ``need_x``), lora_a and lora_b (if ``need_weights``)
    and the gate inputs (if ``gate_grad``).

    grad_out: [..., N]; x: [M, K] rows; lora_a: [r, K]; lora_b: [N, r]; gate: [M]; gate_weight: [K];
    gate_bias: 0-dim (token gates). Returns a dict of gradients shaped and typed like their inputs.
    ``select_rows`` (default: hard gates on the CPU) leaves closed rows out of the LoRA matmuls instead
    of zeroing them; both give the same result.
    """
    m, k = x.shape
    compute = lora_a.dtype  # the forward computes the LoRA term in the weights' dtype, as PEFT does
    with torch.autocast(x.device.type, enabled=False):
        go = grad_out.reshape(m, lora_b.shape[0]).to(compute)
        lora_x = x.to(compute)
        probabilities = _probabilities(x.detach(), None if gate is None else gate.detach(),
                                       None if gate_weight is None else gate_weight.detach(),
                                       None if gate_bias is None else gate_bias.detach())
        g = None if probabilities is None else gate_values(probabilities, threshold, hard)

        grads: dict[str, torch.Tensor] = {}
        grad_x = None  # [M, K]; token-gate terms arrive in the probability dtype (fp32 at least)
        u_all = gb_all = None
        if gate_grad:
            # dL/dg needs u = x A^T and go B on every row, closed ones included (straight-through
            # gates learn to open from them); the LoRA gradients below reuse both.
            u_all = lora_x @ lora_a.T
            gb_all = go @ lora_b
            dg = scaling * (gb_all.to(probabilities.dtype) * u_all.to(probabilities.dtype)).sum(-1)
            dp = torch.where(torch.isnan(probabilities), torch.zeros_like(dg), dg)
            grad_x = _gate_input_grads(grads, dp, probabilities, x, gate, gate_weight, gate_bias, need_x)

        if need_x or need_weights:
            if select_rows is None:
                select_rows = hard and x.device.type == "cpu" and not torch.compiler.is_compiling()
            rows = keep = None
            if g is not None and select_rows:
                rows = (g != 0).nonzero().flatten()
            elif g is not None:
                keep = (g != 0)[:, None]  # closed rows zeroed, not multiplied by 0 (inf * 0 is NaN)
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
            # The per-row factor s * g scales the [M', r] products, never go [M', N] (r << N).
            if g is None or (hard and rows is not None):
                factor = scaling
            else:
                factor = pick(g).to(compute)[:, None] * scaling
            rows_x = pick(lora_x) if keep is None else torch.where(keep, lora_x, 0)
            u = rows_x @ lora_a.T if u_all is None else pick(u_all)            # [M', r]
            if keep is not None and u_all is not None:
                u = torch.where(keep, u, 0)
            gb = pick(go) @ lora_b if gb_all is None else pick(gb_all)        # [M', r]
            grad_u = gb * factor                                              # dL/du [M', r]
            if need_weights:
                grads["lora_b"] = (pick(go).T @ (u * factor)).to(lora_b.dtype)  # [N, r]
                grads["lora_a"] = (grad_u.T @ rows_x).to(lora_a.dtype)          # [r, K]
            if need_x:
                lora_grad_x = grad_u @ lora_a                                   # [M', K]
                if rows is not None:
                    lora_grad_x = torch.zeros_like(lora_x).index_add_(0, rows, lora_grad_x)
                grad_x = lora_grad_x if grad_x is None else grad_x + lora_grad_x
    if need_x:
        grads["x"] = (torch.zeros_like(x) if grad_x is None else grad_x).to(x.dtype)
    return grads


def _gate_input_grads(grads: dict, dp: torch.Tensor, probabilities: torch.Tensor, x: torch.Tensor,
                      gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                      gate_bias: Optional[torch.Tensor], need_x: bool) -> Optional[torch.Tensor]:
    """Chain dL/dp [M] into the given gate, or into w_g, b_g of a token gate (into ``grads``); returns a
    token gate's part of dL/dx [M, K] in the probability dtype when ``need_x``, else None."""
    if gate is not None:
        grads["gate"] = dp.to(gate.dtype).view(gate.shape)
        return None
    # sigmoid'. Where it is 0 or NaN (p of 0, 1 or NaN: among them every row whose x holds inf or NaN, which makes
    # the logit inf or NaN) the row passes nothing on, even where dp is inf or NaN (such an x gives u inf).
    slope = probabilities * (1 - probabilities)
    passes = slope > 0
    d_logit = torch.where(passes, dp * slope, 0)
    x_gate = x.to(d_logit.dtype)
    # ...but the matmul still multiplies such a row's x by its 0 (0 * NaN is NaN): those rows leave x first. On
    # the CPU only when the [K] result shows one (one host read; the [M, K] where cost 15% of a token-gate
    # backward at M = 512, K = 1024); elsewhere always, as reading the result would sync.
    reads_host = x.device.type == "cpu" and not torch.compiler.is_compiling()
    grad_weight = x_gate.T @ d_logit if reads_host else None
    if grad_weight is None or not bool(grad_weight.isfinite().all()):
        grad_weight = torch.where(passes[:, None], x_gate, 0).T @ d_logit
    grads["gate_weight"] = grad_weight.to(gate_weight.dtype)
    grads["gate_bias"] = d_logit.sum().to(gate_bias.dtype)
    return d_logit[:, None] * gate_weight.to(d_logit.dtype)[None, :] if need_x else None


def differentiable_backward(grad_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                            scaling: float, gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                            gate_bias: Optional[torch.Tensor], threshold: float, hard: bool, straight_through: bool,
                            need: dict[str, bool]) -> dict[str, torch.Tensor]:
    """The gradients as a differentiable graph (``create_graph=True``): the term recomputed in PyTorch
    and differentiated with ``torch.autograd.grad``. Same shapes and dtypes as ``lora_backward``."""
    names = [name for name in ("x", "lora_a", "lora_b", "gate", "gate_weight", "gate_bias") if need[name]]
    tensors = dict(x=x, lora_a=lora_a, lora_b=lora_b, gate=gate, gate_weight=gate_weight, gate_bias=gate_bias)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        # the saved inputs keep their history under create_graph: the new graph reaches back through them
        term = _term(x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard, straight_through)
        go = grad_out.reshape(term.shape).to(term.dtype)
        found = torch.autograd.grad(term, [tensors[name] for name in names], go, create_graph=True,
                                    allow_unused=True)
    # an input the term does not depend on (a hard gate without straight-through) gets None, as in lora_backward
    return {name: None if grad is None else grad.to(tensors[name].dtype) for name, grad in zip(names, found)}


def _term(x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard, straight_through):
    """``s * g * (x A^T) B^T`` [M, N] in the LoRA weights' dtype, differentiable in every input."""
    compute = lora_a.dtype
    p = _probabilities(x, gate, gate_weight, gate_bias)
    rows = x.to(compute)
    if p is None:
        return (rows @ lora_a.T) @ lora_b.T * scaling
    if hard:
        g = (p >= threshold).to(p.dtype)
        if straight_through:
            g = torch.where(torch.isnan(p), g, p + (g - p).detach())
        else:
            rows = torch.where((g != 0)[:, None], rows, 0)  # closed rows never enter the matmuls
    else:
        g = torch.nan_to_num(p, nan=0.0)
    return ((rows @ lora_a.T) * g[:, None].to(compute)) @ lora_b.T * scaling
