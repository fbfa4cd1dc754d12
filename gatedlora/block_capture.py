"""The hidden states after one block, the forward stopped there: the router's input.

``capture_and_stop`` is a forward hook for that block. Inside ``output_of_block(run)`` it keeps the
block's output and raises, so nothing after the block runs (the later blocks, the final norm, the LM
head); elsewhere it does nothing, so it may stay registered. What it keeps lives in a context variable:
concurrent forwards (threads) each read their own.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable

import torch
from torch import nn

_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("gatedlora_block_capture", default=None)


class _StopForward(Exception):
    """Raised once the hooked block has run."""


def capture_and_stop(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook: inside ``output_of_block``, keep the block's output (hidden states [B, T, H]) and stop."""
    captured = _captured.get()
    if captured is not None:
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        raise _StopForward


def output_of_block(run: Callable[[], Any]) -> torch.Tensor | None:
    """Call ``run`` (a forward through a block hooked with ``capture_and_stop``); the block's output
    [B, T, H], or None if the block did not run."""
    token = _captured.set([])
    try:
        try:
            run()
        except _StopForward:
            pass
        captured = _captured.get()
    finally:
        _captured.reset(token)
    return captured[0] if captured else None
