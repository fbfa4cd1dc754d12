"""The model-level comparison behind ``gatedlora bench``."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops import available_backends
from ..ops.backends import PREFERENCE, unavailable_reason
from .models import CPU_DEFAULT, GPU_DEFAULT, add_prism_adapter, build_llama, load_local_model
from .machine_load import LoadMeter
from .report import environment, spread_warnings
from .scenarios import (Scenario, build_setup, check_gatedlora_outputs, decode_providers, default_scenarios,
                        make_batch, prefill_providers)

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
                        progress: Callable = lambda items, **kw: items) -> dict:
    """Time every provider of every scenario side by side; returns the JSON-ready result."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if model_path is None:
        spec = GPU_DEFAULT if dev.type == "cuda" else CPU_DEFAULT
        if quick:
            spec = CPU_DEFAULT
        base_model = build_llama(spec, dev, dtype)
        model_desc = {"source": "built-in Llama config", **spec.__dict__}
    else:
        base_model = load_local_model(model_path, dev, dtype)
        model_desc = {"source": model_path, "adapter": adapter_path}
    run_backends, notes = choose_backends(dev, backends)
    if not run_backends:
        raise RuntimeError("no gatedlora backend can run here: " + "; ".join(notes))
    setup = build_setup(base_model, lambda m: add_prism_adapter(m, router_layer, adapter_path=adapter_path),
                        router_layer, run_backends)
    max_tokens = getattr(base_model.config, "max_position_embeddings", 4096) - 2
    scenarios = [s for s in default_scenarios(quick) if s.tokens <= max_tokens]
    results = []
    providers_seen: list[str] = []
    load = LoadMeter.start()
    with torch.inference_mode():
        for i, scenario in enumerate(progress(scenarios, desc="scenarios")):
            warmup_s = max(FIRST_WARMUP_S, budget_s) if i == 0 else 0.0
            results.append(_run_scenario(setup, scenario, dtype, budget_s, warmup_s))
            providers_seen += [p for p in results[-1]["median_ms"] if p not in providers_seen]
    notes.append("prism two-pass: a full base forward to route, then the open sequences again with the "
                 "adapter (closed ones reuse the routing pass), as PRISM's released code routes; it has no "
                 "decode of its own (its decode steps are PEFT's or the base model's), hence '-' there")
    notes.append("decode: one step at a fixed context (the step is undone with cache.crop(-1)); "
                 "GPU decode here is eager, not yet in CUDA graphs")
    result = {"environment": environment(dev), "model": model_desc, "dtype": str(dtype).replace("torch.", ""),
              "providers": providers_seen, "scenarios": results, "notes": notes,
              "check_tolerance": CHECK_TOLERANCE[dtype]}
    result["warnings"] = load.warnings() + spread_warnings(result)
    return result


def _run_scenario(setup, scenario: Scenario, dtype: torch.dtype, budget_s: float, warmup_s: float) -> dict:
    from .timing import time_side_by_side

    ids, mask, open_mask = make_batch(scenario, setup.vocab_size, setup.device)
    if scenario.phase == "prefill":
        providers = prefill_providers(setup, ids, mask, open_mask)
        check = check_gatedlora_outputs(setup, ids, mask, open_mask, CHECK_TOLERANCE[dtype])
    else:
        providers = decode_providers(setup, ids, mask, open_mask)
        check = "not checked (decode)"
    timings = time_side_by_side(providers, setup.device, budget_s=budget_s, warmup_s=warmup_s)
    return {
        "name": scenario.name, "phase": scenario.phase, "batch": scenario.batch, "tokens": scenario.tokens,
        "open_sequences": scenario.open_count, "check": check,
        "median_ms": {k: t.median_s * 1e3 for k, t in timings.items()},
        "iqr_ms": {k: [t.q1_s * 1e3, t.q3_s * 1e3] for k, t in timings.items()},
        "runs": {k: t.runs for k, t in timings.items()},
        "ratio_to_base": {k: t.median_s / timings["base"].median_s for k, t in timings.items()},
    }
