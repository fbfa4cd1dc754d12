"""Several adapters' weights in the forms the multi-adapter kernels read, built once and kept in sync.

The op reads each adapter's ``lora_A``/``lora_B`` weight where it lives (PEFT keeps one module per
adapter, and training updates those parameters), so nothing is copied per call. Two derived forms
are kept per set of weights, each rebuilt only when what it depends on changes:

* ``pointer_table``: for the Triton kernel, one int64 row per field (A pointer, B pointer, rank, A row
  stride, B row stride) and one column per adapter, plus the scalings in fp32, on the weights' device.
  It holds addresses, not values, so an in-place update (an optimizer step, ``load_state_dict``) keeps
  it valid; it is rebuilt when a weight moves (``model.to``, FSDP2's unshard into new storage), when a rank
  changes, and after ``forget_kept_copies()`` (a ``.data`` assignment can keep the address). A weight
  whose last dim is not unit-stride is pointed to through a contiguous copy kept with the table, which
  is then also refreshed when that weight's version counter moves. A rebuild keeps the table tensor
  where its rows come out the same, and refreshes a copy in place where it can: a CUDA graph captured with
  them reads those addresses.
* ``concatenated``: for the torch backend's small-M strategy (one matmul for every adapter), the A's
  stacked along the rank and the B's along their columns, both kept transposed (``A_cat^T`` [K, R],
  ``B_cat^T`` [R, N], ``R = sum r_i``: the layouts a row-major matmul reads fastest), each adapter's rows
  of ``B_cat^T`` multiplied by its scaling, and which adapter owns each of the R columns (int64 [R]).
  Values are copied, so it is rebuilt when a weight's version counter or storage changes, the scalings,
  or after any ``torch.optim`` optimizer step (one check per weight and call: about 0.25 us each on the
  CPU, and one int comparison for the steps).

What makes a kept copy stale, and what is seen:

* Writes through autograd's view of a tensor move its version counter (non-fused optimizer steps,
  ``load_state_dict``, ``copy_`` or ``mul_`` under ``torch.no_grad()``): seen.
* Fused optimizer kernels (``fused=True`` on Adam, AdamW, SGD, ...) write without moving the counter. So
  the first kept copy registers one global optimizer step post-hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) that advances ``_optimizer_steps``, and
  every copy is keyed by that count too: any step of a ``torch.optim.Optimizer`` (fused, foreach or not;
  subclasses such as bitsandbytes' or apex's optimizers get the hook) invalidates every kept copy. A post-
  hook, read before a copy is built: a copy built while a step runs in another thread is keyed with the
  count from before the step, so the next call rebuilds it.
* Inference tensors (made under ``torch.inference_mode()``) have no version counter and may be updated in
  place inside inference mode: nothing is kept for them, the concatenation is rebuilt in every call (and a
  pointer table that reads a contiguous copy of one rebuilds that copy).
* Not seen: a write through ``param.data`` (``.data`` has a counter of its own), through a NumPy view,
  DLPack or ``__cuda_array_interface__`` (another framework's kernel), a custom kernel writing through
  ``data_ptr()``, or an optimizer that is not a ``torch.optim.Optimizer`` and writes with fused kernels.
  After such a write, call ``gatedlora.ops.forget_kept_copies()``.

Entries are found by the weights' identities (held weakly: a freed weight frees its forms), so a layer's
calls and a caller who passes the same tensors again share them, and two sets that share a weight do not
evict each other. Why pointer tables rather than a stacked copy for the kernel: docs/design.md,
"Several adapters".
"""
from __future__ import annotations

import operator
import weakref
from itertools import chain

import torch

from .contract import has_unit_inner_stride, unit_inner_stride
from .args import check_loaded
from .multi_args import MultiLoraArgs, check_one_dtype

TABLE_FIELDS = 5  # A pointer, B pointer, rank, A row stride, B row stride
_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")
_MASKS_KEPT = 8  # column masks per set of weights (index tensors alive at once: one per generation and row count)

# Advanced after every torch.optim optimizer step (a post-hook, registered at the first kept copy) and by
# forget_kept_copies(): a copy keyed by an older value is rebuilt (the module docstring).
_epoch = 0
# Advanced by forget_kept_copies() alone: pointer tables hold addresses, which an optimizer step does not move.
_forgotten = 0
_step_hook = None

# The weights' ids (every A, then every B) -> their forms. Not a WeakKeyDictionary of tensors: its lookups
# compare keys with ``==``, which on tensors is elementwise.
_FORMS: dict[tuple[int, ...], "_Forms"] = {}


class _Forms:
    """The derived forms of one set of weights. It holds them weakly, and the first one freed removes it: so while
    it is in ``_FORMS`` every weight is alive, no other object can have one of their ids, and comparing ids
    (0.5 us for 8 weights) is comparing identities (weak references: 1.5 us)."""

    __slots__ = ("ids", "references", "scaling", "tables", "concatenation", "column_masks", "__weakref__")

    def __init__(self, weights: tuple, scaling: tuple) -> None:
        key = self.ids = tuple(map(id, weights))
        this = weakref.ref(self)

        def forget(_ref: weakref.ref) -> None:  # may run in any thread, as two weights of a set are freed
            forms = this()
            if forms is not None and _FORMS.get(key) is forms:
                _FORMS.pop(key, None)

        self.references = tuple(weakref.ref(t, forget) for t in weights)
        self.scaling = scaling
        self.tables: dict = {}
        self.concatenation = None
        self.column_masks: dict = {}


def _forms(weights: tuple, scaling: tuple) -> _Forms:
    """The forms of ``weights`` (every A, then every B) with these scalings."""
    ids = tuple(map(id, weights))
    forms = _FORMS.get(ids)
    if forms is None or forms.scaling != scaling:
        forms = _FORMS[ids] = _Forms(weights, scaling)
    return forms


def forget_kept_copies() -> None:
    """Make every kept copy of adapters' weights (the torch backend's concatenation, a pointer table's contiguous
    copies) be rebuilt at its next use. Needed only after a write that moves no version counter and is not a
    ``torch.optim`` optimizer step: through ``param.data``, a NumPy view, DLPack, another framework's kernel."""
    global _epoch, _forgotten
    _forgotten += 1
    _epoch += 1


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _epoch
    _epoch += 1


def _watch_optimizers() -> None:
    """Register the optimizer step post-hook once, when the first copy is kept (importing gatedlora adds nothing
    to the steps of a process that never keeps one)."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def copy_key(weights: tuple) -> tuple | None:
    """What a copy of the weights' values stays valid for: (epoch, then each weight's data pointer, then each one's
    version counter), one flat tuple (nested pairs are more objects to compare, each a cache miss at a decode step;
    ``map`` over the weights runs no bytecode per weight). None when a weight is an inference tensor: it has no
    version counter and can change in place inside inference mode, so nothing derived from its values may be kept."""
    try:
        return (_epoch, *map(_data_ptr, weights), *map(_version, weights))  # (the epoch read before the copy is built)
    except RuntimeError:  # "Inference tensors do not track version counter"
        if any(t.is_inference() for t in weights):
            return None
        raise


def joined_key(keys: list[tuple]) -> tuple | None:
    """``copy_key`` of several sets of weights one after the other, from each set's own key; None where the keys
    were taken at different epochs (no current key equals that)."""
    if len({key[0] for key in keys}) > 1:
        return None
    halves = [(len(key) - 1) // 2 for key in keys]
    return (keys[0][0] if keys else _epoch, *chain.from_iterable(key[1:1 + n] for key, n in zip(keys, halves)),
            *chain.from_iterable(key[1 + n:] for key, n in zip(keys, halves)))


def pointer_table(args: MultiLoraArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(table int64 [5, A], scaling fp32 [A]) on the weights' device, for ``args`` with at least one adapter.

    Built on the host and copied to the device the first time (and after a weight moves); a call that
    finds it current reads no tensor value and copies nothing, so it can be captured in a CUDA graph.
    """
    weights = args.lora_a + args.lora_b
    forms = _forms(weights, args.scaling)
    # (the ranks: a weight cut down through ``.data`` keeps its address, and the kernel would read past its end)
    pointers = (_forgotten, args.ranks, tuple(t.data_ptr() for t in weights))
    entry = forms.tables.get(args.x.device)
    if entry is not None and entry[0] == pointers:
        kept = entry[1]  # () without copies; None: copies of inference tensors, rebuilt in every call
        if kept == () or (kept is not None and kept == copy_key(weights)):
            return entry[2], entry[3]
    # rebuilt whenever a weight is replaced, so a check here sees every weight the table will point to (the
    # layers call the op without validation)
    check_one_dtype(args.lora_a, args.lora_b, "gated_lora_multi")
    check_loaded(weights, args.x, "gated_lora_multi")  # (a meta weight's data_ptr is 0: the kernel would read 0)
    # Only the contiguous copies are kept with the table (the weights themselves must stay free to be freed:
    # their weak references are what removes these forms). Copies of inference tensors are kept too, until
    # the next call rebuilds them: the kernel that reads them is launched after this returns.
    copies = _contiguous_copies(weights, entry[4] if entry is not None else {})
    if copies:
        _watch_optimizers()
    copied = copy_key(weights) if copies else ()
    read = [copies.get(i, t) for i, t in enumerate(weights)]
    a, b = read[:args.adapters], read[args.adapters:]
    rows = [[t.data_ptr() for t in a], [t.data_ptr() for t in b], list(args.ranks),
            [t.stride(0) for t in a], [t.stride(0) for t in b]]
    if entry is not None and entry[5] == rows:
        # the same addresses (forget_kept_copies, an optimizer step, a copy refreshed in place): the table kept, as
        # a CUDA graph captured with it reads it on every replay (a new one would free the captured one)
        table, scaling = entry[2], entry[3]
    else:
        table = torch.tensor(rows, dtype=torch.int64).to(args.x.device)
        scaling = torch.tensor(args.scaling, dtype=torch.float32).to(args.x.device)
    forms.tables[args.x.device] = (pointers, copied, table, scaling, copies, rows)
    return table, scaling


def _contiguous_copies(weights: tuple, kept: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """A contiguous copy of each weight whose last dim is not unit-stride, by its place in ``weights``. A copy
    ``kept`` for that place with the same shape, dtype and device is refreshed in place, so its address stays the
    one a table (and a CUDA graph captured with it) reads; an inference tensor only inside inference mode."""
    copies = {}
    for i, weight in enumerate(weights):
        if has_unit_inner_stride(weight):
            continue
        old = kept.get(i)
        if old is not None and (old.shape, old.dtype, old.device) == (weight.shape, weight.dtype, weight.device) \
                and (not old.is_inference() or torch.is_inference_mode_enabled()):
            with torch.no_grad():
                copies[i] = old.copy_(weight)
        else:
            copies[i] = unit_inner_stride(weight)
    return copies


def concatenated(lora_a: tuple, lora_b: tuple, scaling: tuple, adapter_index: torch.Tensor, index_fixed: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple | None]:
    """(A_cat^T [K, R], scaled B_cat^T [R, N], not_owned bool [M, R], None, None) in the adapters' dtype, both
    weights contiguous (the module docstring), for rows whose adapters are ``adapter_index`` [M]: ``not_owned[m, j]``
    where column j of ``x A_cat^T`` is not row m's adapter's (index -1, and any index outside [0, A), match
    no column). Read-only for the caller; shared by every call with these weights. In fp16 the fourth item
    is a factor for each column of ``x A_cat^T`` [R], the scaling of an adapter whose B is kept unscaled there
    (``_concatenate``); on the CPU, where some entry of B_cat^T is not finite, the last is
    ``nonfinite_adapters``'s.

    ``index_fixed``: the caller never changes this index tensor's values (the layers' index comes from the
    routing decision, one tensor per generation and row count), so on the CPU its mask is kept with the
    concatenation: the comparison ran in every layer of every decode step, where each op costs more than
    alone. Otherwise the mask is computed per call: a write through ``.data`` moves no version counter, and
    a CUDA graph replays what was captured, so a kept mask would not follow an index updated in place."""
    weights = lora_a + lora_b
    forms = _forms(weights, scaling)
    key = copy_key(weights)
    if key is None:  # inference tensors: nothing kept
        lora_a_t, lora_b_t, owners, column_scale, nonfinite = _concatenate(lora_a, lora_b, scaling, adapter_index)
        return lora_a_t, lora_b_t, owners != adapter_index.unsqueeze(1), column_scale, nonfinite
    found = forms.concatenation
    if found is None or found[0] != key:
        _watch_optimizers()
        found = forms.concatenation = (key, _concatenate(lora_a, lora_b, scaling, adapter_index))
        forms.column_masks = {}
    lora_a_t, lora_b_t, owners, column_scale, nonfinite = found[1]
    if not (index_fixed and adapter_index.is_cpu):
        return lora_a_t, lora_b_t, owners != adapter_index.unsqueeze(1), column_scale, nonfinite
    masks = forms.column_masks
    entry = masks.get(id(adapter_index))
    if entry is None:  # (the entry holds the index, so its id is not reused while it is here)
        if len(masks) >= _MASKS_KEPT:
            masks.clear()
        entry = masks[id(adapter_index)] = (adapter_index, owners != adapter_index.unsqueeze(1))
    return lora_a_t, lora_b_t, entry[1], column_scale, nonfinite


def _concatenate(lora_a: tuple, lora_b: tuple, scaling: tuple, adapter_index: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple | None]:
    """(A_cat^T [K, R], scaled B_cat^T [R, N], owners [R], None, None), built outside inference mode: the weights are
    ordinary tensors, so the copies are too, and later calls with autograd recording may read them.
    ``adapter_index``: the call's index, on x's device (for ``check_loaded``).

    In fp16 B times its scaling can overflow where the term does not (|B| * scaling > 65504), and an inf in
    B_cat^T made NaN (0 * inf) of every row's term, base rows included; scaling ``u`` instead overflows where
    |x A^T| * scaling does (x A^T of 5000 at scaling 16). So in fp16 each adapter's B is scaled where that stays
    finite, and kept unscaled otherwise, and the last item holds each column's factor for ``u`` [R] (1, or the
    scaling of an unscaled adapter), chosen on the device (no host read: a sync off the CPU).

    Transposed and contiguous because that is what the two matmuls read fastest: on one CPU core (M = 8,
    K = 256, N = 688, R = 64, fp32) ``mm(u, B_cat^T)`` took 5.4 us where ``addmm_`` on a transposed view
    of B_cat [N, R] took 11.7 us, and ``mm(x, A_cat^T)`` 3.2 us where ``F.linear(x, A_cat)`` took 4.7."""
    check_one_dtype(lora_a, lora_b, "gated_lora_multi")  # as in pointer_table: on every build
    check_loaded(lora_a + lora_b, adapter_index, "gated_lora_multi")
    with torch.inference_mode(False), torch.no_grad():
        a_t = torch.cat(lora_a, dim=0).t().contiguous()
        ranks = torch.tensor([a.shape[0] for a in lora_a], device=a_t.device)
        # (output_size: no host read of the ranks, and a meta tensor needs it)
        owners = torch.repeat_interleave(torch.arange(len(lora_a), device=a_t.device), ranks, output_size=a_t.shape[1])
        if a_t.dtype == torch.float16:
            one = torch.ones((), dtype=a_t.dtype, device=a_t.device)
            parts, factors = [], []
            for b, scale in zip(lora_b, scaling):
                scaled = b.t() * scale
                fits = (scaled.isfinite() | ~b.t().isfinite()).all()
                parts.append(torch.where(fits, scaled, b.t()))
                factors.append(torch.where(fits, one, one * scale))
            b_t = torch.cat(parts, dim=0)
            column_scale = torch.repeat_interleave(torch.stack(factors), ranks, output_size=a_t.shape[1])
        else:
            b_t = torch.cat([b.t() * scale for b, scale in zip(lora_b, scaling)], dim=0)
            column_scale = None
        nonfinite = nonfinite_adapters(b_t, owners, len(lora_a)) if b_t.is_cpu else None
    return a_t, b_t, owners, column_scale, nonfinite


def nonfinite_adapters(lora_b_t: torch.Tensor, owners: torch.Tensor, adapters: int) -> tuple | None:
    """For ``B_cat^T`` [R, N] on the CPU: None when every entry is finite (one host read a build, free on the CPU),
    else (``B_cat^T`` with its non-finite entries 0, ((adapter i's columns [R] bool, ``B_cat^T`` with only adapter
    i's non-finite entries kept), ...) for each adapter i that holds one).

    The masked ``u`` times ``B_cat^T`` multiplies 0 by every entry of the columns a row does not own, and 0 * inf
    is NaN: one adapter whose B had diverged made NaN of every row of the batch, base rows and other adapters'
    included. Off the CPU, where reading would sync, base rows are restored by a where and other adapters' rows are
    not (docs/design.md, "Several adapters")."""
    finite = lora_b_t.isfinite()
    if bool(finite.all()):
        return None
    finite_columns = finite.all(dim=1)
    finite_part = torch.where(finite, lora_b_t, 0)
    found = []
    for adapter in range(adapters):
        columns = owners == adapter
        if not bool(finite_columns[columns].all()):
            found.append((columns, torch.where(columns.unsqueeze(1), lora_b_t, finite_part)))
    return finite_part, tuple(found)
