"""What a routed layer keeps from one CPU decode call to the next, so that the next call reads less.

At decode a step streams the model's weights between two calls of a layer, so each object a call reads comes
from the L3 or memory, and the loads depend on each other (a dict, then an entry, then a module, then its dict):
reading four adapters' weights through PEFT's modules, turning the routing decision into row indices and checking
the settings cost more than the arithmetic (docs/design.md, "What it costs on the CPU"). A ``KeptLayerCall`` holds
what the last call found along those chains (the module registries and their entries, each weight's parameter
dict, the decision, the concatenation it added with and its row index), and the next call compares identities at
the ends of the chains instead of walking them. Every fact the full path would read is still read or compared:

* the routing decision of the forward in this thread, x's shape, dtype and device, the settings objects
  (adapter names, scalings, backend, the route slot table);
* the layer's submodules and each adapter's modules as registered now (every entry, name and module, of the
  layer's ``_modules`` and of its ``lora_A``, ``lora_B`` and ``lora_dropout``, in order: a replaced, removed,
  renamed or added adapter is seen), each weight as registered now in its module's ``_parameters``
  (``torch.func.functional_call`` and accelerate write there directly), each weight's data pointer and version
  and the kept-copies epoch (``multi_weights.copy_key``: in-place updates, a ``.data`` assignment to other
  memory, optimizer steps, ``forget_kept_copies()``; what that key does not see is listed in ``multi_weights``);
* the dropouts still off, autograd, autocast, ``torch.compile`` and ``force_gate`` still off, the base layer still
  a plain ``nn.Linear`` (read afresh, as a module call reads it).

Anything different, and the layer runs its full path, which keeps a new record. A layer keeps one record per
routing decision (a dict keyed by the decision's id, ``keep_call``), so generations that take turns on one model
(threads, interleaved steps) each find their own. Not seen: one of those ``_modules`` or ``_parameters`` dicts
replaced as a whole object (``module._parameters = {...}``; torch, PEFT and accelerate write their entries), as
the record holds the dicts it read.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from . import call_state
from .call_state import RouteDecision
from .module_hooks import plain_linear
from .ops.multi_weights import copy_key
from .ops.torch_multi import KeptConcatenation, add_kept_product_

# Records a layer keeps at once, one per decision (a generation): a new one past these starts a new set
CALLS_KEPT = 8
_weight = operator.itemgetter("weight")
_training = operator.attrgetter("training")
_SUBMODULES = ("lora_A", "lora_B", "lora_dropout")


class KeptLayerCall:
    """What one call of a routed layer read, and the concatenation it added with; read-only once built, so a
    call in another thread may read it while a new one replaces it.

    ``registries``: the ``_modules`` dicts of the layer and of its ``lora_A``, ``lora_B`` and ``lora_dropout``;
    ``registered``: their entries then, a tuple of (name, module) each (comparing every entry in order reads each
    dict's entries once, where looking each adapter up by name hashed seven keys in four dicts). ``parameters``:
    the adapters' A and B modules' ``_parameters`` dicts, whose ``"weight"`` entries were ``concatenation.weights``.
    ``dropouts_in_eval``: the adapters' dropout modules that are ``nn.Dropout`` (in eval then; the others are
    ``nn.Identity``)."""

    __slots__ = ("decision", "shape", "dtype", "names", "scalings", "backend", "slot_table", "registries",
                 "registered", "parameters", "dropouts_in_eval", "concatenation")

    def __init__(self, layer: nn.Module, x: torch.Tensor, decision: RouteDecision, concatenation: KeptConcatenation,
                 ) -> None:
        state = layer.__dict__
        self.decision, self.shape, self.dtype = decision, x.shape, x.dtype
        self.names, self.scalings, self.backend = state["adapter_names"], state["scalings"], state["backend"]
        self.slot_table = state["_buffers"]["route_slot_table"]
        submodules = state["_modules"]
        lora_a, lora_b, lora_dropout = (submodules[name]._modules for name in _SUBMODULES)
        self.registries = (submodules, lora_a, lora_b, lora_dropout)
        self.registered = _registered(self.registries)
        self.parameters = tuple(registry[name]._parameters for registry in (lora_a, lora_b) for name in self.names)
        self.dropouts_in_eval = tuple(m for m in map(lora_dropout.__getitem__, self.names)
                                      if not isinstance(m, nn.Identity))
        self.concatenation = concatenation


def _registered(registries: tuple) -> tuple:
    """Each dict's (name, module) entries, a tuple each (the modules compared by identity: ``nn.Module`` keeps
    ``object.__eq__``). The names too: the same modules in the same order under swapped names route differently."""
    return tuple(map(tuple, map(dict.items, registries)))


def keep_call(calls: dict | None, layer: nn.Module, x: torch.Tensor, decision: RouteDecision,
              concatenation: KeptConcatenation) -> dict | None:
    """The layer's records (``calls``: the decision's id -> its ``KeptLayerCall``, None for none yet) with this call's
    record for ``decision``, a call that just added with ``concatenation`` (its dropouts off: ``_active_dropouts``);
    the same dict, or a new one past ``CALLS_KEPT`` records (another thread may be reading the old one). Where the
    weights are not the modules' registered parameters (torch's parametrize computes them) the decision's record
    is dropped instead. Each record holds its decision, so no other object takes that id while it is kept."""
    kept = KeptLayerCall(layer, x, decision, concatenation)
    try:
        registered = all(map(operator.is_, map(_weight, kept.parameters), concatenation.weights))
    except KeyError:
        registered = False
    if not registered:
        return forget_call(calls, decision)
    if calls is None or (len(calls) >= CALLS_KEPT and id(decision) not in calls):
        calls = {}
    calls[id(decision)] = kept
    return calls


def forget_call(calls: dict | None, decision: RouteDecision) -> dict | None:
    """``calls`` without ``decision``'s record (one that no longer serves must not serve again by chance)."""
    if calls is not None:
        calls.pop(id(decision), None)
    return calls


def kept_output(layer: nn.Module, calls: dict, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through the record of its last call with the routing decision in force (``calls``: the layer's
    records, ``keep_call``'s); None, before any work, where there is none or something that call depended on is
    not as it was. x: [B, ..., K] -> [B, ..., N]."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or call_state._any_forced:
        return None
    state = layer.__dict__
    decision = state["route"].in_force()
    kept = calls.get(id(decision))
    if kept is None or kept.decision is not decision or x.shape != kept.shape or x.dtype is not kept.dtype \
            or not x.is_cpu or torch.is_autocast_enabled("cpu"):
        return None
    if not (state["adapter_names"] is kept.names and state["scalings"] is kept.scalings
            and state["backend"] is kept.backend and state["_buffers"].get("route_slot_table") is kept.slot_table):
        return None
    concatenation = kept.concatenation
    if _registered(kept.registries) != kept.registered:
        return None
    try:
        if not all(map(operator.is_, map(_weight, kept.parameters), concatenation.weights)):
            return None
    except KeyError:  # a weight removed (torch's parametrize computes it instead)
        return None
    if any(map(_training, kept.dropouts_in_eval)) or copy_key(concatenation.weights) != concatenation.key:
        return None
    base = state["_modules"]["base_layer"]
    if not plain_linear(base):
        return None
    parameters = base._parameters
    result = F.linear(x, parameters["weight"], parameters["bias"])
    if not result.is_contiguous():  # (as in _add_kept_on_cpu, which then goes to add_lora_multi_)
        return None
    add_kept_product_(result, x, concatenation)
    return result
