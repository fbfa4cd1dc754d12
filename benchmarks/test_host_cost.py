"""Host cost per layer call: what bounds decode on a GPU (docs/design.md, "The hot path").

Tiny shapes (K = N = 64, r = 8), so the arithmetic is negligible and the time is the host's: Python,
argument handling, dispatch, one call per PyTorch op. Providers side by side in each group: the base
``nn.Linear``, PEFT's ``lora.Linear`` (unmerged) and ``GatedLoRALinear`` in eval with no gate and
with token gates evaluated on every call (all rows open, all closed). Targets: every gatedlora
provider at or below PEFT, at M = 1 and M = 8.

A second group holds the token gate with every row closed at K = N = 2048, M = 1 against the same
layer's base layer: target at most 1.05x.

No synchronisation: on a GPU the kernels run asynchronously and the timer sees the host's share.
Run: ``pytest benchmarks/test_host_cost.py --benchmark-only`` (one core: ``OMP_NUM_THREADS=1``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from torch import nn

import gatedlora

PROVIDERS = ["base", "peft", "gatedlora none", "gatedlora token open", "gatedlora token closed"]


class _Holder(nn.Module):
    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _layers(k: int, n: int, r: int) -> dict[str, nn.Module]:
    """The base layer, PEFT's layer and gatedlora's three, sharing one set of weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(_Holder(k, n), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    peft_model = peft_model.to(DEVICE).eval()
    peft_layer = peft_model.base_model.model.proj
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)

    def patched(gate: str) -> nn.Module:
        config = gatedlora.GatedLoraConfig(gate=gate, backend="torch" if DEVICE.type == "cpu" else "auto")
        return gatedlora.patch_model(copy.deepcopy(peft_model), config).base_model.model.proj

    closed = patched("token")
    with torch.no_grad():
        closed.gate_bias.fill_(-30.0)  # sigmoid(-30) < threshold: every row closed, decided on each call
    return {"base": peft_layer.base_layer, "peft": peft_layer, "gatedlora none": patched("none"),
            "gatedlora token open": patched("token"), "gatedlora token closed": closed}


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_host_cost_per_call(benchmark, provider, m):
    layer = _layers(64, 64, 8)[provider]
    x = torch.randn(m, 64, device=DEVICE)
    benchmark.group = f"host cost per call K=N=64 r=8 M={m}"
    with torch.inference_mode():
        benchmark(layer, x)


@pytest.mark.parametrize("provider", ["base", "gatedlora token closed"])
def test_closed_token_gate_against_the_base_layer(benchmark, provider):
    """Against the patched layer's own base layer: two copies of a 16 MiB weight differ by about 2.5%
    on the CPU (one core, 721 against 739 us), more than the margin measured here."""
    closed = _layers(2048, 2048, 16)["gatedlora token closed"]
    layer = closed.base_layer if provider == "base" else closed
    x = torch.randn(1, 2048, device=DEVICE)
    benchmark.group = "token gate evaluated, every row closed, K=N=2048 M=1"
    with torch.inference_mode():
        benchmark(layer, x)
