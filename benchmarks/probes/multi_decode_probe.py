"""CPU diagnostic probe: where gatedlora's decode step with several adapters spends what PEFT's one-adapter step
does not (docs/design.md, "Several adapters, one router"). Not part of the package.

    python benchmarks/probes/multi_decode_probe.py [--rounds 15] [--steps 50]

The bench model (``models.CPU_DEFAULT``, hidden 256, adapters in blocks 1-3: 21 projections), four rank-16
adapters, 8 sequences routed as ``gatedlora bench --adapters 4`` routes them, one decode step at a fixed context
(the bench's ``decode_stepper``), one thread, wall time, providers interleaved over ``--rounds`` rounds, medians
over base. Providers:

* ``base``, ``peft one adapter``, ``gatedlora``: as in the bench.
* ``peft floor``: PEFT's layer forward replaced by its arithmetic alone (base linear, A, B, scale, add), no host code.
* ``floor``: gatedlora's layer forward replaced by its arithmetic alone (base linear; ``x A_cat^T``; the column
  mask; ``addmm_`` with ``B_cat^T``), each layer's concatenation and mask looked up once, before timing.
* ``floor +routing``: + the reads every call makes of the routing state (forced gate, the decision in force, its
  uniform route, grad mode).
* ``floor +weights``: + reading the adapters' weight objects through the modules (``_adapter_weight_tuples``).
* ``floor +versions``: + each weight's version counter and data pointer (what keeps the concatenation in sync).
* ``floor, step reads``: ``floor +routing`` in the layers, with the reads that keep every layer's concatenation
  current made once per step for all 21 layers in one loop before the step (``multi_weights.concatenated`` on
  the weights read through the modules): whether the reads cost less together, outside the layer calls. That
  loop's time before each step, and repeated on its own, are printed too.

The stripped forwards are correct only for this model and this batch (they skip every check); they bound what
host code can give. Also printed: the KV cache's ``torch.cat`` time per step in each of the three real providers
(a wrapper around transformers' cache code, in steps apart from the timed rounds), the same work in every model.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from operator import attrgetter

import torch
import torch.nn.functional as F
import transformers.cache_utils as cache_utils

import gatedlora.routed_layer as routed_layer
from gatedlora.benchmarking.models import CPU_DEFAULT, build_llama
from gatedlora.benchmarking.multi_adapter import (MultiScenario, build_multi_setup, make_multi_batch,
                                                  multi_decode_providers)
from gatedlora.call_state import forced_gate
from gatedlora.ops import multi_weights

_version = attrgetter("_version")


def stripped_forward(level: int, kept: dict):
    """A RoutedLoRALinear forward doing the arithmetic and the host work up to ``level`` (0 floor, 1 routing,
    2 weights, 3 versions)."""
    def forward(self, x, *args, **kwargs):
        base_weight, a_t, b_t, not_owned = kept[id(self)]
        if level >= 1:
            decision = self.route.in_force()
            if forced_gate(self) == 0.0 or decision.uniform_route is not None or torch.is_grad_enabled():
                raise AssertionError("the probe's batch is mixed and runs without grad")
        if level >= 2:
            lora_a, lora_b = self._adapter_weight_tuples()
            if level >= 3:
                weights = lora_a + lora_b
                (multi_weights._epoch, tuple(map(torch.Tensor.data_ptr, weights)), tuple(map(_version, weights)))
        out = F.linear(x, base_weight)
        u = torch.mm(x.view(-1, x.shape[-1]), a_t)
        u.masked_fill_(not_owned, 0)
        out.view(-1, out.shape[-1]).addmm_(u, b_t)
        return out
    return forward


def peft_floor(self, x, *args, **kwargs):
    name = self.active_adapters[0]
    out = F.linear(x, self.base_layer.weight)
    return out + F.linear(F.linear(x, self.lora_A[name].weight), self.lora_B[name].weight) * self.scaling[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    setup = build_multi_setup(build_llama(CPU_DEFAULT, torch.device("cpu"), torch.float32), 0, ["torch"], 4)
    ids, mask, routes = make_multi_batch(MultiScenario("decode", 8, 128, 4), setup.vocab_size, torch.device("cpu"))
    layer_class = routed_layer.RoutedLoRALinear
    peft_class = type(next(m for m in setup.peft.modules() if hasattr(m, "lora_A")))
    real_forward, real_peft_forward = layer_class.forward, peft_class.forward
    kept: dict = {}
    indices: dict = {}  # each layer's row index: what the step's loop passes to concatenated

    def keep_concatenation(layer, index):  # what the stripped forwards look up
        a_t, b_t, not_owned, *_ = multi_weights.concatenated(*layer._adapter_weight_tuples(), layer.scalings, index,
                                                             True)
        kept[id(layer)] = (layer.base_layer.weight, a_t, b_t, not_owned)

    def keep(self, x, *args, **kwargs):  # one real call per layer
        index = indices[self] = self.route.in_force().row_adapters(x, self._buffers["route_slot_table"])
        keep_concatenation(self, index)
        return real_forward(self, x, *args, **kwargs)

    variants = {"base": ("base", None, None), "peft one adapter": ("peft one adapter", None, None),
                "peft floor": ("peft one adapter", None, peft_floor), "gatedlora": ("gatedlora torch", None, None)}
    for level, name in enumerate(("floor", "floor +routing", "floor +weights", "floor +versions")):
        variants[name] = ("gatedlora torch", stripped_forward(level, kept), None)
    variants["floor, step reads"] = ("gatedlora torch, step reads", stripped_forward(1, kept), None)
    seconds = {name: [] for name in variants}
    cat_seconds = {name: 0.0 for name in ("base", "peft one adapter", "gatedlora")}
    real_cat = torch.cat

    class TimedTorch:  # transformers' cache code calls torch.cat through its module's ``torch``
        def __getattr__(self, attribute):
            return getattr(torch, attribute)

        @staticmethod
        def cat(*args, **kwargs):
            started = time.perf_counter()
            result = real_cat(*args, **kwargs)
            current[0] += time.perf_counter() - started
            return result

    current = [0.0]
    with torch.inference_mode():
        providers = multi_decode_providers(setup, ids, mask, routes)[0]
        loop_seconds = []

        def read_every_layer():
            for layer, index in indices.items():
                keep_concatenation(layer, index)

        def step_reads(step=providers["gatedlora torch"]):
            started = time.perf_counter()
            read_every_layer()
            loop_seconds.append(time.perf_counter() - started)
            return step()

        providers["gatedlora torch, step reads"] = step_reads
        layer_class.forward = keep
        providers["gatedlora torch"]()
        layer_class.forward = real_forward
        try:
            for _ in range(options.rounds):
                for name, (provider, forward, peft_forward) in variants.items():
                    layer_class.forward = forward or real_forward
                    peft_class.forward = peft_forward or real_peft_forward
                    step = providers[provider]
                    for _ in range(5):
                        step()
                    started = time.perf_counter()
                    for _ in range(options.steps):
                        step()
                    seconds[name].append((time.perf_counter() - started) / options.steps)
            layer_class.forward, peft_class.forward = real_forward, real_peft_forward
            alone = []
            for _ in range(200):
                started = time.perf_counter()
                read_every_layer()
                alone.append(time.perf_counter() - started)
            cache_utils.torch = TimedTorch()  # apart from the timed rounds: the wrapper costs host time
            for name in cat_seconds:
                step = providers[variants[name][0]]
                step()
                current[0] = 0.0
                for _ in range(options.steps):
                    step()
                cat_seconds[name] = current[0] / options.steps
        finally:
            layer_class.forward, peft_class.forward, cache_utils.torch = real_forward, real_peft_forward, torch
    base = statistics.median(seconds["base"])
    print(f"decode step, batch 8, 4 adapters (routes {routes.tolist()}), {options.rounds} rounds x {options.steps} "
          f"steps, one thread; median time / base ({base * 1e3:.3f} ms):")
    for name, values in seconds.items():
        print(f"  {name:18s} {statistics.median(values) / base:.3f}")
    print(f"the step reads' loop: {statistics.median(loop_seconds) * 1e6:.0f} us a step, "
          f"{statistics.median(alone) * 1e6:.0f} us repeated on its own (medians)")
    print("KV cache torch.cat per step (ms):", ", ".join(f"{name} {value * 1e3:.3f}"
                                                     for name, value in cat_seconds.items()))


if __name__ == "__main__":
    main()
