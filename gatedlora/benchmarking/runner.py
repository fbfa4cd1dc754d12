"""The model-level comparison behind ``gatedlora bench``."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..ops import available_backends
from ..ops.backends import PREFERENCE, unavailable_reason
from .models import CPU_DEFAULT, GPU_DEFAULT, add_prism_adapter, build_llama, load_local_model
from .machine_load import LoadMeter
from .report import environment, spread_warnings
from .multi_adapter import (MultiScenario, build_multi_setup, check_multi_outputs, make_multi_batch,
                            multi_decode_providers, multi_prefill_providers, multi_scenarios)
from .scenarios import (Scenario, build_setup, check_decode_outputs, check_gatedlora_outputs, decode_providers,
                        default_scenarios, make_batch, prefill_providers)

# warm-up before the first scenario, in seconds (see timing.warm_up)
FIRST_WARMUP_S = 2.0
# open sequences must match PEFT within this much (logits); closed ones are checked bitwise
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


def _cuda_extension_problem(device: torch.device) -> Optional[str]:
    """Why the cuda extension cannot run on ``device`` (a failed build, an old driver), or None."""
    from ..ops import cuda_backend

    return cuda_backend.extension_problem(device)


def choose_backends(device: torch.device, requested: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those skipped and why)."""
    registered = available_backends()
    wanted = requested or list(PREFERENCE)
    run, notes = [], []
    for name in wanted:
        if name not in registered:
            notes.append(f"gatedlora {name}: skipped, {unavailable_reason(name)}")
        elif device.type == "cpu" and name != "torch":
            notes.append(f"gatedlora {name}: skipped, needs a CUDA device (CPU run)")
        elif name == "cuda" and (problem := _cuda_extension_problem(device)) is not None:
            notes.append(f"gatedlora cuda: skipped, {problem}")
        else:
            run.append(name)
    return run, notes


def run_model_benchmark(model_path: Optional[str] = None, adapter_path: Optional[str] = None,
                        device: Optional[str] = None, dtype: Optional[torch.dtype] = None, quick: bool = False,
                        backends: Optional[list[str]] = None, router_layer: int = 0, budget_s: float = 1.0,
                        progress: Callable = lambda items, **kw: items, deadline_s: Optional[float] = None,
                        scenarios: Optional[list] = None, spec=None, adapters: Optional[int] = None) -> dict:
    """Time every provider of every scenario side by side; returns the JSON-ready result.

    ``deadline_s``: stop starting scenarios after this many seconds (the result says which ran).
    ``scenarios`` and ``spec`` (a ``LlamaSpec``) replace the defaults (``gpu_check --dry-run``).
    ``adapters``: several adapters, one router (``multi_adapter``): that many fresh PEFT adapters and routes
    mixed over each batch, instead of one adapter and open fractions (``--adapter`` does not apply)."""
    started = time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if model_path is None:
        spec = spec or (CPU_DEFAULT if quick or dev.type != "cuda" else GPU_DEFAULT)
        base_model = build_llama(spec, dev, dtype)
        model_desc = {"source": "built-in Llama config", **spec.__dict__}
    else:
        base_model = load_local_model(model_path, dev, dtype)
        model_desc = {"source": model_path, "adapter": adapter_path}
    run_backends, notes = choose_backends(dev, backends)
    if not run_backends:
        raise RuntimeError("no gatedlora backend can run here: " + "; ".join(notes))
    if adapters:
        setup = build_multi_setup(base_model, router_layer, run_backends, adapters)
        notes += setup.notes
        scenarios = scenarios or multi_scenarios(quick, dev, adapters)
    else:
        setup = build_setup(base_model, lambda m: add_prism_adapter(m, router_layer, adapter_path=adapter_path),
                            router_layer, run_backends)
    max_tokens = getattr(base_model.config, "max_position_embeddings", 4096) - 2
    scenarios = [s for s in scenarios or default_scenarios(quick, dev) if s.tokens <= max_tokens]
    results = []
    providers_seen: list[str] = []
    load = LoadMeter.start()
    with torch.inference_mode():
        for i, scenario in enumerate(progress(scenarios, desc="scenarios")):
            if deadline_s is not None and time.perf_counter() - started > deadline_s:
                notes.append(f"incomplete: the {deadline_s:.0f} s deadline passed after {len(results)} of "
                             f"{len(scenarios)} scenarios")
                break
            warmup_s = max(FIRST_WARMUP_S, budget_s) if i == 0 else 0.0
            try:
                results.append(_run_scenario(setup, scenario, dtype, budget_s, warmup_s, graphs=dev.type == "cuda"))
            except Exception as exc:  # one scenario's failure is reported; the others still run
                notes.append(f"{scenario.name}: FAILED ({type(exc).__name__}: {str(exc).strip()[:300]})")
                results.append({"name": scenario.name, "phase": scenario.phase, "check": f"FAILED: {exc!s:.300}",
                                "median_ms": {}, "iqr_ms": {}, "runs": {}, "ratio_to_base": {}, "notes": []})
                continue
            providers_seen += [p for p in results[-1]["median_ms"] if p not in providers_seen]
    if adapters:
        notes.append("peft per group: one PEFT forward per route group (set_adapter, or disable_adapter for the "
                     "base model), each group its own sub-batch and at decode its own KV cache; peft one adapter "
                     "(decode): every sequence on the first adapter, the yardstick of the decode target")
    else:
        notes.append("prism two-pass: a full base forward to route, then the open sequences again with the "
                     "adapter (closed ones reuse the routing pass), as PRISM's released code routes; it has no "
                     "decode of its own (its decode steps are PEFT's or the base model's), hence '-' there")
    if dev.type == "cuda":
        notes.append("decode: one step at a fixed context over a static KV cache, replayed from a CUDA graph "
                     "(the step is undone inside the graph); providers that cannot be captured run eagerly "
                     "(see the scenario notes)")
    else:
        notes.append("decode: one step at a fixed context, eager (the step is undone with cache.crop(-1))")
    result = {"environment": environment(dev), "model": model_desc, "dtype": str(dtype).replace("torch.", ""),
              "providers": providers_seen, "scenarios": results, "notes": notes,
              "check_tolerance": CHECK_TOLERANCE[dtype]}
    result["warnings"] = load.warnings() + spread_warnings(result)
    return result


def _run_scenario(setup, scenario: Scenario, dtype: torch.dtype, budget_s: float, warmup_s: float,
                  graphs: bool = False) -> dict:
    from .timing import time_side_by_side

    if isinstance(scenario, MultiScenario):
        return _run_multi_scenario(setup, scenario, dtype, budget_s, warmup_s, graphs)
    ids, mask, open_mask = make_batch(scenario, setup.vocab_size, setup.device)
    notes: list[str] = []
    if scenario.phase == "prefill":
        providers = prefill_providers(setup, ids, mask, open_mask)
        check, differences = check_gatedlora_outputs(setup, ids, mask, open_mask, CHECK_TOLERANCE[dtype])
    else:
        providers, notes = decode_providers(setup, ids, mask, open_mask, graphs=graphs)
        check, differences = check_decode_outputs(providers, open_mask, CHECK_TOLERANCE[dtype])
    timings = time_side_by_side(providers, setup.device, budget_s=budget_s, warmup_s=warmup_s)
    return {
        "name": scenario.name, "phase": scenario.phase, "batch": scenario.batch, "tokens": scenario.tokens,
        "open_sequences": scenario.open_count, "check": check, "differences": differences, "notes": notes,
        **_timing_record(timings),
    }


def _run_multi_scenario(setup, scenario, dtype: torch.dtype, budget_s: float, warmup_s: float, graphs: bool) -> dict:
    from .timing import time_side_by_side

    ids, mask, routes = make_multi_batch(scenario, setup.vocab_size, setup.device)
    notes: list[str] = []
    if scenario.phase == "prefill":
        providers = multi_prefill_providers(setup, ids, mask, routes)
    else:
        providers, notes = multi_decode_providers(setup, ids, mask, routes, graphs=graphs)
    check, differences = check_multi_outputs(providers, routes, CHECK_TOLERANCE[dtype])
    timings = time_side_by_side(providers, setup.device, budget_s=budget_s, warmup_s=warmup_s)
    return {"name": scenario.name, "phase": scenario.phase, "batch": scenario.batch, "tokens": scenario.tokens,
            "adapters": scenario.adapters, "routes": routes.tolist(), "check": check,
            "differences": differences, "notes": notes,
            **_timing_record(timings)}


def _timing_record(timings: dict) -> dict:
    return {
        "median_ms": {k: t.median_s * 1e3 for k, t in timings.items()},
        "iqr_ms": {k: [t.q1_s * 1e3, t.q3_s * 1e3] for k, t in timings.items()},
        "runs": {k: t.runs for k, t in timings.items()},
        "ratio_to_base": {k: t.median_s / timings["base"].median_s for k, t in timings.items()},
    }
