"""The torch backend: the CPU path and the fallback everywhere.

Strategies (measured on one CPU core, in docs/design.md, "Choosing the strategy on the CPU"):

* ``folded``: the gate folded into the matmuls: ``u = x A^T`` on every row, closed rows of ``u`` set to
  0 (``torch.where`` on [M, r]: an inf or NaN in a closed row of x goes no further) and soft gates
  scaled in, then ``out.addmm_(u, B^T, alpha=s)``: the second matmul, the scaling and the add in one
  call. No host read, so the strategy off the CPU (no sync, CUDA-graph capturable). A closed row gets
  ``+0.0`` added: bit for bit its base output, except that an exact ``-0.0`` in it comes back ``+0.0``
  (equal as numbers; masking the [M, N] term instead would keep the sign and cost 2.5x the add
  itself at prefill sizes).
* ``gathered``: the open rows found with ``nonzero``, gathered, multiplied and added back with
  ``index_add_``: closed rows are not touched at all. Costs about twice as much per open row as the
  folded strategy per row, so it pays when fewer than half the rows are open and M is not tiny.
* on the CPU, where reading a value costs no device sync, the host first counts the open rows (1 to 2
  us): none open costs nothing more, all open is plain LoRA, otherwise folded or gathered by the
  count; a single row (decode at batch 1) reads its gate instead. A given gate on fewer rows than
  gathering needs is folded without counting (its router has already told the host when every row
  is open or closed).

Without a gate the term is added to every row (``addmm_``).

Host cost: at decode sizes each PyTorch call costs 1 to 5 us of host time, more than its arithmetic;
scalars travel as cached 0-dim tensors (``gates.cpu_scalar``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .args import GatedLoraArgs
from .backends import Backend, Launch, m_bucket, register_backend
from .contract import GateKind
from .gates import cpu_scalar, gate_is_open, open_rows, probability_dtype, token_gate_probabilities

# Gathering needs at least this many rows to pay for its nonzero and index_add (docs/design.md).
GATHER_MIN_ROWS = 16

def _lora_input(args: GatedLoraArgs, open_column: torch.Tensor | None = None) -> torch.Tensor:
    """x in the LoRA dtype (PEFT casts x to it). A bfloat16 matmul on the CPU (oneDNN) computes rows in
    pairs, so an inf or NaN in one row of x also spoils the other row of its pair: there the closed rows
    (``open_column`` [M, 1] False) are zeroed first; fp32 and fp16 matmuls keep rows apart."""
    x = args.x
    x = x if x.dtype == args.lora_a.dtype else x.to(args.lora_a.dtype)
    if open_column is not None and x.dtype == torch.bfloat16 and x.is_cpu:
        x = torch.where(open_column, x, _zero(x))
    return x


def _probabilities(args: GatedLoraArgs) -> torch.Tensor:
    """Gate probabilities [M] in fp32 (fp64 for fp64 x), as ``gates.token_gate_probabilities``."""
    if args.gate_kind is GateKind.TOKEN:
        return token_gate_probabilities(args.x, args.gate_weight, args.gate_bias)
    gate, dtype = args.gate, probability_dtype(args.x.dtype)
    return gate if gate.dtype == dtype else gate.to(dtype)


def _gate(args: GatedLoraArgs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(is_open [M] bool, soft gate values [M] or None for hard gates). NaN closes the gate. Bool decisions
    are is_open itself, hard or soft (a soft gate of 1 scales by nothing)."""
    if args.gate_kind is GateKind.GIVEN and args.gate.dtype == torch.bool:
        return args.gate, None
    p = _probabilities(args)
    if args.hard:
        return open_rows(p, args.threshold, True), None
    g = torch.nan_to_num(p, nan=0.0)
    return g != 0, g


def _add_product(out: torch.Tensor, u: torch.Tensor, args: GatedLoraArgs, rows: torch.Tensor | None = None) -> None:
    """``out += s * u B^T`` (u: [M, r]), or into the rows ``rows`` of out. Where out has the LoRA dtype
    the second matmul, the scaling and the add are one call (``addmm_``/``index_add_`` with alpha), else
    PEFT's dtype rule: add in the promoted dtype, store in out's dtype."""
    b = args.lora_b
    if out.dtype == u.dtype == b.dtype:  # (under autocast u may come out in a lower precision)
        if rows is None:
            out.addmm_(u, b.t(), alpha=args.scaling)
        else:
            out.index_add_(0, rows, F.linear(u, b), alpha=args.scaling)
        return
    add_promoted(out, F.linear(u, b), args.scaling, rows)


def add_promoted(out: torch.Tensor, delta: torch.Tensor, scaling: float, rows: torch.Tensor | None = None) -> None:
    """``out += scaling * delta`` (delta [M, N], or [len(rows), N] into the rows ``rows`` of out) where delta has
    another dtype than out: PEFT's rule, add in the promoted dtype and store in out's dtype."""
    if scaling != 1.0:  # (a product with 1.0 is exact: skipping it changes no bit)
        delta = delta.mul_(cpu_scalar(scaling, delta.dtype) if delta.device.type == "cpu" else scaling)
    if rows is None:
        out.copy_(out + delta)
    else:
        out.index_copy_(0, rows, (out.index_select(0, rows) + delta).to(out.dtype))


def _add_every_row(out: torch.Tensor, args: GatedLoraArgs, g: torch.Tensor | None) -> None:
    u = F.linear(_lora_input(args), args.lora_a)
    _add_product(out, u if g is None else u.mul_(g.to(u.dtype).unsqueeze(1)), args)


def add_every_row(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """No gate: ``out += s * (x A^T) B^T``. (``_add_every_row`` without its frames: where a Python call costs
    about 1 us, on the path of every layer without a gate.)"""
    x, a = args.x, args.lora_a
    if out.dtype == x.dtype == a.dtype == args.lora_b.dtype:
        addmm_lora_(out, x, a, args.lora_b, args.scaling)
    else:
        _add_product(out, F.linear(x.to(a.dtype), a), args)


def addmm_lora_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """Plain LoRA where every dtype is the same: ``out += scaling * (x A^T) B^T``, the second matmul, the
    scaling and the add in one ``addmm_``. out: [M, N]; x: [M, K]; lora_a: [r, K]; lora_b: [N, r]."""
    out.addmm_(F.linear(x, lora_a), lora_b.t(), alpha=scaling)


def _zero(t: torch.Tensor) -> torch.Tensor | float:
    return cpu_scalar(0.0, t.dtype) if t.is_cpu else 0.0


def _add_folded(out: torch.Tensor, args: GatedLoraArgs, is_open: torch.Tensor, g: torch.Tensor | None) -> None:
    open_column = is_open.unsqueeze(1)
    u = F.linear(_lora_input(args, open_column), args.lora_a)  # [M, r]
    if g is not None:
        u.mul_(g.to(u.dtype).unsqueeze(1))
    # one call where masked_fill_ on the negated mask is two (3.6 against 4.1 us at M=8, r=16, one core)
    _add_product(out, torch.where(open_column, u, _zero(u)), args)


def add_folded(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """Every row through the matmuls, closed rows zeroed in ``u``: no host read."""
    is_open, g = _gate(args)
    _add_folded(out, args, is_open, g)


def _add_gathered(out: torch.Tensor, args: GatedLoraArgs, is_open: torch.Tensor, g: torch.Tensor | None) -> None:
    rows = is_open.nonzero().flatten()
    u = F.linear(_lora_input(args).index_select(0, rows), args.lora_a)
    if g is not None:
        u.mul_(g.index_select(0, rows).to(u.dtype).unsqueeze(1))
    _add_product(out, u, args, rows)


def add_gathered(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """The LoRA matmuls on the open rows only (``nonzero``: a host read)."""
    is_open, g = _gate(args)
    _add_gathered(out, args, is_open, g)


def add_counted(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """CPU, M > 1: count the open rows, then nothing, every row, gathered or folded."""
    is_open, g = _gate(args)
    opened = is_open.count_nonzero().item()
    if opened == 0:
        return
    if opened == args.m:
        _add_every_row(out, args, g)
    elif 2 * opened < args.m and args.m >= GATHER_MIN_ROWS:
        _add_gathered(out, args, is_open, g)
    else:
        _add_folded(out, args, is_open, g)


def add_one_row(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """M = 1 on the CPU: one read of the gate (1.5 us) decides."""
    p = _probabilities(args)  # (bool decisions: 0 or 1, which the rule reads as the decision)
    if gate_is_open(p, args.threshold, args.hard):
        _add_every_row(out, args, None if args.hard else p)


def choose_strategy(args: GatedLoraArgs) -> Launch:
    """The function that adds the term for this configuration (``TorchBackend.launcher``). It is cached per
    dispatch key, so it decides on the key's M bucket, never on M itself (M = 15 and 16 share a bucket)."""
    if args.gate_kind is GateKind.NONE:
        return add_every_row
    if args.x.device.type != "cpu":
        return add_folded  # counting or nonzero would sync with the device
    if args.m == 1:
        return add_one_row
    if m_bucket(args.m) < GATHER_MIN_ROWS and args.gate_kind is GateKind.GIVEN:
        # Too few rows to gather, and a given gate comes from a router that has already told the host
        # when every row is open or closed (routing.py): counting would only find a mixed batch.
        return add_folded
    return add_counted


class TorchBackend(Backend):
    name = "torch"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        return []

    def launcher(self, args: GatedLoraArgs) -> Launch:
        return choose_strategy(args)


register_backend(TorchBackend())
