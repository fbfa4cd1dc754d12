"""Routers and single-pass PRISM routing.

One forward pass of a patched model: the backbone's forward wrapper opens a per-call state
(the attention mask; the decision of the KV cache this forward extends, if it extends one); a
forward hook on block ``router_layer`` reads the hidden state at each sequence's last real
prompt token (the last position where ``attention_mask == 1``, so left and right padding both
work) and runs the router, unless the forward continues a decision; the gated layers after it
read each sequence's gate for its rows. A completed prefill leaves its decision on its KV cache,
so every later step of that generation uses it, whatever else ran on the model in between
(``call_state`` holds where each piece of state lives and why). The decision stays on the
device: no ``.item()``, no host sync, nothing a compiled graph would break on.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import math
import threading
import types
import weakref
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from .call_state import (ForwardState, RouteDecision, attach_routes, continues, generating, holds_tokens, host_facts,
                         in_backward, output_cache, routes_on, thread_slot)
from .config import GatedLoraConfig
from .module_hooks import hooked
from .ops.args import PROBABILITY_CEILING, check_loaded, is_threshold
from .ops.gates import probability_dtype

# sigmoid(6) = 0.9975: a fresh gate or default router starts open with a wide margin, so the
# freshly patched model computes what PEFT computed until the gate is trained or loaded.
OPEN_LOGIT = 6.0


# KV caches of Transformers' continuous batching (generate_batch, cache_implementation="paged"): every request packed
# into one row [1, total tokens], whose sequences a per-sequence router cannot tell apart (a review found each
# request routed by the last packed token, and the route changing at every step). Named, not imported: a
# Transformers version without continuous batching has no such class to import.
PACKED_CACHES = ("PagedAttentionCache",)


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
        """hidden: [B, H] -> probabilities [B], fp32: the sigmoid runs in fp32 (as TwoClassRouter's softmax), so a
        bf16 router's decision rests on its logit, not on p rounded to bf16 (a logit of -0.001, p = 0.49975,
        rounded to 0.5 and opened at the default threshold)."""
        return torch.sigmoid(self.net(hidden).float()).squeeze(-1)


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


class PrismMultiRouter(nn.Module):
    """PRISM's router MLP with one output per route, for several adapters: ``Linear(H,128)-GELU-Linear(128,64)-
    GELU-Linear(64,routes)``. Maps hidden states [B, H] to logits [B, routes]: route 0 the base model, route i
    adapter i - 1; a sequence takes the argmax.

    ``start_route`` (default 1, the first adapter): the last layer starts at weight 0 and a bias of
    ``OPEN_LOGIT`` (6) on that route, 0 on the others, so every sequence takes it (softmax probability
    ``e^6 / (e^6 + routes - 1)``, 0.990 with 4 adapters) until the router is trained or loaded. None: the
    last layer keeps PyTorch's random initialisation.
    """

    def __init__(self, hidden_size: int, routes: int, widths: tuple[int, ...] = (128, 64),
                 start_route: int | None = 1) -> None:
        super().__init__()
        if routes < 2:
            raise ValueError(f"PrismMultiRouter: routes must be at least 2 (the base model and an adapter), got "
                             f"{routes}")
        sizes = (hidden_size, *widths)
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], routes))
        if start_route is not None:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
            with torch.no_grad():
                self.net[-1].bias[start_route] = OPEN_LOGIT

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] -> logits [B, routes]."""
        return self.net(hidden)


def router_output(router: nn.Module, hidden: torch.Tensor, caller: str = "gatedlora") -> torch.Tensor:
    """``router(hidden)``: hidden [B, H] -> probabilities [B] (one adapter) or logits [B, N + 1]; TypeError naming
    what came back where that is not a tensor (a Transformers-style module returns a tuple or an output object)."""
    output = router(hidden)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{caller}: the router must return a tensor (probabilities [B] for one adapter, logits "
                        f"[B, N + 1] for N adapters) from hidden states [B, H] = {list(hidden.shape)}, got "
                        f"{type(output).__name__}")
    return output


def check_probabilities(probabilities: torch.Tensor) -> None:
    """ValueError naming the sequences where a one-adapter router's output [B] (CPU) is outside [0, 1] (NaN, which
    closes the gate, passes; rounding up to ``PROBABILITY_CEILING`` too): a router that returns logits would
    otherwise open wherever a logit reached the threshold. Not on a GPU, where reading would sync (as for a
    caller's gate tensor)."""
    values = probabilities.detach().tolist()
    outside = [i for i, p in enumerate(values) if p < 0 or p > PROBABILITY_CEILING]
    if outside:
        raise ValueError(
            f"gatedlora: the router must return probabilities in [0, 1] (a sigmoid's output), got "
            f"{[values[i] for i in outside[:4]]} for sequences {outside[:4]}{' ...' if len(outside) > 4 else ''}; "
            "a router that returns logits needs a sigmoid (two-class logits: TwoClassRouter)")


def check_route_logits(logits: torch.Tensor, batch: int, adapters: list[str], caller: str = "gatedlora") -> None:
    """ValueError unless a router for ``adapters`` gave logits [batch, N + 1] (N adapters)."""
    routes_count = len(adapters) + 1
    if tuple(logits.shape) != (batch, routes_count):
        raise ValueError(
            f"{caller}: with adapters={adapters} the router must map hidden states [B, H] to logits [B, {routes_count}]"
            f" = [{batch}, {routes_count}] (class 0 the base model, class i adapters[i - 1]), got {list(logits.shape)}")


def routes_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each sequence's route from router logits [B, routes]: the argmax; a row holding a NaN goes to the base
    model (route 0), as a NaN probability closes a one-adapter gate. Returns [B] (long)."""
    return torch.argmax(logits, dim=-1).masked_fill_(torch.isnan(logits).any(dim=-1), 0)


class PrismTwoClassRouter(TwoClassRouter):
    """PRISM's released router, ``Linear(H,256)-GELU-Dropout-Linear(256,2)``, as a ``TwoClassRouter``. A class of
    its own so that a save names it: a ``TwoClassRouter`` around a user's net may have the same parameter names
    and shapes (``Linear-ReLU-Dropout-Linear``) and compute something else, so only this one is rebuilt from a
    save without its user."""

    def __init__(self, hidden_size: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__(nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(width, 2)))


def prism_two_class_router(hidden_size: int, width: int = 256, dropout: float = 0.1) -> PrismTwoClassRouter:
    """PRISM's released router, ``Linear(H,256)-GELU-Dropout-Linear(256,2)`` with argmax, as a gatedlora router
    (hidden states [B, H] -> probabilities of the adapter [B])."""
    return PrismTwoClassRouter(hidden_size, width, dropout)


def prefill_mask(attention_mask: Any) -> Any:
    """The attention mask as the router reads it. Models whose config names ``layer_types`` (Qwen2, Gemma2, ...)
    are passed one prepared mask per attention type by generate() with a static cache, as a dict: each marks the
    same real tokens (the full-attention one is taken where present; None there means no padding)."""
    if isinstance(attention_mask, dict):
        if "full_attention" in attention_mask:
            return attention_mask["full_attention"]
        return next((mask for mask in attention_mask.values() if mask is not None), None)
    return attention_mask


def last_real_positions(attention_mask: Any, batch: int, length: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """Index of the last real position (``attention_mask == 1``) of this input per sequence. Returns [B] (long).

    This input is a prefill on an empty cache (a routing decision is made only there: ``run_backbone``), so
    it fills the masks' first ``length`` positions. attention_mask: [B, T'] with T' >= length (T' > length:
    padded on the right to a static cache's length, as BLOOM's generate() does), or a prepared mask
    [B, heads or 1, length, S] (generate() with a static cache passes one: True or 0 where a query attends),
    or a dict of those per attention type (``prefill_mask``), or None.
    """
    attention_mask = prefill_mask(attention_mask)
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)  # made there: no copy
    if attention_mask.dim() == 4 and attention_mask.shape[0] == batch and attention_mask.shape[-2] in (length, 1) \
            and attention_mask.shape[-1] >= length:
        if attention_mask.shape[-2] == length:
            # A real token attends to itself and a padding one never does (padding is masked as a key), whether
            # the padding is left or right and the mask full or sliding-window: the diagonal marks the real
            # tokens. (A row of left padding that attends to nothing may be unmasked whole by transformers for
            # SDPA; such rows come before the first real token, so the last real one is still found.)
            keys = torch.diagonal(attention_mask[:, 0, :, :length], dim1=-2, dim2=-1)
        else:  # one row for every query: a padding mask over the keys
            keys = attention_mask[:, 0, 0, :length]
        real = keys if keys.dtype == torch.bool else keys == 0
    elif attention_mask.dim() == 2 and attention_mask.shape[0] == batch and attention_mask.shape[1] >= length:
        real = attention_mask[:, :length] != 0
    else:
        raise ValueError(
            f"sequence routing needs a 2D attention_mask [batch, length] = [{batch}, {length}] (or a prepared 4D "
            f"mask [{batch}, heads, {length}, keys]), got {list(attention_mask.shape)}"
        )
    return length - 1 - real.flip(1).to(torch.int8).argmax(dim=1)


def last_real_hidden(hidden: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    """hidden [B, T, H] at each sequence's last real position (``last_real_positions``). Returns [B, H].

    Where the host can see for free (a CPU mask, eager) that every sequence's last position is real (no
    padding, or left padding), that is ``hidden[:, -1]``: one view instead of seven small ops, which run
    right after block router_layer's matmuls and cost 2-3x there (0.13 ms of a 7 ms prefill at batch 1)."""
    batch, length = hidden.shape[:2]
    attention_mask = prefill_mask(attention_mask)
    if attention_mask is None:
        return hidden[:, -1]
    if attention_mask.dim() == 2 and not attention_mask.is_cuda and not torch.compiler.is_compiling() \
            and attention_mask.shape[0] == batch and attention_mask.shape[1] >= length \
            and bool(attention_mask[:, length - 1].all()):
        return hidden[:, -1]
    positions = last_real_positions(attention_mask, batch, length, hidden.device).to(hidden.device)
    return hidden[torch.arange(batch, device=hidden.device), positions]


_ROUTER_KEYS = itertools.count()


class _RoutedPrompt(Exception):
    """Raised after block ``router_layer`` in a routing-only pass (before a chunked prefill)."""

    def __init__(self, decision: RouteDecision) -> None:
        super().__init__("gatedlora routing-only pass")
        self.decision = decision


class SequenceRouter(nn.Module):
    """The model's router network and threshold. The routes belong to each call, not to this module.

    ``router`` maps [B, H] to probabilities [B] (one adapter), or to logits [B, N + 1] with
    ``config.adapters`` naming N adapters (route 0 the base model, route i ``adapters[i - 1]``, argmax).
    A prefill's decision (a ``RouteDecision``) travels with that generation's KV cache:
    ``routes_of(cache)`` returns it, and every forward that extends the cache uses it.
    ``last_probabilities`` ([B] fp32; [B, N + 1] with several adapters, the softmax of the logits),
    ``last_decisions`` ([B] bool, an adapter used) and ``last_routes`` ([B] long, 0 the base model, i
    ``adapters[i - 1]``; with one adapter 1 is the adapter) are those of the last forward that completed
    in the calling thread (None before one).
    """

    def __init__(self, router: nn.Module, config: GatedLoraConfig) -> None:
        super().__init__()
        self.router = router
        self.__dict__["config"] = config  # the patch's own config (not a submodule): one place for the threshold
        self._fresh_identity()

    @property
    def threshold(self) -> float:
        """Hard gates open where ``p >= threshold``. Settable after patching; a generation keeps the threshold
        of its prefill, and ``gatedlora.save_pretrained`` saves the one in force."""
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        # (GatedLoraConfig's rules, with this attribute's name in the message)
        if not is_threshold(value):
            raise ValueError(f"get_router(model).threshold must be a number in (0, 1), above 0 in fp32, got {value!r}")
        if self.config.adapters is not None and value != self.config.threshold:
            raise ValueError(f"get_router(model).threshold: routes among several adapters are hard (argmax), so "
                             f"a threshold ({value!r}) does not apply")
        self.config.threshold = replace(self.config, threshold=value).threshold

    @property
    def hard(self) -> bool:
        return self.config.hard

    def _fresh_identity(self) -> None:
        """The key this router's routes carry on caches, and its per-thread slots: ``forward`` (the
        ForwardState of the forward running in the thread), ``last`` (the decision of its last completed
        forward), ``for_backward`` (its last forward that recorded gradients), ``pending`` and ``route_only``
        (chunked prefill). A copy gets its own of both."""
        self.__dict__["_key"] = next(_ROUTER_KEYS)
        self.__dict__["_threads"] = threading.local()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_threads", None)  # a threading.local cannot be copied or pickled
        state.pop("_for_backward", None)  # a forward's graph (non-leaf tensors) cannot be either
        state.pop("_kept_steps", None)  # derived from the layers' weights, keyed by ids a copy does not share
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._fresh_identity()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "SequenceRouter":
        # model.to / .half: the routed layers drop their kept records (RoutedLoRALinear._apply); the steps joining
        # them go too, rather than hold the old copies until a forward replaces them
        self.__dict__.pop("_kept_steps", None)
        return super()._apply(fn, *args, **kwargs)

    # --- the routes, for users -----------------------------------------------------------------

    @property
    def last_probabilities(self) -> torch.Tensor | None:
        last = thread_slot(self._threads, "last")
        return None if last is None else last.probabilities

    @property
    def last_decisions(self) -> torch.Tensor | None:
        last = thread_slot(self._threads, "last")
        return None if last is None else last.decisions

    @property
    def last_routes(self) -> torch.Tensor | None:
        last = thread_slot(self._threads, "last")
        return None if last is None else last.routes

    @property
    def adapters(self) -> list[str] | None:
        """The adapters the router chooses among (route i is ``adapters[i - 1]``), or None with one adapter."""
        return self.config.adapters

    def routes_of(self, cache: Any) -> RouteDecision | None:
        """The decision this router made for the generation that ``cache`` belongs to: a KV cache, or the
        output of the model or of ``generate(..., return_dict_in_generate=True)`` that holds one. None if
        it has none."""
        held = output_cache(cache)
        return routes_on(cache if held is None else held, self._key)

    # --- the routes, for the gated layers (inside a forward) -------------------------------------

    def forward_state(self) -> ForwardState | None:
        """The state of the backbone's forward running in this thread (None outside one)."""
        return getattr(self._threads, "forward", None)  # set in every thread that ran a forward: a fast read

    def kept_steps(self) -> dict:
        """The routed layers' kept records of each decision checked together (``kept_call.checked_records``), by the
        decision's id."""
        steps = self.__dict__.get("_kept_steps")
        if steps is None:
            steps = self.__dict__["_kept_steps"] = {}
        return steps

    def in_force(self) -> RouteDecision | None:
        """The decision of the forward running in this thread (None before block ``router_layer``, or
        outside a forward). One read of the thread's slot: the gated layers call it once per call."""
        state = self.forward_state()
        if state is None and in_backward():
            state = self._recorded_forward()
        return None if state is None else state.decision

    def _recorded_forward(self) -> ForwardState | None:
        """The forward whose blocks gradient checkpointing recomputes in this backward: the last forward that
        recorded gradients in this thread (on the CPU autograd runs the backward in the thread that called
        it, so another thread's forward meanwhile does not count), else, on autograd's device threads,
        where no forward ran, the last one of any thread."""
        state = thread_slot(self._threads, "for_backward")
        return state if state is not None else self.__dict__.get("_for_backward")

    def decision(self) -> RouteDecision:
        """``in_force()``, raising when there is none."""
        decision = self.in_force()
        if decision is None:
            raise RuntimeError(
                "gatedlora: sequence gate not decided yet: a gated layer ran before block router_layer, or "
                "outside a forward of the patched model; run the model itself, or use force_gate"
            )
        return decision

    # --- hooks ---------------------------------------------------------------------------------

    def run_backbone(self, forward: Callable, names: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
        """The backbone's forward with this call's ForwardState in the thread's slot (restored however
        the forward ends); a completed forward leaves its decision on its KV cache and as ``last_*``."""
        arguments = {**dict(zip(names, args)), **kwargs} if args else kwargs
        cache = arguments.get("cache", arguments.get("past_key_values"))
        threads = self._threads
        decision = routes_on(cache, self._key)
        continuing = decision is not None and continues(cache)
        if not continuing:
            if cache is not None and type(cache).__name__ in PACKED_CACHES:
                raise RuntimeError(
                    f"gatedlora: sequence gates cannot run with a {type(cache).__name__} (continuous batching: "
                    "model.generate_batch(), or generate(cache_implementation='paged')): it packs every request "
                    "into one row, so the router cannot tell the sequences apart and would route them all as one. "
                    "Use generate() with a dynamic or static cache, or token gates (GatedLoraConfig(gate='token'))")
            if cache is not None and holds_tokens(cache):
                raise RuntimeError(
                    "gatedlora: this KV cache holds tokens but no routing decision of this model: it was filled "
                    "by another model, or by this one before patching. Run the prompt through the patched model "
                    "(prefill) with a fresh cache; a decode step uses the decision made at its prefill")
            decision = thread_slot(threads, "pending")  # chunked prefill: the whole prompt's decision
            if decision is not None:
                threads.pending = None  # for the first chunk only
        state = ForwardState(arguments.get("attention_mask"), decision, continuing)
        previous = thread_slot(threads, "forward")
        threads.forward = state
        try:
            output = forward(*args, **kwargs)
        finally:
            threads.forward = previous
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # see _recorded_forward; inference (no_grad) never writes them
            threads.for_backward = self.__dict__["_for_backward"] = state
        if state.decision is not None:
            if not continuing and cache is not None:
                attach_routes(cache, self._key, state.decision)
            produced = output_cache(output)
            if produced is not None and produced is not cache:  # made by the model, or a new legacy tuple
                attach_routes(produced, self._key, state.decision)
            threads.last = state.decision
        return output

    def after_router_block(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on block ``router_layer``: decide from its output hidden states (prefill), or
        check that the decision this forward continues fits its batch."""
        state = thread_slot(self._threads, "forward")
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if state is None:
            recorded = self._recorded_forward() if in_backward() else None
            if recorded is not None:
                # gradient checkpointing recomputes this block (with its hooks, in older transformers) in the
                # backward: run the router again so its saved tensors are recomputed; the decision stands
                self.decide(hidden, recorded.attention_mask)
            return  # else the block ran outside a forward of the backbone: nothing to decide for
        if state.decision is None:
            state.decision = self.decide(hidden, state.attention_mask)
            if thread_slot(self._threads, "route_only"):
                raise _RoutedPrompt(state.decision)
        elif state.decision.batch != hidden.shape[0]:
            raise RuntimeError(
                f"gatedlora: a forward of {hidden.shape[0]} sequences extends a KV cache whose prefill routed "
                f"{state.decision.batch}")

    def decide(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> RouteDecision:
        """Route from block ``router_layer``'s output hidden [B, T, H] at each sequence's last real token."""
        if hidden.dim() != 3:
            raise ValueError(f"sequence routing expects block outputs [B, T, H], got {list(hidden.shape)}")
        batch, length = hidden.shape[:2]
        last_hidden = last_real_hidden(hidden, attention_mask)
        param = next(self.router.parameters(), None)
        if param is not None:
            if param.is_meta:  # offloaded: accelerate's hooks on the router's modules load them and move the input
                if not any(hooked(module) for module in self.router.modules()):
                    check_loaded((param,), last_hidden, "gatedlora", "the router's weights")
                last_hidden = last_hidden.to(dtype=param.dtype)
            else:
                last_hidden = last_hidden.to(device=param.device, dtype=param.dtype)
        try:
            output = router_output(self.router, last_hidden)
        except RuntimeError as err:  # a router built for another width, say: name what it was given
            raise RuntimeError(f"gatedlora: the router failed on the hidden states after block "
                               f"{self.config.router_layer}, [B, H] = {list(last_hidden.shape)} "
                               f"({last_hidden.dtype}): {err}") from err
        if self.config.adapters is not None:
            return self._decide_route(output, batch, hidden)
        probabilities = output
        if probabilities.numel() != batch:
            raise ValueError(
                f"gatedlora: the router must map hidden states [B, H] = {list(last_hidden.shape)} to "
                f"probabilities [B] = [{batch}], got {list(probabilities.shape)}"
            )
        # One precision for every decision, the kernels' (fp32): a bf16 router's p compared in bf16 on the
        # host but in fp32 in the layers would route a sequence at the threshold by its batch-mates.
        if probabilities.dim() != 1:
            probabilities = probabilities.reshape(batch)
        probabilities = probabilities.to(hidden.device, probability_dtype(hidden.dtype))
        # a NaN probability closes the gate: the layers get 0 (they reject NaN in given gates on the CPU)
        gates = torch.nan_to_num(probabilities, nan=0.0)
        threshold = self.threshold  # read once: another thread may set it meanwhile
        decisions = probabilities >= threshold  # gate_values' hard rule (NaN: False), as bool (no graph)
        hard = self.hard
        facts = (False, False, None, False)
        # On the CPU the host sees the decision for free: a batch with every gate closed then skips the
        # adapter call (checks, gate gather, nonzero) in every layer. On a GPU reading it would be a host
        # sync, and in a compiled graph a graph break, so there the kernel skips on the device instead.
        # One read of the decisions serves all three facts: each op here runs right after block
        # router_layer's matmuls, where it costs 2-3x its cost alone (the whole decision took 0.47 ms of a
        # 7.3 ms prefill at batch 1 before, most of it in small ops).
        if gates.device.type == "cpu" and not torch.compiler.is_compiling():
            check_probabilities(probabilities)
            facts = host_facts(decisions, gates, hard)
        return RouteDecision(probabilities, gates, decisions, threshold, *facts, hard=hard)

    def _decide_route(self, logits: torch.Tensor, batch: int, hidden: torch.Tensor) -> RouteDecision:
        """Several adapters: each sequence's route from the router's logits [B, N + 1] (argmax, in fp32)."""
        check_route_logits(logits, batch, self.config.adapters)
        # fp32, as one-adapter decisions: the same route whatever the router's dtype
        logits = logits.to(hidden.device, probability_dtype(hidden.dtype))
        routes = routes_from_logits(logits.detach())
        decisions = routes != 0
        uniform = None
        # On the CPU the host sees for free when every sequence takes one route: the layers then run plain
        # LoRA with that adapter (or the base layer alone). On a GPU reading it would sync.
        if routes.device.type == "cpu" and not torch.compiler.is_compiling():
            first = int(routes[0]) if batch else 0
            uniform = first if bool((routes == first).all()) else None
        return RouteDecision(torch.softmax(logits, dim=-1), decisions.to(logits.dtype), decisions, self.threshold,
                             all_closed=uniform == 0, multi_routes=routes, uniform_route=uniform, hard=self.hard)

    def generate_whole_prompt_routed(self, generate: Callable, args: tuple, kwargs: dict, unnamed: tuple,
                                     routing_pass: dict) -> Any:
        """``generate(*args, **kwargs)`` routed from the last real token of the whole prompt, where its first
        forward is not a plain prefill of the prompt: a chunked prefill (the first chunk's last token), or
        assisted generation (transformers 5 runs the prompt and the draft's first candidates in one forward,
        whose last token is a guessed one).

        Blocks ``0..router_layer`` carry no adapter, so a routing-only pass over the whole prompt (a plain,
        unchunked and unassisted generate of it: positional arguments ``unnamed``, named ones ``routing_pass``;
        stopped after block ``router_layer``) gives the decision that the plain generation makes; the first
        forward of the generation then adopts it. The pass costs blocks ``0..router_layer`` once more and
        holds their activations for the whole prompt. A generation that continues a cache that holds tokens
        keeps that cache's decision instead.
        """
        cache_key = next((k for k in ("cache", "past_key_values") if routing_pass.get(k) is not None), None)
        if cache_key is not None and holds_tokens(routing_pass[cache_key]):
            return generate(*args, **kwargs)
        if cache_key is not None:
            routing_pass = {**routing_pass, cache_key: None}  # the caller's cache must not take the pass's tokens
        threads = self._threads
        threads.route_only = True
        try:
            generate(*unnamed, **routing_pass)
        except _RoutedPrompt as routed:
            decision = routed.decision
        else:
            raise RuntimeError("gatedlora: the routing pass before a chunked prefill or an assisted generation "
                               "never reached block router_layer")
        finally:
            threads.route_only = False
        threads.pending = decision
        try:
            return generate(*args, **kwargs)
        finally:
            threads.pending = None


def patched_model_of(reference: weakref.ref, method: str) -> nn.Module:
    """The model a method gatedlora set on it holds weakly (``_Wrapper``, ``patching.StandIn``); ReferenceError,
    naming ``method``, once it has been freed."""
    model = reference()
    if model is None:
        raise ReferenceError(f"gatedlora: {method}() belongs to a patched model that has been freed (the methods "
                             "gatedlora sets on it, and on its PEFT tuner, hold it weakly: keep a reference to the "
                             "model itself)")
    return model


class _Wrapper:
    """A method ``name`` of a model replaced on its instance; a copy of the model gets a copy bound to itself.

    The module holds the wrapper, so the wrapper holds the module weakly: the module's own method, bound to it,
    made a cycle that kept a dropped model, every weight of it, alive until Python's cyclic collector ran (a review
    saw none run over 2,000 requests). An instance attribute already there (accelerate's hook, a user's own) is held
    as it is, and put back as it is by ``remove``: a cycle through it was there before patching."""

    name = ""

    def __init__(self, route: SequenceRouter, module: nn.Module) -> None:
        self.route = route
        self.replaced = self.name in module.__dict__  # an instance wrapper already there (accelerate) stays inside
        inner = getattr(module, self.name)
        self.module_reference = weakref.ref(module)
        own_method = not self.replaced and isinstance(inner, types.MethodType) and inner.__self__ is module
        self.function = inner.__func__ if own_method else None
        self.instance_inner = None if own_method else inner
        module.__dict__[self.name] = self

    @property
    def inner(self) -> Callable:
        """The replaced method, bound to the module."""
        if self.function is None:
            return self.instance_inner
        # (torch.compile traces __get__, not a call of types.MethodType)
        return self.function.__get__(patched_model_of(self.module_reference, self.name))

    def __deepcopy__(self, memo: dict) -> _Wrapper:
        # (inside the model's deep copy, which is in memo: the copy's wrapper is bound to the copied module)
        copied = object.__new__(type(self))
        copied.__dict__.update(self.__dict__)
        memo[id(self)] = copied
        copied.route = copy.deepcopy(self.route, memo)
        copied.instance_inner = copy.deepcopy(self.instance_inner, memo)
        copied.module_reference = weakref.ref(copy.deepcopy(self.module_reference(), memo))
        return copied

    def __getstate__(self) -> dict:
        # pickled inside the model's pickle (torch.save(model)), which holds the module: its memo ties the two
        return {**self.__dict__, "module_reference": self.module_reference()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.module_reference = weakref.ref(state["module_reference"])

    @property
    def __signature__(self) -> inspect.Signature:  # what transformers' Trainer and generate inspect
        return inspect.signature(self.inner)

    def remove(self, module: nn.Module) -> None:
        if self.replaced:
            module.__dict__[self.name] = self.inner
        else:
            module.__dict__.pop(self.name, None)


class RoutedForward(_Wrapper):
    """``backbone.forward``: a per-call ForwardState for each forward (see ``call_state``). A wrapper
    rather than hooks, because ``nn.Module``'s always-call hooks miss KeyboardInterrupt."""

    name = "forward"

    def __init__(self, route: SequenceRouter, module: nn.Module) -> None:
        super().__init__(route, module)
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.names = tuple(p.name for p in inspect.signature(self.inner).parameters.values() if p.kind in kinds)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.route.run_backbone(self.inner, self.names, args, kwargs)


# generate() options whose first forward is not a plain prefill of the prompt, and the value that turns each off:
# a chunked prefill, and the ways transformers' GenerationConfig.get_generation_mode enters assisted generation
# (its first forward covers the prompt and the draft's candidates)
_NOT_A_PLAIN_PREFILL = {"prefill_chunk_size": None, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
                        "use_mtp": False}


def _set(option: str, value: Any) -> bool:
    """Whether generate() ``option`` is on, as transformers tests it (``use_mtp`` by truth, the others by None)."""
    return bool(value) if option == "use_mtp" else value is not None


class RoutedGenerate(_Wrapper):
    """``generate`` of the model that owns the backbone: a chunked prefill or an assisted generation is
    routed from the whole prompt (``SequenceRouter.generate_whole_prompt_routed``)."""

    name = "generate"

    def __init__(self, route: SequenceRouter, module: nn.Module) -> None:
        super().__init__(route, module)
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.names = tuple(p.name for p in inspect.signature(self.inner).parameters.values() if p.kind in kinds)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        threads = self.route._threads
        outer = thread_slot(threads, "pending")
        if outer is not None:
            # a generate inside another's first step (assistant_early_exit drafts with this very model): the
            # decision waiting there is the outer generation's first forward's, not this one's
            threads.pending = None
            try:
                return self(*args, **kwargs)
            finally:
                threads.pending = outer
        routing_pass = self._routing_pass(self._arguments(args, kwargs))
        with generating():  # its beam search reorders the cache among a prompt's beams only (call_state)
            if routing_pass is None:
                return self.inner(*args, **kwargs)
            return self.route.generate_whole_prompt_routed(self.inner, args, kwargs, args[len(self.names):],
                                                           routing_pass)

    def _arguments(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name (those its signature names). A GenerationConfig passed positionally is
        ``generation_config``."""
        from transformers import GenerationConfig

        if not args:
            return kwargs
        arguments = {**dict(zip(self.names, args)), **kwargs}
        if not isinstance(arguments.get("generation_config"), GenerationConfig):
            config = next((a for a in args if isinstance(a, GenerationConfig)), None)
            if config is not None:  # a generate whose signature names it otherwise
                arguments = {name: value for name, value in arguments.items() if value is not config}
                arguments["generation_config"] = config
        return arguments

    def _routing_pass(self, arguments: dict) -> dict | None:
        """The arguments of a plain generation of the prompt, if this one's first forward is not a plain
        prefill (else None). The options are read as transformers reads them: an argument, else the
        GenerationConfig passed, else (where that leaves it unset) the model's own."""
        config = arguments.get("generation_config")
        model_config = getattr(self.inner.__self__, "generation_config", None)
        routing_pass: dict = {}
        cleared_config = None
        for option, off in _NOT_A_PLAIN_PREFILL.items():
            if option in arguments:
                if _set(option, arguments[option]):
                    routing_pass[option] = off
                continue
            if _set(option, getattr(config, option, None)):
                cleared_config = cleared_config or copy.deepcopy(config)
                setattr(cleared_config, option, off)
            elif _set(option, getattr(model_config, option, None)):
                routing_pass[option] = off  # where ``config`` leaves it unset, transformers takes the model's
        if arguments.get("assistant_model") is not None:
            routing_pass["assistant_model"] = None
        if not routing_pass and cleared_config is None:
            return None
        if cleared_config is not None:
            routing_pass["generation_config"] = cleared_config
        return {**arguments, "streamer": None, **routing_pass}


def install_routing(backbone: nn.Module, router_block: nn.Module, router: SequenceRouter,
                    generator: nn.Module | None) -> None:
    """Wrap ``backbone.forward`` (per-call state) and ``generator.generate`` (chunked prefill), and hook
    ``router_block`` (the decision). Each holds ``router`` itself or its bound method, so that
    ``copy.deepcopy`` of the model gives the copy's its own: a copy routes itself."""
    RoutedForward(router, backbone)
    if generator is not None:
        RoutedGenerate(router, generator)
    router_block.register_forward_hook(router.after_router_block)


def remove_routing(modules: list[nn.Module], router: SequenceRouter) -> None:
    """Undo ``install_routing`` of ``router`` on ``modules`` (by identity: handles do not survive a deepcopy)."""
    router.__dict__.pop("_kept_steps", None)  # (the records it joined: a router kept after unpatching holds none)
    for module in modules:
        for kind in (RoutedForward, RoutedGenerate):
            wrapper = module.__dict__.get(kind.name)
            if isinstance(wrapper, kind) and wrapper.route is router:
                wrapper.remove(module)
        for key, fn in list(module._forward_hooks.items()):
            if getattr(fn, "__self__", None) is router:
                del module._forward_hooks[key]
