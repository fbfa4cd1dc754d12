"""Several adapters' weights in the forms the multi-adapter kernels read, built once and kept in sync.

The op reads each adapter's ``lora_A``/``lora_B`` weight where it lives (PEFT keeps one module per
adapter, and training updates those parameters), so nothing is copied per call. Two derived forms
are kept per set of weights, each rebuilt only when what it depends on changes:

* ``pointer_table``: for the Triton kernel, one int64 row per field (A pointer, B pointer, rank, A row
  stride, B row stride) and one column per adapter, plus the scalings in fp32, on the weights' device.
  It holds addresses, not values, so an in-place update (an optimizer step, ``load_state_dict``) keeps
  it valid; it is rebuilt when a weight moves (``model.to``, FSDP2's unshard into new storage). A weight
  whose last dim is not unit-stride is pointed to through a contiguous copy kept with the table, which
  is then also rebuilt when that weight's version counter moves.
* ``concatenated``: for the torch backend's small-M strategy (one matmul for every adapter), the A's
  stacked along the rank and the B's along their columns, both kept transposed (``A_cat^T`` [K, R],
  ``B_cat^T`` [R, N], ``R = sum r_i``: the layouts a row-major matmul reads fastest) and a table of per-adapter
  column coefficients ``[A + 1, R]`` (row i: ``scaling[i]`` on adapter i's columns, 0 elsewhere; row A:
  zeros, which index -1 reads). Values are copied, so it is
  rebuilt when a weight's version counter or storage changes (one check per weight and call: about
  0.25 us each on the CPU). Every in-place update through autograd's view of a tensor moves its version
  counter (optimizer steps, ``load_state_dict``, writes under ``torch.no_grad()``); a write through
  ``param.data`` does not (``.data`` has a counter of its own), so such a write is not seen here.

Entries are found by the weights' identities (held weakly: a freed weight frees its forms), so a layer's
calls and a caller who passes the same tensors again share them, and two sets that share a weight do not
evict each other. Why pointer tables rather than a stacked copy for the kernel: docs/design.md,
"Several adapters".
"""
from __future__ import annotations

import weakref

import torch

from .multi_args import MultiLoraArgs

TABLE_FIELDS = 5  # A pointer, B pointer, rank, A row stride, B row stride

# The weights' ids (every A, then every B) -> their forms. Not a WeakKeyDictionary of tensors: its lookups
# compare keys with ``==``, which on tensors is elementwise.
_FORMS: dict[tuple[int, ...], "_Forms"] = {}


class _Forms:
    """The derived forms of one set of weights. It holds them weakly, and the first one freed removes it: so while
    it is in ``_FORMS`` every weight is alive, no other object can have one of their ids, and comparing ids
    (0.5 us for 8 weights) is comparing identities (weak references: 1.5 us)."""

    __slots__ = ("ids", "references", "scaling", "tables", "concatenation", "rows", "__weakref__")

    def __init__(self, weights: tuple, scaling: tuple) -> None:
        key = self.ids = tuple(map(id, weights))
        this = weakref.ref(self)

        def forget(_ref: weakref.ref) -> None:
            forms = this()
            if forms is not None and _FORMS.get(key) is forms:
                del _FORMS[key]

        self.references = tuple(weakref.ref(t, forget) for t in weights)
        self.scaling = scaling
        self.tables: dict = {}
        self.concatenation = None
        self.rows = None  # (index reference, its version, coefficients, [M, R]): see concatenated


def _forms(args: MultiLoraArgs) -> _Forms:
    weights = args.lora_a + args.lora_b
    ids = tuple(map(id, weights))
    forms = _FORMS.get(ids)
    if forms is None or forms.scaling != args.scaling:
        forms = _FORMS[ids] = _Forms(weights, args.scaling)
    return forms


def _versions(weights: tuple) -> tuple:
    """What changes when a weight's values or storage change: its data pointer and version counter (an
    inference tensor has no version counter; it can change in place only inside inference mode)."""
    try:
        return tuple((t.data_ptr(), t._version) for t in weights)
    except RuntimeError:  # "Inference tensors do not track version counter"
        return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in weights)


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def pointer_table(args: MultiLoraArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(table int64 [5, A], scaling fp32 [A]) on the weights' device, for ``args`` with at least one adapter.

    Built on the host and copied to the device the first time (and after a weight moves); a call that
    finds it current reads no tensor value and copies nothing, so it can be captured in a CUDA graph.
    """
    forms = _forms(args)
    weights = args.lora_a + args.lora_b
    pointers = tuple(t.data_ptr() for t in weights)
    entry = forms.tables.get(args.x.device)
    if entry is not None and entry[0] == pointers and (not entry[1] or _versions(weights) == entry[1]):
        return entry[2], entry[3]
    copied = _versions(weights) if any(_unit_inner(t) is not t for t in weights) else ()
    read = [_unit_inner(t) for t in weights]  # copies are kept alive with the table
    a, b = read[:args.adapters], read[args.adapters:]
    rows = [[t.data_ptr() for t in a], [t.data_ptr() for t in b], list(args.ranks),
            [t.stride(0) for t in a], [t.stride(0) for t in b]]
    table = torch.tensor(rows, dtype=torch.int64).to(args.x.device)
    scaling = torch.tensor(args.scaling, dtype=torch.float32).to(args.x.device)
    forms.tables[args.x.device] = (pointers, copied, table, scaling, read)
    return table, scaling


def concatenated(args: MultiLoraArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_cat^T [K, R], B_cat^T [R, N], each row's coefficients [M, R]) in the adapters' dtype, both weights
    contiguous (the module docstring).

    A row's coefficients are row ``adapter_index[m]`` of the table (-1 reads its last row, the zeros; off the
    CPU, where the index is not checked, one outside [-1, A) is clamped onto the zeros too). On the CPU they
    are kept for the last index tensor (a lookup costs 3.4 us; the patched layers pass one tensor for a whole
    generation) while its version counter stays (a refill in place moves it). An inference tensor has no
    version counter, and a CUDA graph would replay a lookup it never recorded: neither is kept.
    """
    forms = _forms(args)
    key = _versions(args.lora_a + args.lora_b)
    found = forms.concatenation
    if found is None or found[0] != key:
        found = forms.concatenation = (key, _concatenate(args))
    lora_a, lora_b, coefficients = found[1]
    index = args.adapter_index
    on_cpu = index.device.type == "cpu"
    if not on_cpu or index.dtype != torch.int64:
        index = index.long().clamp_(-1, args.adapters)
    if not on_cpu or index.is_inference():
        return lora_a, lora_b, coefficients[index]
    rows = forms.rows
    if rows is None or rows[0]() is not index or rows[1] != index._version or rows[2] is not coefficients:
        rows = forms.rows = (weakref.ref(index), index._version, coefficients, coefficients[index])
    return lora_a, lora_b, rows[3]


def _concatenate(args: MultiLoraArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_cat^T [K, R], B_cat^T [R, N], coefficients [A + 1, R]), built outside inference mode: the weights are
    ordinary tensors, so the copies are too, and later calls with autograd recording may read them.

    Transposed and contiguous because that is what the two matmuls read fastest: on one CPU core (M = 8,
    K = 256, N = 688, R = 64, fp32) ``mm(u, B_cat^T)`` took 5.4 us where ``addmm_`` on a transposed view
    of B_cat [N, R] took 11.7 us, and ``mm(x, A_cat^T)`` 3.2 us where ``F.linear(x, A_cat)`` took 4.7."""
    with torch.inference_mode(False), torch.no_grad():
        lora_a = torch.cat(args.lora_a, dim=0).t().contiguous()
        lora_b = torch.cat([b.t() for b in args.lora_b], dim=0)
        coefficients = torch.zeros(args.adapters + 1, lora_a.shape[1], dtype=lora_a.dtype, device=lora_a.device)
        start = 0
        for i, (rank, scale) in enumerate(zip(args.ranks, args.scaling)):
            coefficients[i, start:start + rank] = scale
            start += rank
    return lora_a, lora_b, coefficients
