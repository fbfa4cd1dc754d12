"""What a routed layer keeps from one CPU decode call to the next, so that the next call reads less.

At decode a step streams the model's weights between two calls of a layer, so each object a call reads comes
from the L3 or memory, and the loads depend on each other (a dict, then an entry, then a module, then its dict):
reading four adapters' weights through PEFT's modules, turning the routing decision into row indices and checking
the settings cost more than the arithmetic (docs/design.md, "What it costs on the CPU"). A ``KeptLayerCall`` holds
what the last call found along those chains (``Dependencies``: the settings objects, the submodules and adapter
modules by name, each weight as registered and its data pointer and version; the decision, and the concatenation
it added with), and a later call compares identities and values at the ends of the chains instead of walking them.
Every fact the full path would read is still read or compared:

* the routing decision of the forward in this thread, x's shape, dtype and device, the settings objects
  (adapter names, scalings, backend, the route slot table);
* the layer's submodules and each adapter's modules as registered now under its name (a replaced, removed or
  renamed adapter, two names swapped), each weight as registered now in its module's ``_parameters``
  (``torch.func.functional_call`` and accelerate write there directly), each weight's data pointer and version
  and the kept-copies epoch (``multi_weights.copy_key``: in-place updates, a ``.data`` assignment to other
  memory, optimizer steps, ``forget_kept_copies()``; what that key does not see is listed in ``multi_weights``);
* the dropouts still off, autograd, autocast, ``torch.compile`` and ``force_gate`` still off, the base layer still
  a plain ``nn.Linear`` (no hooks, no replaced forward).

Where: x, the decision and the switches in each call; the rest once a forward, for every layer at once, at the
first call of a routed layer in the forward (``checked_records``: each layer's record joined into the router's
``KeptStep`` for the decision, a few C-level passes over all of them, where a check in each call cost 0.03 of
PEFT's decode step more). A layer whose call ran code before its forward (pre-hooks on it or on every module, a
replaced forward) or around which hooks run for every module checks its record in its call instead. So a change
made by other code inside the forward after its first routed layer ran (a hook on a block that updates a later
layer's adapter weights in place) is seen from the next forward (docs/design.md, "Several adapters, one router",
"The layer").

Anything different, and the layer runs its full path, which keeps a new record. A layer keeps one record per
routing decision (a dict keyed by the decision's id, ``keep_call``), so generations that take turns on one model
(threads, interleaved steps) each find their own. Not seen: the ``_modules`` dict of ``lora_A``, ``lora_B`` or
``lora_dropout``, or a ``_parameters`` dict, replaced as a whole object (``module._parameters = {...}``; torch,
PEFT and accelerate write their entries), as the record holds those dicts.
"""
from __future__ import annotations

import operator
import weakref
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from . import call_state
from .call_state import RouteDecision
from .module_hooks import global_hooks, own_hooks, ran_before_forward
from .ops.multi_weights import copy_key, joined_key
from .ops.torch_multi import KeptConcatenation, add_kept_product_

# Records a layer keeps at once, one per decision (a generation): a new one past these starts a new set; and the
# decisions whose records a router keeps checked together
CALLS_KEPT = 8
_weight = operator.itemgetter("weight")
_training = operator.attrgetter("training")
_state = operator.attrgetter("__dict__")
_referent = weakref.ReferenceType.__call__
_SETTINGS = operator.itemgetter("adapter_names", "scalings", "backend")
_SUBMODULES = ("lora_A", "lora_B", "lora_dropout")
_PARTS = operator.itemgetter("base_layer", *_SUBMODULES)
_SLOTS = operator.itemgetter("route_slot_table")
_modules = operator.itemgetter("_modules")
_buffers = operator.itemgetter("_buffers")


class Dependencies:
    """What kept records depend on besides x and the switches a call reads, read the way the layers' full path
    reads it (by name), in flat tuples: for one record, or for every record of a decision at once (``joined``),
    where a few C-level passes over all of them cost less than a check per layer (docs/design.md, "What it costs
    on the CPU").

    Sources, per record: ``layers`` (a weak reference to the layer, whose ``__dict__`` holds its settings objects:
    adapter names, scalings, backend; and its ``_modules`` and ``_buffers``), ``bases`` (its base layer),
    ``registries`` and ``names`` (the ``_modules`` of its ``lora_A``, ``lora_B`` and ``lora_dropout``, once for each
    adapter name looked up there), ``parameters`` (the adapters' A and B modules' ``_parameters``), ``weights``
    (their ``"weight"`` entries, which the concatenation was built from) and ``dropouts`` (the adapters'
    ``nn.Dropout`` modules; the others are ``nn.Identity``). What must hold: the weights' ``copy_key`` equal to
    ``key``, the one taken before their copy was built (in-place updates, ``.data`` assignments, optimizer steps:
    a write while the copy was built is seen too); no hooks on every module, on a base layer or replacing its
    forward, no dropout in training (all off when a record is kept); and ``identities``: the settings objects, the
    layer's submodules and route slot table, the bases' classes, each adapter's modules by name (a replaced,
    removed or renamed adapter, two names swapped) and each weight as registered (``torch.func.functional_call``
    and accelerate write ``_parameters`` directly), in ``sections`` of one read each."""

    __slots__ = ("layers", "bases", "base_states", "registries", "names", "parameters", "weights", "dropouts", "key",
                 "sections", "identities")

    def __init__(self, layers: tuple, bases: tuple, registries: tuple, names: tuple, parameters: tuple,
                 weights: tuple, dropouts: tuple, key: tuple | None, sections: tuple | None = None) -> None:
        self.layers, self.bases, self.registries, self.names = layers, bases, registries, names
        self.parameters, self.weights, self.dropouts, self.key = parameters, weights, dropouts, key
        self.base_states = tuple(map(_state, bases))
        # (read now for one record; a joined one takes its parts', so nothing written since they were is pinned)
        self.sections = tuple(map(tuple, self._sections(self.referents()))) if sections is None else sections
        self.identities = tuple(chain.from_iterable(self.sections))

    @classmethod
    def joined(cls, parts: list[Dependencies]) -> Dependencies:
        """One ``Dependencies`` for all of ``parts``' sources, holding what each of them holds."""
        def flat(name: str) -> tuple:
            return tuple(chain.from_iterable(getattr(part, name) for part in parts))
        sections = tuple(tuple(chain.from_iterable(column)) for column in zip(*(part.sections for part in parts)))
        return cls(*map(flat, ("layers", "bases", "registries", "names", "parameters", "weights", "dropouts")),
                   joined_key([part.key for part in parts]), sections)

    def referents(self) -> tuple:
        """The layers (None where one is gone)."""
        return tuple(map(_referent, self.layers))

    def _sections(self, layers: tuple) -> tuple:
        """What ``identities`` holds, read now from ``layers`` (``referents()``) and the other sources, one iterator
        a section (AttributeError where a layer is gone)."""
        states = tuple(map(_state, layers))
        return (chain.from_iterable(map(_SETTINGS, states)), chain.from_iterable(map(_PARTS, map(_modules, states))),
                map(_SLOTS, map(_buffers, states)), map(type, self.bases),
                map(dict.__getitem__, self.registries, self.names), map(_weight, self.parameters))

    def switched_on(self) -> bool:
        """Whether hooks run around every module, a base layer has hooks or a replaced forward, or a dropout
        trains: what a kept record is never kept with."""
        return global_hooks() or any(map(own_hooks, self.base_states)) or any(map(_training, self.dropouts))

    def hold(self, layers: tuple | None = None) -> bool:
        """Whether every source shows what it showed when these were taken (``layers``: ``referents()``, where the
        caller has them already)."""
        layers = self.referents() if layers is None else layers
        try:
            return (copy_key(self.weights) == self.key and not self.switched_on()
                    and all(map(operator.is_, chain.from_iterable(self._sections(layers)), self.identities)))
        except (KeyError, AttributeError):  # an adapter's module or weight no longer registered; a layer gone
            return False



class KeptLayerCall:
    """What one call of a routed layer read (``depends``), for what x and decision, the concatenation it added with
    and the base layer's ``_parameters``; read-only once built, so a call in another thread may read it while a new
    one replaces it. It holds its layer weakly (the layer holds it)."""

    __slots__ = ("decision", "shape", "dtype", "depends", "concatenation", "base_parameters")

    def __init__(self, layer: nn.Module, x: torch.Tensor, decision: RouteDecision, concatenation: KeptConcatenation,
                 parameters: tuple) -> None:
        state = layer.__dict__
        self.decision, self.shape, self.dtype, self.concatenation = decision, x.shape, x.dtype, concatenation
        submodules, names = state["_modules"], state["adapter_names"]
        registries = tuple(submodules[name]._modules for name in _SUBMODULES)
        dropouts = tuple(m for m in map(registries[2].__getitem__, names) if not isinstance(m, nn.Identity))
        # the base layer's parameter dict, which a call reads its weight and bias from (the base layer itself is
        # checked by identity among the layer's submodules): four dependent reads fewer in each call
        self.base_parameters = submodules["base_layer"]._parameters
        self.depends = Dependencies((weakref.ref(layer),), (submodules["base_layer"],),
                                    tuple(r for r in registries for _ in names), names * len(registries), parameters,
                                    concatenation.weights, dropouts, concatenation.key)


class KeptStep:
    """Every layer's record for one decision that held when this was built (``records``: the layer's id -> record;
    the layers are held weakly, in ``depends``), and what they depend on, joined, so a forward checks them all in
    one ``hold()``."""

    __slots__ = ("decision", "records", "depends")

    def __init__(self, decision: RouteDecision, records: dict) -> None:
        self.decision, self.records = decision, records
        self.depends = Dependencies.joined([kept.depends for kept in records.values()])


def keep_call(calls: dict | None, layer: nn.Module, x: torch.Tensor, decision: RouteDecision,
              concatenation: KeptConcatenation) -> dict | None:
    """The layer's records (``calls``: the decision's id -> its ``KeptLayerCall``, None for none yet) with this call's
    record for ``decision``, a call that just added with ``concatenation`` (its dropouts off: ``_active_dropouts``);
    the same dict, or a new one past ``CALLS_KEPT`` records (another thread may be reading the old one). Where the
    weights are not the modules' registered parameters (torch's parametrize computes them), or the settings are
    not the ones the concatenation was built with (changed by another thread meanwhile), the decision's record is
    dropped instead. Each record holds its decision, so no other object takes that id while it is kept; the
    decision lists the layer among those whose records a forward with it checks (``checked_records``), which
    check them together again from the next forward."""
    state = layer.__dict__
    modules = state["_modules"]
    try:
        parameters = tuple(modules[side]._modules[name]._parameters for side in ("lora_A", "lora_B")
                           for name in state["adapter_names"])
        registered = all(map(operator.is_, map(_weight, parameters), concatenation.weights))
    except KeyError:
        registered = False
    if not (registered and state["scalings"] is concatenation.scaling and state["backend"] is concatenation.backend):
        return forget_call(calls, decision)
    kept = KeptLayerCall(layer, x, decision, concatenation, parameters)
    if kept.depends.switched_on():  # (switched on since the call began: in another thread)
        return forget_call(calls, decision)
    if calls is None or (len(calls) >= CALLS_KEPT and id(decision) not in calls):
        calls = {}
    calls[id(decision)] = kept
    keepers = decision._keepers
    listed = keepers.get(id(layer))
    if listed is None or listed() is not layer:
        keepers[id(layer)] = weakref.ref(layer)  # (one store: threads keeping records at once lose none)
    state["route"].kept_steps().pop(id(decision), None)
    return calls


def forget_call(calls: dict | None, decision: RouteDecision) -> dict | None:
    """``calls`` without ``decision``'s record (one that no longer serves must not serve again by chance)."""
    if calls is not None:
        calls.pop(id(decision), None)
    return calls


def checked_records(router: nn.Module, decision: RouteDecision) -> tuple[dict, tuple]:
    """(each layer that kept a record of a call with ``decision``, by id -> that record, where what it depends on
    holds now; those layers): all at once where the router's ``KeptStep`` for the decision still holds, else each
    layer's own, kept as the new step. The caller holds the layers while it uses the ids."""
    steps = router.kept_steps()
    step = steps.get(id(decision))
    if step is not None and step.decision is decision:
        layers = step.depends.referents()
        if step.depends.hold(layers):
            return step.records, layers
    checked, layers = {}, []
    for listed in tuple(decision._keepers.values()):  # (a copy made in one C call: other threads may add meanwhile)
        layer = listed()
        calls = None if layer is None else layer.__dict__.get("_kept_calls")
        kept = calls.get(id(decision)) if calls else None
        if kept is not None and kept.decision is decision and kept.depends.hold():
            checked[id(layer)] = kept
            layers.append(layer)
    if len(steps) >= CALLS_KEPT and id(decision) not in steps:
        steps.clear()
    steps[id(decision)] = KeptStep(decision, checked)
    return checked, tuple(layers)


def kept_output(layer: nn.Module, calls: dict, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through the record of its last call with the routing decision in force (``calls``: the layer's
    records, ``keep_call``'s); None, before any work, where there is none or something that call depended on is
    not as it was. x: [B, ..., K] -> [B, ..., N].

    The first such call in a forward of the backbone checks every layer's record for the decision at once
    (``checked_records``, kept in the thread's ``ForwardState``). A layer checks its own record here where it has
    none among them, or where its call ran code before this forward (pre-hooks on it or on every module, a replaced
    forward), which may have changed what the record depends on after that first call; or where hooks run around
    every module's call. (Its own pre-hooks were just read by the module call: reading them again is warm.) A
    record that holds here but was missing from the forward's check, for no hook of its own, has the decision's
    joined check rebuilt at the next forward, so that it is among them again."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or call_state._any_forced:
        return None
    state = layer.__dict__
    router = state["route"]
    forward = router.forward_state()
    decision = None if forward is None else forward.decision
    if decision is None:
        return None
    checked = forward.checked_records
    if checked is None:
        checked, forward.checked_layers = checked_records(router, decision)
        forward.checked_records = checked
    kept = checked.get(id(layer))
    hooked = ran_before_forward(state) or global_hooks()
    if kept is None or hooked:
        kept = calls.get(id(decision))
        if kept is None or kept.decision is not decision or not kept.depends.hold():
            return None
        if not hooked and id(layer) not in checked:
            router.kept_steps().pop(id(decision), None)
    if x.shape != kept.shape or x.dtype is not kept.dtype or not x.is_cpu or torch.is_autocast_enabled("cpu"):
        return None
    parameters = kept.base_parameters
    result = F.linear(x, parameters["weight"], parameters["bias"])
    if not result.is_contiguous():  # (as in _add_kept_on_cpu, which then goes to add_lora_multi_)
        return None
    add_kept_product_(result, x, kept.concatenation)
    return result
