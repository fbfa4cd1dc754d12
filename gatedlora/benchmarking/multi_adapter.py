"""Model-level scenarios for several adapters and one router: N PEFT adapters, each batch's sequences spread
over the base model and the adapters (PRISM-like: 25% base, the rest round-robin over the adapters).

Providers, each on the same inputs: the base model; PEFT with one adapter on every sequence (``peft one
adapter``, decode only: the yardstick of the decode target); PEFT's mixed batch (``adapter_names``, one
forward that loops over the adapters on the host); one PEFT forward per route group (``set_adapter`` or
``disable_adapter`` per group, each group its own sub-batch, and at decode its own KV cache); gatedlora, one
pass with the routes, per backend. Outputs are checked before timing: sequences on the base model bitwise
equal to the base model, the others within a tolerance of PEFT's mixed batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..config import GatedLoraConfig
from ..patching import block_linear_names, patch_model
from ..routing import PrismMultiRouter
from .models import randomize_lora_b, weight_sharing_copy
from .scenarios import BASE_RUNS, cache_argument, compare_outputs, decode_stepper, gated_forwards

BASE_FRACTION = 0.25


def adapter_names(count: int) -> list[str]:
    return [f"adapter{i}" for i in range(1, count + 1)]


def add_adapters(model: nn.Module, router_layer: int = 0, count: int = 4, r: int = 16, lora_alpha: int = 32,
                 seed: int = 1) -> nn.Module:
    """A PEFT model with ``count`` adapters as PRISM trains one (every projection of the blocks after
    ``router_layer``, rank ``r``), B random so each changes the output, loaded as a user would
    (``get_peft_model`` with the first, ``add_adapter`` for the others)."""
    from peft import LoraConfig, get_peft_model

    layers = list(range(router_layer + 1, model.config.num_hidden_layers))
    targets = block_linear_names(model)
    peft_model = None
    for name in adapter_names(count):
        config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, layers_to_transform=layers)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    randomize_lora_b(peft_model, seed)
    peft_model.set_adapter(adapter_names(count)[0])
    return peft_model.eval()


class RoutePatternRouter(nn.Module):
    """The default router's MLP (``PrismMultiRouter``), run for its real cost, whose routes the scenario sets
    (``pattern`` [B] long)."""

    def __init__(self, hidden_size: int, routes: int) -> None:
        super().__init__()
        self.mlp = PrismMultiRouter(hidden_size, routes)
        self.pattern: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        one_hot = torch.nn.functional.one_hot(self.pattern.to(hidden.device), self.mlp.net[-1].out_features)
        return self.mlp(hidden) * 0 + 5.0 * one_hot.to(hidden.dtype)


@dataclass(frozen=True)
class MultiScenario:
    phase: str  # "prefill" or "decode"
    batch: int
    tokens: int  # prompt length
    adapters: int

    def routes(self) -> list[int]:
        """Each sequence's route: round(25%) of them on the base model (0), the rest round-robin over the
        adapters (1..N), in an order shuffled with a fixed seed (groups are not contiguous)."""
        base = round(BASE_FRACTION * self.batch) if self.batch > 1 else 0
        routes = [0] * base + [1 + i % self.adapters for i in range(self.batch - base)]
        random.Random(self.batch).shuffle(routes)
        return routes

    @property
    def name(self) -> str:
        routes = self.routes()
        return (f"{self.phase} b={self.batch} t={self.tokens} {self.adapters} adapters, "
                f"{routes.count(0)}/{self.batch} base")


def multi_scenarios(quick: bool = False, device: torch.device | None = None, adapters: int = 4,
                    batches: tuple[int, ...] | None = None) -> list[MultiScenario]:
    """Prefill and decode at each batch size (CPU: 1, 2, 4, 8, 16, prompts of 128 tokens; GPU: 1, 8, 32,
    prompts of 512); ``quick``: batch 4, 32 tokens."""
    if quick:
        return [MultiScenario(phase, 4, 32, adapters) for phase in ("prefill", "decode")]
    on_gpu = device is not None and device.type == "cuda"
    batches = batches or ((1, 8, 32) if on_gpu else (1, 2, 4, 8, 16))
    tokens = 512 if on_gpu else 128
    return [MultiScenario(phase, b, tokens, adapters) for phase in ("prefill", "decode") for b in batches]


@dataclass
class MultiSetup:
    """The models every provider runs; all share one set of weights."""

    base: nn.Module
    peft: nn.Module
    gated: dict[str, nn.Module]
    routers: dict[str, RoutePatternRouter]
    names: list[str]
    router_layer: int
    device: torch.device
    vocab_size: int
    cache_argument: str
    notes: list[str] = field(default_factory=list)


def build_multi_setup(base_model: nn.Module, router_layer: int, backends: list[str], adapters: int = 4) -> MultiSetup:
    """The plain base model, a PEFT model with ``adapters`` adapters and one gatedlora-patched copy per backend
    (the cuda backend has no multi-adapter kernel: under its name ``auto`` runs, and a note says so)."""
    base = weight_sharing_copy(base_model)
    peft = add_adapters(base_model, router_layer, adapters)
    hf_model = peft.get_base_model()
    device, dtype = next(hf_model.parameters()).device, next(hf_model.parameters()).dtype
    names = adapter_names(adapters)
    gated, routers, notes = {}, {}, []
    for backend in backends:
        if backend == "cuda":
            notes.append("gatedlora cuda: skipped, the cuda backend has no multi-adapter kernel (auto runs triton)")
            continue
        router = RoutePatternRouter(hf_model.config.hidden_size, adapters + 1).to(device=device, dtype=dtype)
        model = weight_sharing_copy(peft)
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer, adapters=names, router=router,
                                           backend=backend))
        gated[backend], routers[backend] = model, router
    return MultiSetup(base, peft, gated, routers, names, router_layer, device, hf_model.config.vocab_size,
                      cache_argument(hf_model), notes)


def make_multi_batch(scenario: MultiScenario, vocab_size: int, device: torch.device, seed: int = 0):
    """(input ids [B, T], attention mask [B, T], routes [B] long)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (scenario.batch, scenario.tokens), generator=gen).to(device)
    return ids, torch.ones_like(ids), torch.tensor(scenario.routes())


def _groups(setup: MultiSetup, routes: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    """(adapter name or None for the base model, its rows) for each route taken."""
    return [(None if r == 0 else setup.names[r - 1], (routes == r).nonzero().flatten().to(setup.device))
            for r in sorted(set(routes.tolist()))]


def _set_routes(setup: MultiSetup, routes: torch.Tensor) -> list[str]:
    for router in setup.routers.values():
        router.pattern = routes
    return ["__base__" if r == 0 else setup.names[r - 1] for r in routes.tolist()]


def _with_route(peft: nn.Module, name: str | None, fn: Callable[[], object]) -> object:
    """``fn()`` with PEFT's adapter ``name`` active (None: adapters disabled)."""
    if name is None:
        with peft.disable_adapter():
            return fn()
    peft.set_adapter(name)
    return fn()


def multi_prefill_providers(setup: MultiSetup, ids, mask, routes) -> dict[str, Callable[[], object]]:
    names = _set_routes(setup, routes)
    args = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    groups = _groups(setup, routes)

    def per_group():
        return [_with_route(setup.peft, name, lambda rows=rows: setup.peft(input_ids=ids[rows],
                                                                          attention_mask=mask[rows], use_cache=False))
                for name, rows in groups]

    providers = {
        "base": lambda: setup.base(**args),
        "peft mixed": lambda: setup.peft(**args, adapter_names=names),
        "peft per group": per_group,
    }
    return providers | gated_forwards(setup.gated, args)


def multi_decode_providers(setup: MultiSetup, ids, mask, routes, graphs: bool = False
                           ) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """(providers, notes): one decode step per call at a fixed context (``scenarios.decode_stepper``); each call
    returns the step's logits [B, 1, V] (``peft per group``: a list, one per group)."""
    names = _set_routes(setup, routes)
    notes: list[str] = []

    def stepper(name: str, model: nn.Module, step_ids=ids, step_mask=mask, capturable: bool = True, **extra):
        return decode_stepper(name, model, step_ids, step_mask, setup.cache_argument, graphs, notes, capturable,
                              **extra)

    setup.peft.set_adapter(setup.names[0])
    providers = {
        "base": stepper("base", setup.base),
        "peft one adapter": stepper("peft one adapter", setup.peft),
        "peft mixed": stepper("peft mixed", setup.peft, capturable=False, adapter_names=names),
    }
    # each group's own sub-batch and KV cache; PEFT's active adapter is switched on the host between groups
    group_steps = []
    for name, rows in _groups(setup, routes):
        step = _with_route(setup.peft, name, lambda rows=rows: stepper("peft per group", setup.peft, ids[rows],
                                                                       mask[rows], capturable=False))
        group_steps.append((name, step))
    providers["peft per group"] = lambda: [_with_route(setup.peft, name, step) for name, step in group_steps]
    for backend, model in setup.gated.items():
        providers[f"gatedlora {backend}"] = stepper(f"gatedlora {backend}", model)
    setup.peft.set_adapter(setup.names[0])
    return providers, sorted(set(notes))


def check_multi_outputs(providers: dict[str, Callable[[], object]], routes: torch.Tensor, tolerance: float
                        ) -> tuple[str, dict]:
    """(verdict, differences) as ``scenarios.compare_outputs`` gives them: gatedlora's sequences on the base model
    bitwise the base model's, the others within ``tolerance`` of PEFT's mixed batch (the logits one call of each
    provider returns; the base model's, ``BASE_RUNS`` calls). ``peft per group``'s difference from the mixed
    batch, two correct PEFT plans, is the spread the tolerance is read against."""
    with torch.inference_mode():
        outputs = {name: _logits(fn()) for name, fn in providers.items()
                   if name in ("base", "peft mixed") or name.startswith("gatedlora")}
        if "peft per group" in providers:
            outputs["peft per group"] = _in_batch_order(providers["peft per group"](), routes)
        base_runs = [_logits(providers["base"]()) for _ in range(BASE_RUNS - 1)]
    outputs["peft"] = outputs.pop("peft mixed")
    return compare_outputs(outputs, routes != 0, tolerance, base_runs)


def _in_batch_order(parts: list, routes: torch.Tensor) -> torch.Tensor:
    """One logits tensor [B, ...] from ``peft per group``'s outputs, one per route taken in ``_groups``' order."""
    parts = [_logits(part) for part in parts]
    whole = parts[0].new_empty((len(routes),) + tuple(parts[0].shape[1:]))
    for route, part in zip(sorted(set(routes.tolist())), parts):
        whole[(routes == route).nonzero().flatten().to(whole.device)] = part
    return whole


def _logits(output) -> torch.Tensor:
    return (output if isinstance(output, torch.Tensor) else output.logits).clone()
