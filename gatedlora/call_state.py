"""State that belongs to one call, never to the model: routes on KV caches, per-thread forward state.

A patched model is shared by threads, interleaved generations and chunked prefills, so:

- a generation's routing decision (a ``RouteDecision``, made at prefill) rides on its KV cache
  object, keyed by the router; a forward that extends that cache uses that decision, whatever
  ran in between and on whichever thread;
- what one forward of the backbone needs (the mask and the decision its layers read) lives in a
  per-thread slot that the backbone's forward wrapper sets and restores in ``finally``, so a
  forward that raises (KeyboardInterrupt included) leaves nothing behind;
- ``force_gate`` overrides and the routes of the last forward are per thread.

Why ``threading.local`` and not ``contextvars``: torch.compile (Dynamo, torch 2.13) cannot trace
``ContextVar.get`` or ``.set`` ("Dynamo does not know how to trace method `set` of class
`ContextVar`"), so a compiled model would break its graph at every read; Dynamo traces
``threading.local`` attributes and guards on them per thread. A forward runs synchronously in one
thread, so a slot set at its start and restored at its end is scoped to that call.
"""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

ROUTES_ATTRIBUTE = "_gatedlora_routes"  # on a KV cache (or a legacy tuple cache's first key tensor)


def contiguous_span(decisions: list[bool]) -> tuple[int, int] | None:
    """(lo, hi) where the True entries of ``decisions`` (at least one) are exactly ``lo..hi-1``, else None."""
    opened = [i for i, is_open in enumerate(decisions) if is_open]
    lo, hi = opened[0], opened[-1] + 1
    return (lo, hi) if hi - lo == len(opened) else None


def host_facts(decisions: torch.Tensor, gates: torch.Tensor, hard: bool) -> tuple[bool, bool, tuple | None, bool]:
    """``RouteDecision``'s (all_open, all_closed, open_span, scattered) of one adapter's CPU decisions [B] and
    gates [B], from one read of the decisions. all_open serves a hard-gate shortcut (plain LoRA), so it is
    decided with hard semantics whatever ``hard`` is: soft routing with p = 0.2 must not open that row under
    hard gates; all_closed follows ``hard`` (soft: every gate exactly 0)."""
    opened = decisions.tolist()
    all_open = all(opened)
    some_open = any(opened)
    all_closed = not some_open if hard else not bool(gates.detach().ne(0).any())
    # (soft gates: every decision closed while some gate is not 0 is neither all open nor all closed, and has no
    # open sequence to span: it raised IndexError)
    open_span = contiguous_span(opened) if some_open and not all_open else None
    scattered = some_open and not all_open and open_span is None
    return all_open, all_closed, open_span, scattered


@dataclass(eq=False)
class RouteDecision:
    """One generation's routes, decided at prefill from each prompt's last real token.

    probabilities: [B] fp32, the router's output (NaN kept); gates: [B] fp32, what the layers read
    (NaN -> 0); decisions: [B] bool, adapter used (``p >= threshold`` in fp32); threshold: the one
    the hard gates of this generation compare with. ``all_open`` / ``all_closed`` are True only
    where the host saw it for free (CPU tensors, eager): the layers then skip the gate gather or
    the adapter call. On a GPU they stay False (reading would sync). ``open_span`` (lo, hi), seen the
    same way: the open sequences, when some but not all are open, are exactly ``lo..hi-1``; the layers
    then run the adapter on that slice of the batch, without a gate (a view, no copy). ``scattered``, seen
    the same way: some but not all are open, and not as one slice.

    Several adapters: ``multi_routes`` [B] long holds each sequence's route (0 the base model, i the
    i-th adapter), ``probabilities`` [B, N + 1] the softmax of the router's logits, ``decisions`` and
    ``gates`` whether an adapter is used; ``uniform_route`` is the route every sequence took where the
    host saw that for free (CPU, eager), else None.
    """

    probabilities: torch.Tensor
    gates: torch.Tensor
    decisions: torch.Tensor
    threshold: float
    all_open: bool = False
    all_closed: bool = False
    open_span: tuple[int, int] | None = None
    scattered: bool = False
    multi_routes: torch.Tensor | None = None
    uniform_route: int | None = None
    hard: bool = True  # the router's gates when it decided (what all_closed means)
    _row_gates: dict = field(default_factory=dict, repr=False)
    # the layers that kept a record of a call with this decision (id -> weak reference; ``kept_call.keep_call``):
    # entries are added one store at a time, and read through a copy made in one call
    _keepers: dict = field(default_factory=dict, init=False, repr=False)

    def __getstate__(self) -> dict:
        # (a deep copy or a pickle of the KV cache that carries this decision: the layers that kept records for
        # it are held weakly, which neither copies; the copy is a new decision, for which no layer kept any)
        return {**self.__dict__, "_keepers": {}}

    @property
    def batch(self) -> int:
        return self.gates.shape[0]

    @property
    def routes(self) -> torch.Tensor:
        """Each sequence's route, [B] long: 0 the base model, i the i-th adapter (with one adapter, 1)."""
        return self.multi_routes if self.multi_routes is not None else self.decisions.long()

    def select(self, rows: torch.Tensor) -> RouteDecision:
        """This decision for the sequences ``rows`` ([B'] long) of its batch, in that order: the routes of a KV
        cache whose batch was reordered, narrowed or repeated. The host-side facts are seen again where that
        is free (CPU, eager); elsewhere those that hold for any rows of the batch (all open, all closed, one
        route) are kept, and the others left unseen."""
        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values.index_select(0, rows.to(values.device))

        probabilities, gates, decisions = pick(self.probabilities), pick(self.gates), pick(self.decisions)
        sees = gates.device.type == "cpu" and not torch.compiler.is_compiling()
        if self.multi_routes is not None:
            routes = pick(self.multi_routes)
            uniform = self.uniform_route
            if sees:
                first = int(routes[0]) if routes.numel() else 0
                uniform = first if bool((routes == first).all()) else None
            return RouteDecision(probabilities, gates, decisions, self.threshold, all_closed=uniform == 0,
                                 multi_routes=routes, uniform_route=uniform, hard=self.hard)
        facts = host_facts(decisions, gates, self.hard) if sees else (self.all_open, self.all_closed, None, False)
        return RouteDecision(probabilities, gates, decisions, self.threshold, *facts, hard=self.hard)

    def row_adapters(self, x: torch.Tensor, slot_table: torch.Tensor) -> torch.Tensor:
        """Each row's adapter in a layer that holds route r's adapter at ``slot_table[r]`` (int64 on the layer's
        device; -1: not there, and the base model for route 0). Returns [M] int64 for the rows of x
        [B, ..., K], kept per row count and table, so a generation's decode steps reuse one tensor."""
        rows = self._rows_per_sequence(x)
        key = (rows, id(slot_table))  # ids hash faster than devices and tuples; the table is kept to compare
        cached = self._row_gates.get(key)
        if cached is None or cached[0] is not slot_table:
            routes = self.multi_routes.to(slot_table.device, non_blocking=True)
            # outside inference mode: a call that records autograd saves the index for backward, which an
            # inference tensor cannot be
            with torch.inference_mode(False):
                cached = (slot_table, slot_table.index_select(0, routes).repeat_interleave(rows))
            self._row_gates[key] = cached
        return cached[1]

    def _rows_per_sequence(self, x: torch.Tensor) -> int:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        batch = self.batch
        # (x of several dims must be batch first; [B * T, K] flattened batch first splits as it is, and x of two
        # dims cannot be told from another order here: patching refuses the layers known to get one, experts)
        if batch == 0 or rows % batch or (x.dim() > 2 and x.shape[0] != batch):
            raise RuntimeError(f"gatedlora: a gated layer got x of shape {list(x.shape)} ({rows} rows), which does "
                               f"not split over the {batch} sequences the router decided for: expected x of shape "
                               f"[{batch}, ..., K] (batch first). A layer whose input is not each sequence's own "
                               "rows (time first, or shared by the batch such as DeBERTa's relative-position "
                               "embeddings under share_att_key) cannot be gated per sequence: leave it out of the "
                               "adapter's target_modules, or use token gates (GatedLoraConfig(gate='token'))")
        return rows // batch

    def row_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's gate repeated over its rows of x [B, ..., K]. Returns [M] (fp32).

        Kept per row count and device, so a generation's decode steps reuse one tensor."""
        return self._per_row("gates", self.gates, x)

    def row_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's decision (True: adapter) repeated over its rows of x [B, ..., K]. Returns [M] bool,
        kept as ``row_gates``. A layer with hard gates passes these to the op on the CPU, where the torch
        backend then compares nothing (docs/design.md, "Sequence gates on the CPU")."""
        return self._per_row("decisions", self.decisions, x)

    def open_rows_column(self, x: torch.Tensor) -> torch.Tensor:
        """``row_decisions`` shaped [B, ..., 1] for x [B, ..., K]: a mask that broadcasts over x's last dim."""
        key = ("column", x.shape[:-1], x.device)
        cached = self._row_gates.get(key)
        if cached is None:
            cached = self._row_gates[key] = self.row_decisions(x).view(x.shape[:-1] + (1,))
        return cached

    def _per_row(self, name: str, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # keyed by the leading shape of x, not the row count: the shape is at hand, the count needs arithmetic
        # (the check that x splits over the sequences runs once per key); and by device: layers of a model split
        # over devices each get the values on their own
        key = (name, x.shape[:-1], x.device)
        cached = self._row_gates.get(key)
        if cached is None:
            rows = self._rows_per_sequence(x)
            cached = self._row_gates[key] = values.to(x.device, non_blocking=True).repeat_interleave(rows)
        return cached


@dataclass(eq=False)
class ForwardState:
    """What one forward of the backbone needs: its attention mask [B, T'] and the decision its layers
    read, from the cache the forward extends (``continuing``), from a whole-prompt routing pass
    (chunked prefill), or from the router hook after block ``router_layer`` (None until then).
    ``checked_records``: the layers' kept records for the decision that held when the forward's first routed
    layer call checked them, by the layer's id (``kept_call.checked_records``), None until then;
    ``checked_layers``: those layers, held for the forward so that no other object takes their ids."""

    attention_mask: torch.Tensor | None
    decision: RouteDecision | None
    continuing: bool
    checked_records: dict | None = None
    checked_layers: tuple = ()


# --- routes on KV caches --------------------------------------------------------------------------

def _anchor(cache: Any) -> Any:
    """The object a cache's routes hang on: a Cache object, or a legacy tuple cache's first key tensor
    (tuples take no attributes; each step's tuple is new, so the routes are passed on every step)."""
    if isinstance(cache, (tuple, list)):
        first = cache[0] if cache else None
        return first[0] if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor) else None
    return cache if hasattr(cache, "__dict__") else None


def routes_on(cache: Any, key: int) -> RouteDecision | None:
    """The decision that router ``key`` attached to ``cache``, or None."""
    anchor = _anchor(cache)
    if anchor is None:
        return None
    routes = anchor.__dict__.get(ROUTES_ATTRIBUTE)
    return None if routes is None else routes.get(key)


def attach_routes(cache: Any, key: int, decision: RouteDecision) -> None:
    """Attach router ``key``'s decision to ``cache`` (a copy of the cache carries it too; ``cache.reset()``,
    which starts a new generation on the same object, drops it)."""
    anchor = _anchor(cache)
    if anchor is None:
        return
    routes = anchor.__dict__.get(ROUTES_ATTRIBUTE)
    anchor.__dict__[ROUTES_ATTRIBUTE] = {**(routes or {}), key: decision}
    if callable(getattr(type(anchor), "reset", None)) and "reset" not in anchor.__dict__:
        anchor.__dict__["reset"] = _ResetForgetsRoutes(anchor, "reset")
    for name in _BATCH_OPERATIONS:
        if callable(getattr(type(anchor), name, None)) and name not in anchor.__dict__:
            anchor.__dict__[name] = _RoutesFollowBatch(anchor, name)


class _CacheMethod:
    """A method of one cache, set in its ``__dict__`` in place of the class's. It holds the cache weakly: a strong
    reference from the cache's own dict made a cycle, and every routed cache (its keys and values) then outlived
    its last user until the cyclic collector ran (a review counted 20 finished generations' caches alive after 300
    ``generate()`` calls). So, unlike a bound method, it does not keep the cache alive: whoever calls it later
    must hold the cache too. A deep copy or pickle of the cache gets one bound to the copy; a deep copy of the
    method alone (``copy.deepcopy(cache.reset)``) holds its copy of the cache strongly, as nothing else does (that
    copy's own dict holds a weak one: no cycle)."""

    def __init__(self, cache: Any, name: str, alone: bool = False) -> None:
        self._cache = weakref.ref(cache)
        self._held = cache if alone else None
        self.name = name

    @property
    def cache(self) -> Any:
        cache = self._cache()
        if cache is None:
            raise RuntimeError(f"gatedlora: {self.name}() of a routed KV cache that was freed: gatedlora's methods on "
                               "a routed cache hold it weakly (so that it is freed when dropped); keep the cache, not "
                               "only its method (a shallow copy, copy.copy, shares the original's: use copy.deepcopy)")
        return cache

    def __deepcopy__(self, memo: dict) -> "_CacheMethod":
        cache = self.cache
        alone = id(cache) not in memo  # else the cache is being copied, and this method with its dict
        return type(self)(copy.deepcopy(cache, memo), self.name, alone)

    def __reduce__(self) -> tuple:
        # (a pickle of the method alone loads as the object its cache's dict holds, which holds the cache weakly)
        return type(self), (self.cache, self.name)


class _ResetForgetsRoutes(_CacheMethod):
    """``cache.reset`` on a cache that carries routes: they go with the tokens."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        cache.__dict__.pop(ROUTES_ATTRIBUTE, None)
        return type(cache).reset(cache, *args, **kwargs)


def _reordered_rows(batch: int, beam_idx: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(beam_idx).long()


def _selected_rows(batch: int, indices: Any) -> torch.Tensor:
    if isinstance(indices, slice):
        return torch.arange(batch)[indices]
    rows = torch.as_tensor(indices)  # the cache indexes with it: a tensor or list of rows, or a bool mask
    if rows.dtype == torch.bool:
        return rows.nonzero().squeeze(1)
    return torch.arange(batch, device=rows.device)[rows].reshape(-1)  # negative indices and slices alike


def _repeated_rows(batch: int, repeats: int) -> torch.Tensor:
    return torch.arange(batch).repeat_interleave(repeats)


# Cache methods that change its batch, and the rows of the old batch that make the new one, in order
_BATCH_OPERATIONS = {"reorder_cache": _reordered_rows, "batch_select_indices": _selected_rows,
                     "batch_repeat_interleave": _repeated_rows}


class _RoutesFollowBatch(_CacheMethod):
    """``cache.reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` on a cache that carries
    routes: each sequence's route moves with its keys and values (``RouteDecision.select``). Only these calls
    pay for it: a decode step reads the routes as before.

    Inside a routed generate(), beam search reorders the cache every step, but only among one prompt's beams,
    which were routed alike (the prompt repeated once per beam before the prefill): there the routes stay as
    they are, which saves the step a new decision (and its layers the gates they keep per decision)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        result = getattr(type(cache), self.name)(cache, *args, **kwargs)
        routes = cache.__dict__.get(ROUTES_ATTRIBUTE)
        if routes and not (self.name == "reorder_cache" and thread_slot(_GENERATING, "depth")):
            argument = args[0] if args else next(iter(kwargs.values()))
            rows = {key: _BATCH_OPERATIONS[self.name](decision.batch, argument) for key, decision in routes.items()}
            cache.__dict__[ROUTES_ATTRIBUTE] = {key: decision.select(rows[key]) for key, decision in routes.items()}
        return result


_GENERATING = threading.local()  # .depth: how many routed generate() calls run in this thread


@contextlib.contextmanager
def generating() -> Iterator[None]:
    """Mark the calling thread as inside a routed ``generate`` (whose beam search reorders among beams only)."""
    _GENERATING.depth = (thread_slot(_GENERATING, "depth") or 0) + 1
    try:
        yield
    finally:
        _GENERATING.depth -= 1


def cache_length(cache: Any) -> int | torch.Tensor:
    """Tokens already in a KV cache: 0 for None or an empty cache; handles Cache objects and legacy tuples.

    Static caches count on the device (a 0-dim tensor); it is returned unread, as reading syncs.
    """
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        try:
            return cache.get_seq_length()
        except ValueError:  # no attention layer to count on (Mamba's cache): has a prefill set its states?
            if not _linear_attention_only(cache):
                raise
            return int(any(any(layer.has_previous_state.values()) for layer in cache.layers))
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def _linear_attention_only(cache: Any) -> bool:
    """Whether ``cache`` is a transformers Cache of linear-attention (state-space) layers only, which keep no
    tokens to count but mark each state ``has_previous_state`` once a prefill has set it."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(getattr(layer, "has_previous_state", None), dict) for layer in layers)


def continues(cache: Any) -> bool:
    """Whether a forward on ``cache``, which carries a decision, extends that generation: a cache counted on
    the host (DynamicCache, legacy tuples) that holds tokens, or any cache counted on the device (static
    caches), unread: reading would sync every decode step, and their ``reset()`` drops the decision."""
    length = cache_length(cache)
    return isinstance(length, torch.Tensor) or length > 0


def holds_tokens(cache: Any) -> bool:
    """Whether ``cache`` (a KV cache or None) holds tokens, for a prefill's check: a static cache's length is
    read on the host (one sync), except in a compiled graph or a CUDA graph capture, where it counts as empty."""
    length = cache_length(cache)
    if isinstance(length, torch.Tensor):
        if torch.compiler.is_compiling() or (length.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        return bool(length)
    return length > 0


def in_backward() -> bool:
    """Whether autograd runs a backward pass in this thread (where gradient checkpointing recomputes blocks)."""
    return torch._C._current_graph_task_id() != -1


def output_cache(output: Any) -> Any:
    """The KV cache a backbone returned (ModelOutput field ``cache`` or ``past_key_values``; with
    ``return_dict=False``, the transformers Cache or legacy tuple cache among the tuple's entries), or None."""
    getter = getattr(output, "get", None)
    if getter is None:
        return _tuple_output_cache(output) if isinstance(output, tuple) else None
    found = getter("cache")
    return found if found is not None else getter("past_key_values")


def _tuple_output_cache(output: tuple) -> Any:
    """A ``return_dict=False`` output's cache: its entries are those of the ModelOutput that are not None, in
    order, so the cache's position varies (after the loss and the logits, if any); it is the one entry that is
    a transformers Cache, or else a legacy cache, a tuple with one (key, value, ...) tuple of tensors per
    layer (hidden states and attentions are tuples of tensors)."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is there wherever a backbone returns a cache
        Cache = ()
    for entry in output:
        if isinstance(entry, Cache):
            return entry
    for entry in output:
        if isinstance(entry, tuple) and entry and all(
                isinstance(layer, (tuple, list)) and layer and isinstance(layer[0], torch.Tensor) for layer in entry):
            return entry
    return None


# --- force_gate: per thread -----------------------------------------------------------------------

_UNSET = object()


def thread_slot(local: threading.local, name: str) -> Any:
    """``local.<name>`` in this thread, None when unset (and set to None then).

    Measured (CPython 3.11): reading a missing attribute of a threading.local costs 0.75 us (an
    AttributeError inside getattr), a present one 0.05 us, so each thread's slot is made once.
    Dynamo traces exactly this form, ``getattr`` on a plain threading.local, and guards on it per
    thread; a ``__dict__.get`` or a subclass's class-level default compiled to stale values."""
    value = getattr(local, name, _UNSET)
    if value is _UNSET:
        setattr(local, name, None)
        return None
    return value


class ForcedGates:
    """One thread's force_gate blocks: ``entries`` [(token, {layer: value})] in the order the blocks began;
    ``gates`` them merged (latest wins), None when none is open. A block keeps the object of the thread it
    began in, so that it ends there even when its ``with`` is left in another thread (a generator resumed by
    another worker); the lock orders such an end against that thread's own blocks."""

    def __init__(self) -> None:
        self.entries: list = []
        self.gates: dict[nn.Module, float] | None = None
        self.lock = threading.Lock()

    def replace(self, entries: list) -> None:
        merged: dict[nn.Module, float] = {}
        for _, gates in entries:
            merged.update(gates)
        self.entries = entries
        self.gates = merged or None


# .state: this thread's ForcedGates, made at its first block
_FORCED = threading.local()
# Whether a force_gate block is open in any thread: while none is (the common case) a layer reads no
# per-thread state for it. A bool, not a count, so a compiled graph guards on two values at most.
_any_forced = False
_open_blocks = 0
_open_blocks_lock = threading.Lock()


def forced_gate(layer: nn.Module) -> float | None:
    """The gate value ``force_gate`` imposes on ``layer`` in this thread, or None."""
    if not _any_forced:
        return None
    state = thread_slot(_FORCED, "state")
    gates = None if state is None else state.gates
    return None if gates is None else gates.get(layer)


@contextlib.contextmanager
def forcing(layers: Iterable[nn.Module], value: float) -> Iterator[None]:
    """Impose ``value`` on ``layers`` for the calling thread until the block ends.

    Blocks nest; each removes only its own entry when it ends, so blocks that end out of order
    (two generators, two asyncio tasks on one thread) still leave exactly the others in force. A block
    left in another thread than the one it began in (a generator resumed by another worker) ends in the
    thread it began in: that thread's later forwards are not forced. Meanwhile it applied where it began.
    """
    global _any_forced, _open_blocks
    token = object()
    entry = (token, {layer: float(value) for layer in layers})
    state = thread_slot(_FORCED, "state")
    if state is None:
        state = _FORCED.state = ForcedGates()
    with state.lock:
        state.replace([*state.entries, entry])
    with _open_blocks_lock:
        _open_blocks += 1
        _any_forced = True
    try:
        yield
    finally:
        with state.lock:
            state.replace([e for e in state.entries if e[0] is not token])
            if not state.entries and getattr(_FORCED, "state", None) is state:
                # this thread's record, emptied (by identity: a thread id can be reused by a new thread, whose
                # own record this is not): its slot as before its first block, so that a compiled model's guard
                # sees a thread that has forced and ended like one that never forced (one graph, not two)
                _FORCED.state = None
        with _open_blocks_lock:
            _open_blocks -= 1
            _any_forced = _open_blocks > 0
