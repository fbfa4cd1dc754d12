"""The torch backend of the multi-adapter op: the CPU path and the fallback everywhere.

Strategies (docs/design.md, "Several adapters": measured on one CPU core):

* ``concatenated`` (small M, and off the CPU): every adapter in one pair of matmuls. With the adapters'
  A stacked along the rank (``A_cat`` [R, K], ``R = sum r_i``) and B along its columns, each adapter's
  columns times its scaling (``B_cat`` [N, R]), both kept transposed, ``u = x A_cat^T`` holds every
  adapter's rank-r product of every row; setting to 0 the columns of u that are not the row's adapter's
  leaves exactly that adapter, and ``out.addmm_(u, B_cat^T)`` adds it. Four PyTorch calls whatever the
  number of adapters (at decode sizes each call costs more host time than its arithmetic), no host read
  (so the strategy off the CPU). Costs ``R / r`` times the arithmetic of one adapter per row. On the CPU a
  base row gets ``+0.0`` added (bit for bit its base output, but that an exact ``-0.0`` comes back ``+0.0``,
  as in the one-adapter folded strategy); off the CPU a ``where`` gives base rows back their exact bits.
  The columns are masked, not multiplied by 0: an inf in a base row, or an overflow in another adapter's
  columns, would otherwise become NaN (inf * 0) in the row's output.
* ``grouped`` (larger M on the CPU, the PEFT mixed batch's plan done once): the rows sorted by adapter
  (one ``argsort``) and counted on the host (one ``bincount`` read); the non-base rows gathered once,
  each adapter's two matmuls on its contiguous run of them, and one ``index_add_`` back. A batch whose
  rows all take one adapter is plain LoRA on every row, with no gather.

The weights are read where they live (``lora_a[i]``, ``lora_b[i]``); the concatenation is the one
derived copy, kept between calls and rebuilt when a weight changes (``multi_weights.concatenated``).
"""
from __future__ import annotations

from operator import is_

import torch
import torch.nn.functional as F

from .backends import register_multi, torch_runs_on_cpu
from .gates import cpu_scalar
from .multi_args import MultiLoraArgs, check_one_dtype
from .multi_weights import concatenated, copy_key
from .torch_backend import add_promoted

# At or below this many rows the concatenated strategy runs on the CPU (docs/design.md, "Several adapters").
CONCATENATED_MAX_ROWS = 32


def _lora_x(args: MultiLoraArgs) -> torch.Tensor:
    """x in the adapters' dtype (PEFT casts x to it)."""
    return args.x if args.x.dtype == args.lora_dtype else args.x.to(args.lora_dtype)


def _add(out: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """out += delta (into the rows ``rows`` of out), PEFT's dtype rule where the dtypes differ."""
    if out.dtype != delta.dtype:
        add_promoted(out, delta, 1.0, rows)
    elif rows is None:
        out.add_(delta)
    else:
        out.index_add_(0, rows, delta)


def add_concatenated(out: torch.Tensor, args: MultiLoraArgs) -> None:
    """Every adapter on every row in one pair of matmuls, each row keeping its own adapter's term."""
    add_concatenated_rows(out, args.x, args.lora_a, args.lora_b, args.scaling, args.adapter_index)


def add_concatenated_rows(out: torch.Tensor, x: torch.Tensor, lora_a: tuple, lora_b: tuple, scaling: tuple,
                          adapter_index: torch.Tensor, index_fixed: bool = False) -> None:
    """``add_concatenated`` on tensors (``ops.add_lora_multi_`` calls it without an arguments object). out: [M, N];
    x: [M, K]; lora_a: A tensors [r_i, K]; lora_b: [N, r_i]; scaling: one float per adapter; adapter_index: [M];
    index_fixed: see ``multi_weights.concatenated``."""
    lora_a_t, lora_b_t, not_owned, column_scale, nonfinite = concatenated(lora_a, lora_b, scaling, adapter_index,
                                                                          index_fixed)
    if x.dtype != lora_a_t.dtype or x.dtype == torch.bfloat16:
        x = x.to(lora_a_t.dtype)
        if x.dtype == torch.bfloat16 and x.is_cpu:
            # a bfloat16 matmul on the CPU computes rows in pairs: an inf in a base row would spoil its pair
            x = torch.where((adapter_index < 0).unsqueeze(1), cpu_scalar(0.0, x.dtype), x)
    u = torch.mm(x, lora_a_t)  # [M, R]
    if column_scale is not None:  # (fp16: the scaling of an adapter whose scaled B would overflow)
        u.mul_(column_scale)
    # Index -1 (the base output) and, off the CPU where the index is not checked, any value outside [0, A)
    # match no column: those rows add 0.
    u.masked_fill_(not_owned, 0)
    if nonfinite is None:
        _add_product(out, u, lora_b_t, not_owned)
        return
    # (CPU) some adapter's B holds inf or NaN: every row adds the product with those entries 0, and each such
    # adapter's rows take theirs with them (see multi_weights.nonfinite_adapters)
    finite_part, adapters = nonfinite
    before = out.clone()
    _add_product(out, u, finite_part, not_owned)
    for columns, lora_b_t_of_adapter in adapters:
        summed = before.clone()
        _add_product(summed, u, lora_b_t_of_adapter, not_owned)
        torch.where((columns & ~not_owned).any(dim=1, keepdim=True), summed, out, out=out)


class KeptConcatenation:
    """The concatenation one caller (a layer) last added with, and what it was built for: the weights (the same
    tensor objects, unchanged: ``copy_key``), the scalings tuple, the index tensor and its row count, the backend
    name. Read-only once built, so calls in other threads may read it while a new one replaces it."""

    __slots__ = ("key", "weights", "scaling", "index", "rows", "backend", "lora_a_t", "lora_b_t", "not_owned")

    def __init__(self, key: tuple, weights: tuple, scaling: tuple, index: torch.Tensor, backend: str,
                 concatenation: tuple) -> None:
        self.key, self.weights, self.scaling, self.index, self.backend = key, weights, scaling, index, backend
        self.rows = index.shape[0]
        self.lora_a_t, self.lora_b_t, self.not_owned = concatenation


def add_kept_concatenation_(out: torch.Tensor, x: torch.Tensor, kept: KeptConcatenation | None, lora_a: tuple,
                            lora_b: tuple, scaling: tuple, adapter_index: torch.Tensor, backend: str
                            ) -> KeptConcatenation | None:
    """``add_lora_multi_``'s concatenated strategy for a caller that keeps what it used: out [..., N] (contiguous)
    += each row's adapter's term for x [..., K], adapter_index [M] (fixed: the routing decision's); returns the
    concatenation used, ``kept`` where it still serves these arguments. None, with out unchanged, where the plain
    case does not hold: more than ``CONCATENATED_MAX_ROWS`` rows, another dtype than the weights', bfloat16, a
    backend that does not run CPU tensors on torch, inference tensors (nothing is kept for them), fp16's column
    factors, a B with non-finite entries. The caller runs on the CPU outside autograd, autocast and ``torch.compile``.

    Why a caller keeps one: at decode with 8 sequences on 4 adapters (the bench model, one CPU core) finding the
    shared forms by the weights' ids and comparing their nested key, and the op's frames, missed the cache often
    enough to cost a layer call more than PEFT's whole one-adapter call (docs/design.md, "What it costs on the
    CPU")."""
    rows = adapter_index.shape[0]
    if not 0 < rows <= CONCATENATED_MAX_ROWS:
        return None
    weights = lora_a + lora_b
    key = copy_key(weights)
    if kept is None or kept.key != key or kept.index is not adapter_index or kept.scaling is not scaling \
            or kept.backend is not backend or not all(map(is_, kept.weights, weights)):
        # (bfloat16: a CPU matmul computes rows in pairs, and add_concatenated_rows zeroes base rows of x first)
        if key is None or x.dtype != lora_a[0].dtype or x.dtype == torch.bfloat16 or not torch_runs_on_cpu(backend):
            return None
        lora_a_t, lora_b_t, not_owned, column_scale, nonfinite = concatenated(lora_a, lora_b, scaling,
                                                                              adapter_index, True)
        if column_scale is not None or nonfinite is not None:
            return None
        kept = KeptConcatenation(key, weights, scaling, adapter_index, backend, (lora_a_t, lora_b_t, not_owned))
    elif x.dtype != kept.lora_a_t.dtype:
        return None
    add_kept_product_(out, x, kept)
    return kept


def add_kept_product_(out: torch.Tensor, x: torch.Tensor, kept: KeptConcatenation) -> None:
    """out [..., N] (contiguous) += each row's adapter's term for x [..., K] (``kept.rows`` rows, the dtype of
    ``kept``'s weights): the concatenated strategy's arithmetic, with a concatenation that serves these arguments
    (``add_kept_concatenation_`` checks that)."""
    rows = kept.rows
    u = torch.mm(x.reshape(rows, -1), kept.lora_a_t)
    u.masked_fill_(kept.not_owned, 0)
    out.view(rows, -1).addmm_(u, kept.lora_b_t)


def _add_product(out: torch.Tensor, u: torch.Tensor, lora_b_t: torch.Tensor, not_owned: torch.Tensor) -> None:
    """out += u @ lora_b_t for the masked u [M, R], base rows (no column owned) keeping their bits off the CPU."""
    if out.is_cpu and out.dtype == u.dtype:
        out.addmm_(u, lora_b_t)
    elif not out.is_cpu:
        # A GPU's add returns its own NaN for any NaN (an H100 turned a poisoned base row's 0x7FC00000 into
        # 0x7FFFFFFF) and -0.0 + 0.0 is +0.0: base rows take their bits back with one where, a pass over out
        # that this fallback pays for bitwise base rows (on the CPU NaN keeps its bits, and the host time
        # of one more call is the decode target's margin).
        on_base = not_owned.all(dim=1, keepdim=True)
        summed = torch.addmm(out, u, lora_b_t) if out.dtype == u.dtype else (out + torch.mm(u, lora_b_t)).to(out.dtype)
        torch.where(on_base, out, summed, out=out)
    else:
        _add(out, torch.mm(u, lora_b_t))


def add_grouped(out: torch.Tensor, args: MultiLoraArgs) -> None:
    """CPU: the rows sorted and counted by adapter, each adapter's matmuls on its own rows only."""
    # The op's range check is skipped under torch.compile (a graph cannot raise on a value), so an index outside
    # [-1, A) can reach here: below -1 it goes to -1 (base), at or past A to A, a count no adapter's loop reads, so
    # those rows keep the base output, as on a GPU (unclamped, bincount refused -2 and rows past A added memory
    # nothing wrote). One small op on the index, at more than CONCATENATED_MAX_ROWS rows.
    index = args.adapter_index.clamp(-1, args.adapters)
    counts = torch.bincount(index + 1, minlength=args.adapters + 2).tolist()  # [base, adapter 0, ..., past A]
    if counts[0] + counts[-1] == args.m:
        return
    check_one_dtype(args.lora_a, args.lora_b, "gated_lora_multi")  # (the layers call the op without validation)
    x = _lora_x(args)
    whole = next((i for i, c in enumerate(counts[1:-1]) if c == args.m), None)
    if whole is not None:  # one adapter on every row: plain LoRA
        u = F.linear(x, args.lora_a[whole])
        if out.dtype == u.dtype:
            out.addmm_(u, args.lora_b[whole].t(), alpha=args.scaling[whole])
        else:
            add_promoted(out, F.linear(u, args.lora_b[whole]), args.scaling[whole])
        return
    rows = torch.argsort(index, stable=True)[counts[0]:args.m - counts[-1]]  # base rows (-1) sort first
    x = x.index_select(0, rows)
    delta = torch.empty(len(rows), args.n, dtype=x.dtype, device=x.device)
    start = 0
    for count, lora_a, lora_b, scaling in zip(counts[1:], args.lora_a, args.lora_b, args.scaling):
        if count:
            part = slice(start, start + count)
            torch.addmm(delta[part], F.linear(x[part], lora_a), lora_b.t(), beta=0, alpha=scaling, out=delta[part])
            start += count
    _add(out, delta, rows)


def add_nothing(out: torch.Tensor, args: MultiLoraArgs) -> None:
    """No adapter: every row keeps its base output."""


def choose_multi_strategy(args: MultiLoraArgs):
    """The function that adds the term for this configuration (the dispatcher caches it)."""
    if args.adapters == 0:
        return add_nothing
    if args.x.device.type != "cpu" or args.m <= CONCATENATED_MAX_ROWS:
        return add_concatenated
    return add_grouped


register_multi("torch", lambda args: [], choose_multi_strategy)
