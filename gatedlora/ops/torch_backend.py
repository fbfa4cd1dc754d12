"""The torch backend: the CPU path and the fallback everywhere.

Two strategies, chosen per configuration by size (``choose_strategy``; the measurements behind the
choice are in docs/design.md, "Choosing the strategy on the CPU"):

* ``masked``: the LoRA matmuls on every row, then the closed rows' term replaced by ``-0.0`` and the
  whole term added (``b + (-0.0) == b`` bit for bit for every ``b``, so closed rows stay exactly the
  base output, whatever a closed row of x holds: inf or NaN are overwritten before the add). No
  ``nonzero``, so no host sync: the only strategy off the CPU (CUDA-graph capturable there). On the
  CPU, where reading a value costs no sync, token gates first count the open rows (2 us): none open
  skips the matmuls, all open skips the mask.
* ``gathered``: the open rows found with ``nonzero``, gathered, multiplied and added back, so 6% open
  rows cost about 6% of the LoRA work and no open row costs no matmul. Gather and scatter cost more
  than the matmuls they save until the LoRA work per call is large (prefill-sized M).

Without a gate the term is added to every row.

Host cost: at decode sizes each PyTorch call costs 1 to 5 us of host time, more than its arithmetic,
and an operation with a Python float (``p >= 0.5``, ``t * 2.0``) costs about 2 us more than the same
operation with a 0-dim tensor (4.4 against 2.1 us for ``ge`` on one core): hence ``_scalar``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .args import GatedLoraArgs
from .backends import Backend, Launch, m_bucket, register_backend
from .contract import GateKind

# Multiply-adds of the LoRA term per call (M * r * (K + N)) from which gathering the open rows pays
# for its nonzero, index_select and index_add on the CPU (docs/design.md, "Choosing the strategy").
GATHER_MIN_WORK = 1 << 22

_SCALARS: dict[tuple[float, torch.dtype], torch.Tensor] = {}


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor holding ``value`` (fp64 for fp64 operands, else fp32: the precision PyTorch
    computes a Python float in, so results are bitwise those of the float)."""
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = _SCALARS.get((value, dtype))
    if t is None:
        if len(_SCALARS) > 1024:
            _SCALARS.clear()
        t = _SCALARS[(value, dtype)] = torch.tensor(value, dtype=dtype)
    return t


def _add(out: torch.Tensor, delta: torch.Tensor) -> None:
    """out += delta with PEFT's dtype rule: add in the promoted dtype, store in out's dtype."""
    if delta.dtype == out.dtype:
        out.add_(delta)
    else:
        out.copy_(out + delta)


def _lora_input(args: GatedLoraArgs) -> torch.Tensor:
    x = args.x
    return x if x.dtype == args.lora_a.dtype else x.to(args.lora_a.dtype)  # PEFT casts x to the LoRA dtype


def _probabilities(args: GatedLoraArgs) -> torch.Tensor:
    """Gate probabilities [M] in fp32 (fp64 for fp64 x), as ``gates.token_gate_probabilities``."""
    x = args.x
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if args.gate_kind is GateKind.TOKEN:
        w, bias = args.gate_weight, args.gate_bias
        x = x if x.dtype == dtype else x.to(dtype)
        w = w if w.dtype == dtype else w.to(dtype)
        return torch.addmv(bias if bias.dtype == dtype else bias.to(dtype), x, w).sigmoid_()
    gate = args.gate
    return gate if gate.dtype == dtype else gate.to(dtype)


def _lora_term(args: GatedLoraArgs, g: torch.Tensor | None, is_open: torch.Tensor | None = None) -> torch.Tensor:
    """``s * g * (x A^T) B^T`` [M, N] in the LoRA weights' dtype (g: [M] soft gate values, or None: 1),
    as PEFT's ``lora_B(lora_A(x)) * scaling``; the per-row factor scales [M, r], not [M, N]. With
    ``is_open`` [M] the closed rows of x are zeroed first where that is needed (see ``_rank_product``)."""
    delta = F.linear(_rank_product(args, g, is_open), args.lora_b)
    return delta.mul_(_scalar(args.scaling, delta.dtype) if delta.device.type == "cpu" else args.scaling)


def _rank_product(args: GatedLoraArgs, g: torch.Tensor | None, is_open: torch.Tensor | None = None) -> torch.Tensor:
    """``g * (x A^T)`` [M, r]. A bfloat16 matmul on the CPU (oneDNN) computes rows in pairs, so an inf
    or NaN in one row of x also spoils the other row of its pair: there closed rows are zeroed first
    (one more pass over x; fp32 and fp16 matmuls keep rows apart)."""
    x = _lora_input(args)
    if is_open is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        x = torch.where(is_open.unsqueeze(1), x, _scalar(0.0, x.dtype))
    u = F.linear(x, args.lora_a)
    return u if g is None else u.mul_(g.to(u.dtype).unsqueeze(1))


def _add_every_row(out: torch.Tensor, args: GatedLoraArgs, g: torch.Tensor | None) -> None:
    """``out += s * g * (x A^T) B^T`` on every row. Where out has the LoRA dtype, the second matmul, the
    scaling and the add are one ``addmm_`` (one call instead of three: about 2.5 us less at decode
    sizes, and one rounding fewer than PEFT's)."""
    u = _rank_product(args, g)
    if out.dtype == u.dtype == args.lora_b.dtype:  # (under autocast u may come out in a lower precision)
        out.addmm_(u, args.lora_b.t(), alpha=args.scaling)
    else:
        delta = F.linear(u, args.lora_b)
        out.copy_(out + delta.mul_(_scalar(args.scaling, delta.dtype) if delta.device.type == "cpu" else args.scaling))


def add_every_row(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """No gate: ``out += s * (x A^T) B^T``."""
    _add_every_row(out, args, None)


def _gate(args: GatedLoraArgs, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(is_open [M] bool, soft gate values [M] or None for hard gates). NaN closes the gate."""
    if args.hard:
        on_cpu = p.device.type == "cpu"
        return p.ge(_scalar(args.threshold, p.dtype) if on_cpu else args.threshold), None
    g = torch.nan_to_num(p, nan=0.0)
    return g != 0, g


def _masked(count_open: bool) -> Launch:
    def add_masked(out: torch.Tensor, args: GatedLoraArgs) -> None:
        is_open, g = _gate(args, _probabilities(args))
        if count_open:
            opened = is_open.count_nonzero().item()
            if opened == 0:
                return
            if opened == args.m:
                _add_every_row(out, args, g)
                return
        delta = _lora_term(args, g, is_open)
        negative_zero = _scalar(-0.0, delta.dtype) if delta.device.type == "cpu" else -0.0
        delta.masked_fill_(is_open.logical_not_().unsqueeze_(1), negative_zero)
        _add(out, delta)

    return add_masked


add_masked = _masked(count_open=False)
add_masked_counted = _masked(count_open=True)


def add_one_row(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """M = 1 on the CPU: one read of the gate (1.5 us) decides, where masking would cost more."""
    p = _probabilities(args)
    value = p.item()
    if args.hard:
        if value >= args.threshold:  # NaN compares false: NaN closes
            _add_every_row(out, args, None)
    elif value == value and value != 0.0:
        _add_every_row(out, args, p)


def add_gathered(out: torch.Tensor, args: GatedLoraArgs) -> None:
    """The LoRA matmuls on the open rows only (found with ``nonzero``: a host sync on a GPU)."""
    is_open, g = _gate(args, _probabilities(args))
    open_rows = is_open.nonzero().flatten()
    if open_rows.numel() == 0:
        return
    if open_rows.numel() == args.m:
        _add_every_row(out, args, g)
        return
    rows = args.replace(x=args.x.index_select(0, open_rows))
    delta = _lora_term(rows, None if g is None else g.index_select(0, open_rows))
    if delta.dtype == out.dtype:
        out.index_add_(0, open_rows, delta)
    else:
        out.index_copy_(0, open_rows, (out.index_select(0, open_rows) + delta).to(out.dtype))


def choose_strategy(args: GatedLoraArgs) -> Launch:
    """The function that adds the term for this configuration (``TorchBackend.launcher``)."""
    if args.gate_kind is GateKind.NONE:
        return add_every_row
    if args.x.device.type != "cpu":
        return add_masked  # nonzero, or reading a value, would sync with the device
    if args.m == 1:
        return add_one_row
    if m_bucket(args.m) * args.r * (args.k + args.n) >= GATHER_MIN_WORK:
        return add_gathered
    # Token gates are decided inside the call, so the host learns only here whether every row is
    # open or closed; a given gate comes from a router that already told the host (routing.py).
    return add_masked_counted if args.gate_kind is GateKind.TOKEN else add_masked


class TorchBackend(Backend):
    name = "torch"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        return []

    def launcher(self, args: GatedLoraArgs) -> Launch:
        return choose_strategy(args)


register_backend(TorchBackend())
