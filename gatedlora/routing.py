"""Routers and per-sequence gate state for single-pass PRISM routing.

One forward pass of a patched model: a pre-hook on the backbone records the attention
mask and whether this call is a decode step (a non-empty KV cache); a forward hook on block
``router_layer`` reads the hidden state at each sequence's last real prompt token (the last
position where ``attention_mask == 1``, so left and right padding both work), runs the
router and stores one probability per sequence; the gated layers after it read that value
for every row of their sequence. Decode steps keep the decision made from the prompt.
Everything stays on the device: no ``.item()`` in the decision.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from .ops.gates import gate_values

# sigmoid(6) = 0.9975: a fresh gate or default router starts open with a wide margin, so the
# freshly patched model computes what PEFT computed until the gate is trained or loaded.
OPEN_LOGIT = 6.0


def open_logit(threshold: float) -> float:
    """A logit whose sigmoid clears ``threshold`` with margin (fresh gates start open)."""
    return max(OPEN_LOGIT, math.log(threshold / (1.0 - threshold)) + 4.0)


class PrismRouter(nn.Module):
    """PRISM's router (paper form): ``Linear(H,128)-GELU-Linear(128,64)-GELU-Linear(64,1)``, sigmoid.

    Maps hidden states [B, H] to probabilities [B]. With ``start_open`` the last layer starts
    at weight 0 and a large bias, so every query goes to the adapter until trained or loaded.
    """

    def __init__(self, hidden_size: int, widths: tuple[int, ...] = (128, 64), start_open: bool = True,
                 threshold: float = 0.5) -> None:
        super().__init__()
        sizes = (hidden_size, *widths)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 1))
        if start_open:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.constant_(self.net[-1].bias, open_logit(threshold))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> probabilities [B]."""
        return torch.sigmoid(self.net(hidden)).squeeze(-1)


class TwoClassRouter(nn.Module):
    """Adapts a two-class router (logits [B, 2], decision by argmax) to probabilities [B].

    Returns ``softmax(logits)[:, 1]``; with threshold 0.5 the decision equals argmax except on
    an exact tie of the two logits (argmax picks class 0, ``p >= 0.5`` opens).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.net(hidden)
        if logits.dim() != 2 or logits.shape[-1] != 2:
            raise ValueError(f"TwoClassRouter: the wrapped router must return logits [B, 2], got {list(logits.shape)}")
        return torch.softmax(logits.float(), dim=-1)[:, 1]


def prism_two_class_router(hidden_size: int, width: int = 256, dropout: float = 0.1) -> TwoClassRouter:
    """PRISM's released router, ``Linear(H,256)-GELU-Dropout-Linear(256,2)`` with argmax, as a gatedlora router."""
    return TwoClassRouter(nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(width, 2)))


def cache_length(cache: Any) -> int:
    """Tokens already in a KV cache (0 for None or an empty cache); handles Cache objects and legacy tuples."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def last_real_positions(attention_mask: torch.Tensor | None, batch: int, length: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """Index of the last position with ``attention_mask == 1`` per sequence. Returns [B] (long).

    attention_mask: [B, T'] with T' >= length (its last ``length`` columns cover this input) or None.
    """
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)  # made there: no copy
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(
            f"sequence routing needs a 2D attention_mask [batch, length] = [{batch}, {length}], "
            f"got {list(attention_mask.shape)}"
        )
    real = attention_mask[:, -length:] != 0
    return length - 1 - real.flip(1).to(torch.int8).argmax(dim=1)


class SequenceRouter(nn.Module):
    """The model's router plus the per-sequence gate state of the current forward pass.

    ``router`` maps [B, H] to probabilities [B]. After a forward pass, ``last_probabilities``
    [B] and ``last_decisions`` [B] (bool, adapter used) describe each sequence of the batch.
    """

    def __init__(self, router: nn.Module, threshold: float, hard: bool) -> None:
        super().__init__()
        self.router = router
        self.threshold = threshold
        self.hard = hard
        self.last_probabilities: torch.Tensor | None = None
        self.last_decisions: torch.Tensor | None = None
        self._gate_probabilities: torch.Tensor | None = None
        self._attention_mask: torch.Tensor | None = None
        self._decoding = False
        self._row_gate_cache: dict[int, torch.Tensor] = {}
        self.all_closed = False  # True only where the host knows it without a device sync
        self.all_open = False  # likewise

    def before_backbone(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the backbone: record the mask and whether this call is a decode step."""
        arguments = _bound_arguments(self.__dict__["_backbone_signature"], args, kwargs)
        cache = arguments.get("cache", arguments.get("past_key_values"))
        self.begin_forward(arguments.get("attention_mask"), decoding=cache_length(cache) > 0)

    def after_router_block(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on block ``router_layer``: decide from its output hidden states."""
        self.route(output[0] if isinstance(output, (tuple, list)) else output)

    def begin_forward(self, attention_mask: torch.Tensor | None, decoding: bool) -> None:
        """Called before each backbone forward: a prefill clears the previous decision."""
        self._attention_mask = attention_mask
        self._decoding = decoding
        if not decoding:
            self.last_probabilities = None
            self.last_decisions = None
            self._gate_probabilities = None
            self.all_closed = self.all_open = False
        self._row_gate_cache = {}

    def route(self, hidden: torch.Tensor) -> None:
        """Decide from block ``router_layer``'s output hidden [B, T, H] (prefill only)."""
        if self._decoding:
            if self.last_probabilities is None:
                raise RuntimeError(
                    "gatedlora: a decode step arrived with no routing decision: run the prompt through the "
                    "patched model (prefill) before decoding with its KV cache"
                )
            if self.last_probabilities.shape[0] != hidden.shape[0]:
                raise RuntimeError(
                    f"gatedlora: decode batch of {hidden.shape[0]} sequences but the prefill routed "
                    f"{self.last_probabilities.shape[0]}"
                )
            return
        if hidden.dim() != 3:
            raise ValueError(f"sequence routing expects block outputs [B, T, H], got {list(hidden.shape)}")
        batch, length = hidden.shape[:2]
        mask = self._attention_mask
        positions = last_real_positions(mask, batch, length, hidden.device).to(hidden.device)
        last_hidden = hidden[torch.arange(batch, device=hidden.device), positions]
        param = next(self.router.parameters(), None)
        if param is not None:
            last_hidden = last_hidden.to(device=param.device, dtype=param.dtype)
        probabilities = self.router(last_hidden)
        if probabilities.numel() != batch:
            raise ValueError(
                f"gatedlora: the router must map hidden states [B, H] = {list(last_hidden.shape)} to "
                f"probabilities [B] = [{batch}], got {list(probabilities.shape)}"
            )
        probabilities = probabilities.reshape(batch).to(hidden.device)
        self.last_probabilities = probabilities
        # a NaN probability closes the gate: the layers get 0 (they reject NaN in given gates on the CPU)
        self._gate_probabilities = torch.nan_to_num(probabilities, nan=0.0)
        self.last_decisions = gate_values(probabilities.detach().float(), self.threshold, True).bool()
        self._row_gate_cache = {}
        # On the CPU the host sees the decision for free: a batch with every gate closed then skips
        # the adapter call (checks, gate gather, nonzero) in every layer. On a GPU reading it would
        # be a host sync, so there the kernel skips on the device instead.
        self.all_closed = self.all_open = False
        if probabilities.device.type == "cpu":
            open_gates = gate_values(self._gate_probabilities.detach(), self.threshold, self.hard) != 0
            self.all_closed = not bool(open_gates.any())
            # all_open serves a hard-gate shortcut (plain LoRA), so it is decided with hard semantics
            # whatever self.hard is: soft routing with p = 0.2 must not open that row under hard gates
            self.all_open = bool((self._gate_probabilities.detach() >= self.threshold).all())

    def row_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's probability repeated over its rows of x [B, ..., K]. Returns [M]."""
        probabilities = self._gate_probabilities
        if probabilities is None:
            raise RuntimeError(
                "gatedlora: sequence gate not decided yet: a gated layer ran before block router_layer, or "
                "outside a forward of the patched model; run the model itself, or use force_gate"
            )
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        batch = probabilities.shape[0]
        if batch == 0 or rows % batch:
            raise RuntimeError(f"gatedlora: a gated layer got x of shape {list(x.shape)} ({rows} rows), which does "
                               f"not split over the {batch} sequences the router decided for: expected x of shape "
                               f"[{batch}, ..., K] (batch first)")
        key = (rows, x.device)  # layers of a model split over devices each get the gates on their own
        cached = self._row_gate_cache.get(key)
        if cached is None:
            cached = probabilities.to(x.device, non_blocking=True).repeat_interleave(rows // batch)
            self._row_gate_cache[key] = cached
        return cached


def _bound_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    extra = {}
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            extra = bound.pop(name)
    return {**extra, **bound}


def install_routing_hooks(backbone: nn.Module, router_block: nn.Module, router: SequenceRouter) -> None:
    """Hook ``backbone`` (mask and cache) and ``router_block`` (decision) with the router's bound methods:
    ``copy.deepcopy`` of the model rebinds them to the copy's router, so a copy routes itself."""
    router.__dict__["_backbone_signature"] = inspect.signature(backbone.forward)
    backbone.register_forward_pre_hook(router.before_backbone, with_kwargs=True)
    router_block.register_forward_hook(router.after_router_block)


def remove_routing_hooks(modules: list[nn.Module], router: SequenceRouter) -> None:
    """Remove every hook of ``router`` from ``modules`` (by identity: handles do not survive a deepcopy)."""
    for module in modules:
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__self__", None) is router:
                    del hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_with_kwargs.pop(key, None)
