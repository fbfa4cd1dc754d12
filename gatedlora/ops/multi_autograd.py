"""Autograd for ``gated_lora_multi``: the forward runs the selected backend, the backward is PyTorch.

Each row takes one adapter, so the gradients are those of ``gated_lora`` for each adapter with a hard
gate open on that adapter's rows (``autograd.lora_backward``, or ``differentiable_backward`` under
``create_graph=True``), summed over the adapters for x. Base rows give no adapter a gradient; the
adapter index gets none (it is a choice, not a value).
"""
from __future__ import annotations

from typing import Any

import torch

from .autograd import Options, differentiable_backward, lora_backward
from .gates import probability_dtype
from .multi_args import MultiLoraArgs
from .multi_custom_op import gated_lora_multi_add_

# then lora_a..., lora_b...; base_out first of the tensors, as in autograd.INPUTS (a view written in place)
LEADING_INPUTS = ("args", "options", "base_out", "x", "adapter_index")


class GatedLoraMultiFunction(torch.autograd.Function):
    """``gated_lora_multi`` with gradients; the tensors follow ``args`` (base_out as given, x as its [M, K] rows,
    the adapter index, then every lora_a and every lora_b) so that autograd tracks them."""

    @staticmethod
    def forward(ctx: Any, args: MultiLoraArgs, options: Options, base_out: torch.Tensor, x: torch.Tensor,
                adapter_index: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        out = base_out if options.inplace else base_out.clone()
        gated_lora_multi_add_(out, args, options.backend)
        if options.inplace:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, adapter_index, *weights)
        ctx.scaling = args.scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, index, *weights = ctx.saved_tensors
        adapters = len(ctx.scaling)
        leading = dict(zip(LEADING_INPUTS, ctx.needs_input_grad))
        need_x = leading["x"]
        need_weights = ctx.needs_input_grad[len(LEADING_INPUTS):]
        grad_x = None
        grad_weights: list[torch.Tensor | None] = [None] * (2 * adapters)
        for i, scaling in enumerate(ctx.scaling):
            need_a, need_b = need_weights[i], need_weights[adapters + i]
            if not (need_x or need_a or need_b):
                continue
            gate = (index.reshape(-1) == i).to(probability_dtype(x.dtype))  # this adapter's rows, as a hard gate
            lora_a, lora_b = weights[i], weights[adapters + i]
            if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
                need = dict(x=need_x, lora_a=need_a, lora_b=need_b, gate=False, gate_weight=False, gate_bias=False)
                grads = differentiable_backward(grad_out, x, lora_a, lora_b, scaling, gate, None, None, 0.5, True,
                                                False, need)
            else:
                grads = lora_backward(grad_out, x, lora_a, lora_b, scaling, gate, None, None, 0.5, True,
                                      gate_grad=False, need_x=need_x, need_weights=need_a or need_b)
            part = grads.get("x")
            if part is not None:
                grad_x = part if grad_x is None else grad_x + part
            grad_weights[i], grad_weights[adapters + i] = grads.get("lora_a"), grads.get("lora_b")
        if need_x and grad_x is None:
            grad_x = torch.zeros_like(x)
        base_grad = grad_out if leading["base_out"] else None
        return (None, None, base_grad, grad_x if need_x else None, None,
                *(g if need else None for g, need in zip(grad_weights, need_weights)))
