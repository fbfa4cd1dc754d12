"""Autograd for ``gated_lora``: the forward runs the selected backend, the backward is PyTorch.

    y_m = base_m + s * g_m * Δ_m,   Δ_m = B (A x_m),   g_m = gate(p_m)

Backward, with ``go`` = dL/dy [M, N], ``u = x A^T`` [M, r] and ``w_m`` the forward gate value
(1 without a gate, p_m soft, 0/1 hard):

    dL/dbase = go                         dL/dB = s (w ⊙ go)^T u
    dL/du    = s (w ⊙ go) B               dL/dA = (dL/du)^T x          dL/dx += (dL/du) A
    dL/dg_m  = s <go_m B, u_m>            (only where the gate gets a gradient, see below)

A closed row (w_m = 0) adds nothing to dL/dA, dL/dB or the LoRA part of dL/dx: with hard gates on
the CPU those rows are left out of the matmuls (as the torch backend's forward leaves them out), on
other devices they are multiplied by 0 (no host sync). Gate gradients: soft gates get the exact
derivative; hard gates get ``dL/dp = dL/dg`` (straight-through estimator) when
``straight_through=True`` and none otherwise. A NaN probability closes the gate and gets no gradient.
Token gates ``p = sigmoid(x . w_g + b_g)`` chain ``dL/dp`` into x, w_g and b_g in the probability
dtype (fp32, fp64 for fp64 inputs).

Why the backward is PyTorch on every backend: it is five rank-r matmuls, each one cuBLAS/MKL call;
a fused kernel could save the second reads of ``go`` and ``x`` (the base layer's own backward reads
both again anyway). The backward recomputes ``u`` rather than saving it: the triton kernel never
materialises it, and M*K*r FLOPs are cheap next to the base layer's backward (M*K*N). Measured on
2 CPU cores (fp32, one 1024x1024 layer, r=16, M=512, every row open, forward+backward): 18.5 ms
against PEFT LoRA's 19.4-20.8 ms; an earlier version that scaled ``go`` [M, N] by the gate and summed
dL/dx into a zero tensor took 22.2-23.4 ms, so both of those now happen on [M, r] tensors or not at all.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .custom_op import add_into_rows, call_op
from .gates import gate_values, probability_dtype, token_gate_probabilities


def add_gated_term(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                   gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                   gate_bias: "float | torch.Tensor", threshold: float, hard: bool, backend: str) -> None:
    """Add the gated LoRA term into ``out`` [..., N] in place, with no autograd (the op's forward).

    x: [..., K] (same leading dims as out); gate: [M] or x.shape[:-1]; gate_weight: [K].
    Inputs must already have passed ``checks.check_inputs``.
    """
    k, n = x.shape[-1], out.shape[-1]
    x_rows = x.reshape(-1, k)
    gate_rows = None if gate is None else gate.reshape(-1)
    try:
        out_rows = out.view(-1, n)
        copy_back = False
    except RuntimeError:  # a non-contiguous layout that cannot be viewed as rows
        out_rows = out.reshape(-1, n).clone()
        copy_back = True
    # The registered op keeps torch.compile graphs whole; eager calls skip the dispatcher round trip.
    if torch.compiler.is_compiling():
        call_op(out_rows, x_rows, lora_a, lora_b, scaling, gate_rows, gate_weight, gate_bias, threshold, hard, backend)
    else:
        add_into_rows(out_rows, x_rows, lora_a, lora_b, scaling, gate_rows, gate_weight, gate_bias,
                      threshold, hard, backend)
    if copy_back:
        out.copy_(out_rows.view(out.shape))


def _gate_gradient_wanted(ctx: Any, gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                          hard: bool, straight_through: bool) -> bool:
    """True when some input needs dL/dp: the given gate, or x/w_g/b_g of a token gate."""
    need = ctx.needs_input_grad
    if gate is not None:
        wanted = need[5]
    elif gate_weight is not None:
        wanted = need[0] or need[6] or need[7]
    else:
        return False
    return wanted and (not hard or straight_through)


class GatedLoraFunction(torch.autograd.Function):
    """``gated_lora`` with gradients; arguments as in ``gated_lora`` (one extra, ``straight_through``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base_out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                gate_bias: "float | torch.Tensor", threshold: float, hard: bool, straight_through: bool,
                backend: str, inplace: bool) -> torch.Tensor:
        out = base_out if inplace else base_out.clone()
        if x.shape[:-1].numel() and out.shape[-1]:
            add_gated_term(out, x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard, backend)
        if inplace:
            ctx.mark_dirty(out)
        bias_tensor = gate_bias if isinstance(gate_bias, torch.Tensor) else None
        ctx.save_for_backward(x, lora_a, lora_b, gate, gate_weight, bias_tensor)
        ctx.options = (float(scaling), float(gate_bias) if bias_tensor is None else 0.0, float(threshold),
                       bool(hard), bool(straight_through))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, lora_a, lora_b, gate, gate_weight, bias_tensor = ctx.saved_tensors
        scaling, bias_value, threshold, hard, straight_through = ctx.options
        grads = lora_backward(
            grad_out, x, lora_a, lora_b, scaling, gate, gate_weight,
            bias_tensor if bias_tensor is not None else bias_value, threshold, hard,
            gate_grad=_gate_gradient_wanted(ctx, gate, gate_weight, hard, straight_through),
            need_x=ctx.needs_input_grad[0], need_weights=ctx.needs_input_grad[2] or ctx.needs_input_grad[3],
        )
        need = ctx.needs_input_grad
        return (
            grads.get("x"),
            grad_out if need[1] else None,
            grads["lora_a"] if need[2] else None,
            grads["lora_b"] if need[3] else None,
            None,
            grads.get("gate") if need[5] else None,
            grads.get("gate_weight") if need[6] else None,
            grads.get("gate_bias") if need[7] else None,
            None, None, None, None, None,
        )


def lora_backward(
    grad_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
    gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor], gate_bias: "float | torch.Tensor",
    threshold: float, hard: bool, gate_grad: bool, need_x: bool = True, need_weights: bool = True,
    select_rows: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Gradients of ``gated_lora`` w.r.t. x (if ``need_x``), lora_a and lora_b (if ``need_weights``)
    and the gate inputs (if ``gate_grad``).

    grad_out: [..., N]; x: [..., K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] or x.shape[:-1];
    gate_weight: [K]; gate_bias: float or a tensor with one element. Returns a dict of gradients
    shaped and typed like their inputs. ``select_rows`` (default: hard gates on the CPU) leaves
    closed rows out of the LoRA matmuls instead of multiplying them by 0; both give the same result.
    """
    k, n = x.shape[-1], grad_out.shape[-1]
    x_rows = x.reshape(-1, k)
    compute = lora_a.dtype  # the forward computes the LoRA term in the weights' dtype, as PEFT does
    with torch.autocast(x.device.type, enabled=False):
        go = grad_out.reshape(-1, n).to(compute)
        lora_x = x_rows.to(compute)
        probabilities = None
        if gate_weight is not None:
            probabilities = token_gate_probabilities(x_rows.detach(), gate_weight.detach(),
                                                     gate_bias.detach() if isinstance(gate_bias, torch.Tensor) else gate_bias)
        elif gate is not None:
            probabilities = gate.detach().reshape(-1).to(probability_dtype(x.dtype))
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
            grad_x = _gate_input_grads(grads, dp, probabilities, x_rows, gate, gate_weight, gate_bias, need_x)

        if need_x or need_weights:
            if select_rows is None:
                select_rows = hard and x.device.type == "cpu" and not torch.compiler.is_compiling()
            rows = (g != 0).nonzero().flatten() if g is not None and select_rows else None
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))  # noqa: E731
            # The per-row factor s * g scales the [M', r] products, never go [M', N] (r << N).
            if g is None or (hard and rows is not None):
                factor = scaling
            else:
                factor = pick(g).to(compute)[:, None] * scaling
            rows_x = pick(lora_x)
            u = rows_x @ lora_a.T if u_all is None else pick(u_all)           # [M', r]
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
        grads["x"] = (torch.zeros_like(x_rows) if grad_x is None else grad_x).to(x.dtype).view(x.shape)
    return grads


def _gate_input_grads(grads: dict, dp: torch.Tensor, probabilities: torch.Tensor, x_rows: torch.Tensor,
                      gate: Optional[torch.Tensor], gate_weight: Optional[torch.Tensor],
                      gate_bias: "float | torch.Tensor", need_x: bool) -> Optional[torch.Tensor]:
    """Chain dL/dp [M] into the given gate, or into w_g, b_g of a token gate (into ``grads``); returns a
    token gate's part of dL/dx [M, K] in the probability dtype when ``need_x``, else None."""
    if gate is not None:
        grads["gate"] = dp.to(gate.dtype).view(gate.shape)
        return None
    # sigmoid'; a NaN probability (closed gate) passes no gradient on, rather than NaN
    d_logit = torch.where(torch.isnan(probabilities), torch.zeros_like(dp), dp * probabilities * (1 - probabilities))
    grads["gate_weight"] = (x_rows.to(d_logit.dtype).T @ d_logit).to(gate_weight.dtype)
    if isinstance(gate_bias, torch.Tensor):
        grads["gate_bias"] = d_logit.sum().to(gate_bias.dtype).view(gate_bias.shape)
    return d_logit[:, None] * gate_weight.to(d_logit.dtype)[None, :] if need_x else None
