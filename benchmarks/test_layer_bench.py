"""Layer level: base layer against each adapter path, grouped so one scenario's numbers sit side by side.

Groups: ``K N M dtype r``. The base layer and PEFT LoRA (unmerged) do not depend on the open
fraction; PEFT's mixed batch and gatedlora are timed at each open fraction (PRISM's rates).
CPU: K=N in {1024, 2048}, r=16, fp32 and bf16. GPU: Llama-3-8B projections, r in {8, 16, 64},
fp16 and bf16, decode-sized calls replayed from CUDA graphs where the provider allows it.
Case ids: ``PROVIDER-open=P%-K..-N..-M..-r..-DTYPE``: P% of the M rows have their gate open. Groups
``... 4 adapters``: each row on the base layer (25%) or one of four adapters (``test_multi_adapter``). Run:
``pytest benchmarks/ --benchmark-only`` (``--benchmark-disable`` runs each once as a smoke test); the
summary at the end gives each adapter path as a multiple of the base layer (benchmarks/README.md).
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, in_cuda_graph, synchronized
from torch import nn

from gatedlora import gated_lora, gated_lora_multi
from gatedlora.ops.backends import unavailable_reason

ON_GPU = DEVICE.type == "cuda"
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)] if ON_GPU else [(1024, 1024), (2048, 2048)]
RANKS = [8, 16, 64] if ON_GPU else [16]
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.bfloat16]
ROWS = [1, 8, 64, 512, 4096]
OPEN_FRACTIONS = [0.0, 0.06, 0.75, 1.0]
ROTATE = 4  # input sets cycled through so caches do not flatter small shapes


class Case:
    """One layer with a PEFT adapter and rotating inputs."""

    def __init__(self, k, n, m, r, dtype):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        holder = nn.Sequential()
        holder.add_module("proj", nn.Linear(k, n, bias=False))
        holder = holder.to(DEVICE, dtype)
        self.peft_layer = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])).eval()
        self.lora = self.peft_layer.base_model.model.proj
        nn.init.normal_(self.lora.lora_B["default"].weight, std=0.02)
        self.base = self.lora.base_layer
        self.xs = [torch.randn(m, k, device=DEVICE, dtype=dtype) for _ in range(ROTATE)]
        self.m = m
        self.step = 0

    def x(self):
        self.step += 1
        return self.xs[self.step % ROTATE]

    def gate(self, fraction):
        gate = torch.zeros(self.m, device=DEVICE)
        gate[torch.randperm(self.m)[: round(fraction * self.m)]] = 1.0
        return gate


def _cases():
    for k, n in SHAPES:
        for r in RANKS:
            for dtype in DTYPES:
                for m in ROWS:
                    yield pytest.param(k, n, m, r, dtype, id=f"K{k}-N{n}-M{m}-r{r}-{str(dtype)[6:]}")


def _group(benchmark, k, n, m, r, dtype):
    benchmark.group = f"layer K={k} N={n} M={m} {str(dtype)[6:]} r={r}"


def _run(benchmark, fn, m):
    graph = in_cuda_graph(fn) if m <= 64 else None
    benchmark.extra_info["cuda_graph"] = graph is not None
    benchmark(synchronized(graph or fn))


@pytest.mark.parametrize("k,n,m,r,dtype", list(_cases()))
@pytest.mark.parametrize("provider", ["base", "peft"])
def test_unconditional(benchmark, provider, k, n, m, r, dtype):
    case = Case(k, n, m, r, dtype)
    _group(benchmark, k, n, m, r, dtype)
    layer = case.base if provider == "base" else case.lora
    with torch.inference_mode():
        _run(benchmark, lambda: layer(case.x()), m)


def _gated_providers():
    """PEFT's mixed batch and each gatedlora backend that can run here; the others are listed as skipped
    once each, not once per case (190 bare skips on a CPU before)."""
    for backend in ("torch", "triton", "cuda"):
        reason = unavailable_reason(backend) or (None if ON_GPU or backend == "torch" else "needs a CUDA device")
        marks = [pytest.mark.skip(reason=f"gatedlora {backend}: {reason}")] if reason else []
        yield pytest.param(f"gatedlora {backend}", marks=marks, id=f"gatedlora {backend}")


def _gated_cases():
    """Every case with PEFT's mixed batch and gatedlora torch; backends that cannot run here once each."""
    cases = list(_cases())
    for provider in [pytest.param("peft mixed", id="peft mixed"), *_gated_providers()]:
        runnable = not provider.marks
        for fraction in OPEN_FRACTIONS if runnable else OPEN_FRACTIONS[:1]:
            for case in cases if runnable else cases[:1]:
                yield pytest.param(provider.values[0], fraction, *case.values, marks=provider.marks,
                                   id=f"{provider.id}-open={fraction:.0%}-{case.id}")


@pytest.mark.parametrize("provider,fraction,k,n,m,r,dtype", list(_gated_cases()))
def test_gated(benchmark, provider, fraction, k, n, m, r, dtype):
    backend = provider.split()[-1]
    case = Case(k, n, m, r, dtype)
    _group(benchmark, k, n, m, r, dtype)
    benchmark.extra_info["open_fraction"] = fraction
    gate = case.gate(fraction)
    a = case.lora.lora_A["default"].weight
    b = case.lora.lora_B["default"].weight
    scaling = case.lora.scaling["default"]
    with torch.inference_mode():
        if provider == "peft mixed":
            names = ["default" if g else "__base__" for g in gate.tolist()]
            fn = lambda: case.lora(case.x(), adapter_names=names)  # noqa: E731
        else:
            def fn():
                x = case.x()
                return gated_lora(x, case.base(x), a, b, scaling, gate=gate, backend=backend, inplace=True)
        _run(benchmark, fn, m)


# --- several adapters: 4 on one layer, each row on one of them or on the base layer (25%) -----------------

ADAPTERS = 4


class MultiCase(Case):
    """A layer with ``ADAPTERS`` PEFT adapters (named adapter1..) and each row's route: a quarter of the rows on
    the base layer, the rest round-robin over the adapters, shuffled."""

    def __init__(self, k, n, m, r, dtype):
        from peft import LoraConfig

        super().__init__(k, n, m, r, dtype)
        self.names = ["default"] + [f"adapter{i}" for i in range(2, ADAPTERS + 1)]
        for name in self.names[1:]:
            self.peft_layer.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
            nn.init.normal_(self.lora.lora_B[name].weight, std=0.02)
        self.peft_layer.set_adapter("default")
        base = round(0.25 * m) if m > 1 else 0
        routes = torch.tensor([-1] * base + [i % ADAPTERS for i in range(m - base)])
        self.index = routes[torch.randperm(m, generator=torch.Generator().manual_seed(m))].to(DEVICE)
        self.adapter_names = ["__base__" if i < 0 else self.names[i] for i in self.index.tolist()]


@pytest.mark.parametrize("k,n,m,r,dtype", list(_cases()))
@pytest.mark.parametrize("provider", ["base", "peft one adapter", "peft mixed", "gatedlora torch",
                                      "gatedlora triton"])
def test_multi_adapter(benchmark, provider, k, n, m, r, dtype):
    if provider == "gatedlora triton" and (unavailable_reason("triton") or not ON_GPU):
        pytest.skip(f"gatedlora triton: {unavailable_reason('triton') or 'needs a CUDA device'}")
    case = MultiCase(k, n, m, r, dtype)
    benchmark.group = f"layer K={k} N={n} M={m} {str(dtype)[6:]} r={r} {ADAPTERS} adapters"
    lora = case.lora
    weights_a = [lora.lora_A[name].weight for name in case.names]
    weights_b = [lora.lora_B[name].weight for name in case.names]
    scalings = [lora.scaling[name] for name in case.names]
    with torch.inference_mode():
        if provider == "base":
            fn = lambda: case.base(case.x())  # noqa: E731
        elif provider == "peft one adapter":
            fn = lambda: lora(case.x())  # noqa: E731
        elif provider == "peft mixed":
            fn = lambda: lora(case.x(), adapter_names=case.adapter_names)  # noqa: E731
        else:
            def fn():
                x = case.x()
                return gated_lora_multi(x, case.base(x), weights_a, weights_b, scalings, case.index,
                                        backend=provider.split()[-1], inplace=True)
        _run(benchmark, fn, m)
