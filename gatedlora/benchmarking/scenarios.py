"""Model-level scenarios: prefill and per-token decode, each provider on the same inputs.

Providers: the base model; PEFT LoRA unmerged (adapter on every sequence); PEFT's mixed batch
(``adapter_names`` with ``"__base__"`` for closed sequences); PRISM's two-pass route (a base
forward pass to route, then the open sequences again with the adapter; closed sequences reuse
the routing pass); gatedlora, one pass with sequence gates, per backend.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import GatedLoraConfig
from ..patching import patch_model
from ..routing import PrismRouter
from .cuda_graphs import step_tokens
from .models import weight_sharing_copy
from .report import NOT_BITWISE

# Runs of the base model a check compares closed sequences with (``compare_outputs``): on an H200 (torch 2.11) the
# base model's decode step at batch 8 over 512 tokens was not reproducible run to run, so one run could not tell
# gatedlora's base sequences from the base model's; three runs cost a few steps of each scenario.
BASE_RUNS = 3
# Where those runs differ, a closed sequence that matches none of them passes within this many times their largest
# difference from one another: a correct output is one more draw of the same kernels, which three runs sample
# only roughly; a leak of the adapter into base sequences is not bounded by the base model's own noise.
NOT_BITWISE_SPREADS = 2.0


class PatternRouter(nn.Module):
    """PRISM's router MLP, run for its real cost, whose decisions the scenario sets (``pattern`` [B])."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = PrismRouter(hidden_size)
        self.pattern: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the pattern, after the MLP has run (alpha=0 adds nothing: one call, where `* 0 +` was two)
        return torch.add(self.pattern.to(device=hidden.device, dtype=hidden.dtype), self.mlp(hidden), alpha=0)


@dataclass(frozen=True)
class Scenario:
    phase: str  # "prefill" or "decode"
    batch: int
    tokens: int  # prompt length
    open_count: int  # sequences whose gate is open

    @property
    def name(self) -> str:
        return f"{self.phase} b={self.batch} t={self.tokens} open {self.open_count}/{self.batch}"


def default_scenarios(quick: bool = False, device: torch.device | None = None) -> list[Scenario]:
    """PRISM's routing rates at batch 8: 0, 1 of 8 (nearest to 6%), 6 of 8 (75%), all; batch 1 closed/open.
    On a GPU also a 4096-token prefill (4 prompts of 1024), the size of the prefill targets."""
    if quick:
        return [Scenario("prefill", 4, 32, c) for c in (0, 1, 4)] + [Scenario("decode", 4, 32, c) for c in (0, 4)]
    # prefill: 8 prompts of 128 tokens and one of 512; decode: one step at a 128-token context
    out = [Scenario("prefill", 8, 128, c) for c in (0, 1, 6, 8)]
    out += [Scenario("prefill", 1, 512, c) for c in (0, 1)]
    if device is not None and device.type == "cuda":
        out += [Scenario("prefill", 4, 1024, c) for c in (0, 1, 4)]
    out += [Scenario("decode", 8, 128, c) for c in (0, 1, 6, 8)]
    out += [Scenario("decode", 1, 128, c) for c in (0, 1)]
    return out


@dataclass
class BenchSetup:
    """The models every provider runs; all share one set of weights."""

    base: nn.Module
    peft: nn.Module
    gated: dict[str, nn.Module]
    routers: dict[str, PatternRouter]
    router_layer: int
    device: torch.device
    vocab_size: int
    cache_argument: str
    notes: list[str] = field(default_factory=list)


def build_setup(base_model: nn.Module, peft_model_factory: Callable[[nn.Module], nn.Module], router_layer: int,
                backends: list[str]) -> BenchSetup:
    """Plain base model, its PEFT model and one gatedlora-patched copy per backend."""
    base = weight_sharing_copy(base_model)
    peft = peft_model_factory(base_model)
    hf_model = peft.get_base_model()
    device = next(hf_model.parameters()).device
    dtype = next(hf_model.parameters()).dtype
    gated, routers = {}, {}
    # Each backend in exact mode; on a GPU the cuda backend also in fused mode (its one-pass decode GEMV).
    variants = [(backend, backend, "exact") for backend in backends]
    if device.type == "cuda" and "cuda" in backends:
        variants.append(("cuda fused", "cuda", "fused"))
    for name, backend, base_mode in variants:
        router = PatternRouter(hf_model.config.hidden_size).to(device=device, dtype=dtype)
        model = weight_sharing_copy(peft)
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer, router=router,
                                           backend=backend, base_mode=base_mode))
        gated[name], routers[name] = model, router
    return BenchSetup(base, peft, gated, routers, router_layer, device, hf_model.config.vocab_size,
                      cache_argument(hf_model))


def cache_argument(hf_model: nn.Module) -> str:
    """The keyword a transformers model's forward takes its KV cache by: ``cache`` (newer transformers) or
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def make_batch(scenario: Scenario, vocab_size: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (scenario.batch, scenario.tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    open_mask = torch.zeros(scenario.batch, dtype=torch.bool)
    open_mask[: scenario.open_count] = True
    return ids, mask, open_mask


def _cache_of(output) -> object:
    for key in ("cache", "past_key_values"):
        value = output.get(key) if hasattr(output, "get") else None
        if value is not None:
            return value
    raise RuntimeError("the model returned no KV cache; decode scenarios need use_cache=True support")


def prefill_providers(setup: BenchSetup, ids, mask, open_mask) -> dict[str, Callable[[], object]]:
    adapter = setup.peft.active_adapter
    names = [adapter if o else "__base__" for o in open_mask.tolist()]
    args = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    for router in setup.routers.values():
        router.pattern = open_mask.float()
    two_pass_router = next(iter(setup.routers.values()), None)

    def two_pass():
        with setup.peft.disable_adapter():
            routed = setup.peft(**args, output_hidden_states=True)
        hidden = routed.hidden_states[setup.router_layer + 1][:, -1]
        decisions = two_pass_router(hidden) >= 0.5 if two_pass_router is not None else open_mask
        rows = decisions.nonzero().flatten()  # PRISM decides on the host
        if rows.numel():
            setup.peft(input_ids=ids[rows], attention_mask=mask[rows], use_cache=False)
        return routed

    providers = {
        "base": lambda: setup.base(**args),
        "peft": lambda: setup.peft(**args),
        "peft mixed": lambda: setup.peft(**args, adapter_names=names),
        "prism two-pass": two_pass,
    }
    return providers | gated_forwards(setup.gated, args)


def gated_forwards(gated: dict[str, nn.Module], args: dict) -> dict[str, Callable[[], object]]:
    """``gatedlora <backend>``: one forward of each patched model on ``args``."""
    return {f"gatedlora {backend}": (lambda m: lambda: m(**args))(model) for backend, model in gated.items()}


def decode_providers(setup: BenchSetup, ids, mask, open_mask, graphs: bool = False
                     ) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """(providers, notes): one decode step per call at a fixed context; each call returns its logits [B, 1, V].

    Eager (``graphs=False``): each provider prefills its own dynamic cache once, and every timed
    step is undone with ``cache.crop(-1)``. With ``graphs`` (CUDA): each provider's step over a
    static cache is captured in a CUDA graph (``cuda_graphs.capture_decode_step``) and replayed; a
    provider that cannot be captured (PEFT's mixed batch reads its adapter names on the host) runs
    eagerly, and a note says why.
    """
    adapter = setup.peft.active_adapter
    names = [adapter if o else "__base__" for o in open_mask.tolist()]
    for router in setup.routers.values():
        router.pattern = open_mask.float()
    notes: list[str] = []

    def stepper(name: str, model: nn.Module, capturable: bool = True, **extra) -> Callable[[], object]:
        return decode_stepper(name, model, ids, mask, setup.cache_argument, graphs, notes, capturable, **extra)

    providers = {
        "base": stepper("base", setup.base),
        "peft": stepper("peft", setup.peft),
        "peft mixed": stepper("peft mixed", setup.peft, capturable=False, adapter_names=names),
    }
    for backend, model in setup.gated.items():
        providers[f"gatedlora {backend}"] = stepper(f"gatedlora {backend}", model)
    return providers, notes


def decode_stepper(name: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache_argument: str,
                   graphs: bool, notes: list[str], capturable: bool = True, **extra) -> Callable[[], torch.Tensor]:
    """One decode step of ``model`` at a fixed context after prefilling ``ids`` [B, T]; each call returns the
    step's logits [B, 1, V]. Eager: over the model's own dynamic cache, undone after each call with
    ``cache.crop(-1)``. With ``graphs`` (CUDA) and ``capturable``: captured in a CUDA graph over a static
    cache and replayed; where that cannot be done the step runs eagerly and ``notes`` says why."""

    def eager() -> Callable[[], torch.Tensor]:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
        cache = _cache_of(out)
        next_ids = step_tokens(ids)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)

        def step():
            logits = model(input_ids=next_ids, attention_mask=step_mask, use_cache=True, **{cache_argument: cache},
                           **extra).logits
            cache.crop(-1)
            return logits

        return step

    if not graphs:
        return eager()
    if not capturable:
        notes.append(f"{name}: decode timed eager (PEFT builds its sub-batch indices on the host every call, "
                     "which a CUDA graph cannot hold)")
        return eager()
    from .cuda_graphs import capture_decode_step

    try:
        with torch.inference_mode():
            replay, logits = capture_decode_step(model, ids, mask, cache_argument, **extra)
        return lambda: (replay(), logits)[1]
    except Exception as exc:  # reported, and the provider is timed eagerly instead
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        notes.append(f"{name}: decode not captured in a CUDA graph ({type(exc).__name__}: {reason}); timed eager")
        torch.cuda.synchronize()
        return eager()


def check_gatedlora_outputs(setup: BenchSetup, ids, mask, open_mask, tolerance: float) -> tuple[str, dict]:
    """Prefill: closed sequences bitwise equal to the base model, open ones within ``tolerance`` of PEFT."""
    args = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    with torch.inference_mode():
        outputs = {"base": setup.base(**args).logits, "peft": setup.peft(**args).logits}
        outputs.update({f"gatedlora {backend}": model(**args).logits for backend, model in setup.gated.items()})
        base_runs = [setup.base(**args).logits for _ in range(BASE_RUNS - 1)]
    return compare_outputs(outputs, open_mask, tolerance, base_runs)


def check_decode_outputs(providers: dict[str, Callable[[], torch.Tensor]], open_mask, tolerance: float
                         ) -> tuple[str, dict]:
    """Decode: one more step of each provider, compared as ``check_gatedlora_outputs`` compares a prefill."""
    with torch.inference_mode():
        outputs = {name: fn().clone() for name, fn in providers.items()
                   if name in ("base", "peft") or name.startswith("gatedlora")}
        base_runs = [providers["base"]().clone() for _ in range(BASE_RUNS - 1)]
    return compare_outputs(outputs, open_mask, tolerance, base_runs)


def largest_difference(logits: torch.Tensor, reference: torch.Tensor, rows) -> float:
    """max |logits - reference| over the sequences ``rows`` (bool [B]), in fp32; 0.0 where no row is chosen."""
    return (logits[rows].float() - reference[rows].float()).abs().max().item() if rows.any() else 0.0


def compare_outputs(outputs: dict[str, torch.Tensor], open_mask, tolerance: float,
                    base_runs: Sequence[torch.Tensor] = ()) -> tuple[str, dict]:
    """(verdict, differences). The verdict is "ok", or what differs: gatedlora's closed sequences must equal
    ``outputs["base"]`` bit for bit (fused mode: within ``tolerance``, its base matmul sums in another order), its
    open ones ``outputs["peft"]`` within ``tolerance`` (logits [B, T, V]). ``differences`` maps every output
    but the two references to its largest difference from PEFT on the open sequences, so that a report says by
    how much a check passed or failed; other PEFT plans among the outputs (``peft per group``) give the spread
    between two correct answers, against which the tolerance can be read.

    ``base_runs``: more runs of the base model on the same input. A closed sequence equal bit for bit to any run
    is the base model's. Where the runs differ among themselves (some kernel of the base model is not
    reproducible run to run: an H200 replaying one captured decode step twice gave logits 0.078 apart), a closed
    sequence that matches none passes only within ``NOT_BITWISE_SPREADS`` times the runs' largest difference from
    one another (and within ``tolerance``): the verdict then begins "ok, not bitwise" and gives both numbers."""
    base, peft = outputs["base"], outputs["peft"]
    closed = ~open_mask.to(base.device)
    runs = (base, *base_runs)
    spread = max((largest_difference(a, b, closed) for i, a in enumerate(runs) for b in runs[i + 1:]), default=0.0)
    bound = min(tolerance, NOT_BITWISE_SPREADS * spread)
    problems, unsure, differences = [], [], {}
    for name, logits in outputs.items():
        if name in ("base", "peft"):
            continue
        differences[name] = largest_difference(logits, peft, ~closed)
        if not name.startswith("gatedlora"):
            continue
        variant = name.split(" ", 1)[1]
        if variant.endswith("fused"):
            err = largest_difference(logits, base, closed)
            if not err <= tolerance:
                problems.append(f"{variant}: closed sequences differ from the base model by {err:.3g}")
        elif not any(torch.equal(logits[closed], run[closed]) for run in runs):
            err = min(largest_difference(logits, run, closed) for run in runs)
            if spread != 0.0 and err <= bound:
                unsure.append(f"{variant} {err:.3g}")
            else:
                among = (f"its {len(runs)} runs agreed" if spread == 0.0 else
                         f"its {len(runs)} runs differ by up to {spread:.3g} among themselves")
                problems.append(f"{variant}: closed sequences differ from the base model by {err:.3g} ({among})"
                                if base_runs else f"{variant}: closed sequences differ from the base model")
        if not differences[name] <= tolerance:
            problems.append(f"{variant}: open sequences differ from PEFT by {differences[name]:.3g}")
    if problems:
        return "FAILED: " + "; ".join(problems), differences
    if unsure:
        return (f"{NOT_BITWISE}: the base model's {len(runs)} runs differ by up to {spread:.3g} among themselves on "
                f"the closed sequences; nearest run: {', '.join(unsure)}"), differences
    return "ok", differences
