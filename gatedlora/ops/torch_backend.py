"""The torch backend: the CPU path and the fallback everywhere.

The skip branch is real: the LoRA matmuls run on the open rows only (gathered with
``index_select``), so 6% open rows cost about 6% of the LoRA work, and a batch with no
open row runs no LoRA matmul. Finding the open rows needs ``nonzero`` (a host sync on a
GPU); the triton and cuda backends skip on the device instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import Backend, register_backend
from .checks import GatedLoraArgs
from .gates import gate_values, probability_dtype, token_gate_probabilities


def _add_rows(out: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor | None) -> None:
    """out[rows] += delta, with PEFT's dtype rule: add in the promoted dtype, store in out's dtype."""
    if rows is None:
        if delta.dtype == out.dtype:
            out.add_(delta)
        else:
            out.copy_(out + delta)
        return
    if delta.dtype == out.dtype:
        out.index_add_(0, rows, delta)
    else:
        out.index_copy_(0, rows, (out.index_select(0, rows) + delta).to(out.dtype))


class TorchBackend(Backend):
    name = "torch"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        return []

    def add_into(self, out: torch.Tensor, args: GatedLoraArgs) -> None:
        x = args.x
        if args.gate_weight is not None:
            probabilities = token_gate_probabilities(x, args.gate_weight, args.gate_bias)
        elif args.gate is not None:
            probabilities = args.gate.reshape(-1).to(probability_dtype(x.dtype))
        else:
            probabilities = None
        lora_x = x.to(args.lora_a.dtype)
        if probabilities is None:
            _add_rows(out, F.linear(F.linear(lora_x, args.lora_a), args.lora_b) * args.scaling, None)
            return
        if args.hard:  # NaN >= threshold is False: NaN closes
            open_rows = (probabilities >= args.threshold).nonzero().flatten()
        else:
            g = gate_values(probabilities, args.threshold, args.hard)
            open_rows = (g != 0).nonzero().flatten()
        if open_rows.numel() == 0:
            return
        all_open = open_rows.numel() == x.shape[0]
        rows_x = lora_x if all_open else lora_x.index_select(0, open_rows)
        delta = F.linear(F.linear(rows_x, args.lora_a), args.lora_b) * args.scaling
        if not args.hard:
            g_open = g if all_open else g.index_select(0, open_rows)
            delta = delta * g_open[:, None].to(delta.dtype)
        _add_rows(out, delta, None if all_open else open_rows)


register_backend(TorchBackend())
