"""Model level: the scenarios of ``gatedlora bench`` (prefill and per-token decode, batch 1 and 8,
PRISM's routing rates) as pytest-benchmark groups, one group per scenario; and those of ``gatedlora bench
--adapters 4`` (four adapters, routes mixed over each batch) at batch 1 and 8."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, synchronized

from gatedlora.benchmarking.models import CPU_DEFAULT, GPU_DEFAULT, add_prism_adapter, build_llama
from gatedlora.benchmarking.multi_adapter import (build_multi_setup, make_multi_batch, multi_decode_providers,
                                                  multi_prefill_providers, multi_scenarios)
from gatedlora.benchmarking.runner import choose_backends
from gatedlora.benchmarking.scenarios import (build_setup, decode_providers, default_scenarios, make_batch,
                                              prefill_providers)

PROVIDERS = ["base", "peft", "peft mixed", "prism two-pass", "gatedlora torch", "gatedlora triton", "gatedlora cuda",
             "gatedlora cuda fused"]


@pytest.fixture(scope="module")
def setup():
    spec, dtype = (GPU_DEFAULT, torch.bfloat16) if DEVICE.type == "cuda" else (CPU_DEFAULT, torch.float32)
    backends, _ = choose_backends(DEVICE, None)
    return build_setup(build_llama(spec, DEVICE, dtype), lambda m: add_prism_adapter(m, 0), 0, backends)


@pytest.mark.parametrize("scenario", default_scenarios(), ids=lambda s: s.name.replace(" ", "-"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_model(benchmark, setup, scenario, provider):
    if provider == "prism two-pass" and scenario.phase == "decode":
        pytest.skip("prism two-pass routes at prefill; its decode is the peft or base decode")
    ids, mask, open_mask = make_batch(scenario, setup.vocab_size, setup.device)
    time_provider(benchmark, setup.gated, scenario, provider, lambda: prefill_providers(setup, ids, mask, open_mask),
                  lambda graphs: decode_providers(setup, ids, mask, open_mask, graphs=graphs)[0])


def time_provider(benchmark, gated: dict, scenario, provider: str, prefill, decode) -> None:
    """Time ``provider`` of ``prefill()`` or ``decode(graphs)`` (decode replayed from a CUDA graph on a GPU, eager
    where a provider cannot be captured); skipped where it is a gatedlora backend not available here."""
    backend = provider.removeprefix("gatedlora ")
    if provider.startswith("gatedlora") and backend not in gated:
        pytest.skip(f"{backend}: not available here ({'CPU run' if DEVICE.type == 'cpu' else 'not built'})")
    with torch.inference_mode():
        fn = (prefill() if scenario.phase == "prefill" else decode(DEVICE.type == "cuda"))[provider]
        benchmark.group = f"model {scenario.name}"
        benchmark(synchronized(fn))


# --- several adapters, one router: 4 adapters, routes mixed over each batch (25% base) -----------------

MULTI_PROVIDERS = ["base", "peft one adapter", "peft mixed", "peft per group", "gatedlora torch", "gatedlora triton"]
MULTI_SCENARIOS = multi_scenarios(device=DEVICE, batches=(1, 8) if DEVICE.type == "cpu" else (1, 8, 32))


@pytest.fixture(scope="module")
def multi_setup():
    spec, dtype = (GPU_DEFAULT, torch.bfloat16) if DEVICE.type == "cuda" else (CPU_DEFAULT, torch.float32)
    backends, _ = choose_backends(DEVICE, None)
    return build_multi_setup(build_llama(spec, DEVICE, dtype), 0, backends, adapters=4)


@pytest.mark.parametrize("scenario", MULTI_SCENARIOS, ids=lambda s: s.name.replace(" ", "-").replace(",", ""))
@pytest.mark.parametrize("provider", MULTI_PROVIDERS)
def test_model_multi_adapter(benchmark, multi_setup, scenario, provider):
    if provider == "peft one adapter" and scenario.phase == "prefill":
        pytest.skip("peft one adapter is the decode target's yardstick")
    ids, mask, routes = make_multi_batch(scenario, multi_setup.vocab_size, multi_setup.device)
    time_provider(benchmark, multi_setup.gated, scenario, provider,
                  lambda: multi_prefill_providers(multi_setup, ids, mask, routes),
                  lambda graphs: multi_decode_providers(multi_setup, ids, mask, routes, graphs=graphs)[0])
