"""CPU diagnostic probe: the time of each patched layer call inside a decode step, gatedlora's against PEFT's, and
what its parts cost there (docs/design.md, "What it costs on the CPU"). Not part of the package.

    python benchmarks/probes/layer_call_probe.py [--rounds 60] [--steps 20]

The bench model (``models.CPU_DEFAULT``, hidden 256, four rank-16 adapters on the 21 projections of blocks 1-3),
8 sequences routed as ``gatedlora bench --adapters 4`` routes them, one decode step at a fixed context, one thread.
Each layer forward is wrapped in a ``perf_counter_ns`` pair, so a call is timed where it runs in the step: after the
weights of other layers have pushed its objects out of the caches, which a loop over one layer never sees. Printed:
microseconds per layer call (medians over rounds, the providers interleaved in a new order each round) with each
round's ratio to PEFT's, and the step's time outside the layer calls. Variants of gatedlora's layer forward:

* ``gatedlora``: as it is.
* ``gatedlora, concatenation kept``: before the layers kept a record of their last call (``kept_call``): every call
  reads the routing state, the adapters' weights through the modules and the settings, then adds with the
  concatenation the layer kept (``RoutedLoRALinear._add_kept_on_cpu``).
* ``gatedlora through the op``: its mixed-batch path before the layers kept a concatenation each: the base layer
  and dropout through their methods, then ``add_lora_multi_`` (the shared lookup, the op's frames).
* ``floor``: the arithmetic alone (base ``F.linear``; ``x A_cat^T``; the column mask; ``addmm_`` with ``B_cat^T``),
  each layer's concatenation and mask looked up once, before timing: no routing, weight or version reads.
* ``floor +weights``: + reading the adapters' weights through the modules (``_adapter_weight_tuples``).
* ``floor +weights +lookup``: + finding the concatenation in the op's shared forms (``multi_weights.concatenated``:
  the weights' ids, their versions and data pointers), as the layers did before they kept one each.

The stripped forwards are correct only for this model and batch; every variant's logits are checked bitwise
against gatedlora's before timing.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from gatedlora.benchmarking.models import CPU_DEFAULT, build_llama
from gatedlora.benchmarking.multi_adapter import (MultiScenario, build_multi_setup, make_multi_batch,
                                                  multi_decode_providers)
import gatedlora.routed_layer as routed_layer
from gatedlora.ops import multi_weights
from gatedlora.routed_layer import RoutedLoRALinear


def stripped_forward(weights: bool, lookup: bool, kept: dict):
    """A RoutedLoRALinear forward doing the arithmetic, and the weight reads and the shared lookup if asked."""
    def forward(self, x, *args, **kwargs):
        found = kept.get(id(self))
        if found is None:
            index = self.route.in_force().row_adapters(x, self._buffers["route_slot_table"])
            a_t, b_t, not_owned, *_ = multi_weights.concatenated(*self._adapter_weight_tuples(), self.scalings, index,
                                                                 True)
            found = kept[id(self)] = (index, a_t, b_t, not_owned)
        index, a_t, b_t, not_owned = found
        if weights:
            lora_a, lora_b = self._adapter_weight_tuples()
            if lookup:
                a_t, b_t, not_owned, *_ = multi_weights.concatenated(lora_a, lora_b, self.scalings, index, True)
        out = F.linear(x, self.base_layer.weight)
        u = torch.mm(x.reshape(-1, x.shape[-1]), a_t)
        u.masked_fill_(not_owned, 0)
        out.view(-1, out.shape[-1]).addmm_(u, b_t)
        return out
    return forward


def decline(*args):  # RoutedLoRALinear._add_kept_on_cpu, or routed_layer.kept_output, declining every call
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    setup = build_multi_setup(build_llama(CPU_DEFAULT, torch.device("cpu"), torch.float32), 0, ["torch"], 4)
    ids, mask, routes = make_multi_batch(MultiScenario("decode", 8, 128, 4), setup.vocab_size, torch.device("cpu"))
    peft_class = type(next(m for m in setup.peft.modules() if hasattr(m, "lora_A")))
    layers = sum(isinstance(m, RoutedLoRALinear) for m in setup.gated["torch"].modules())
    real, real_peft, real_kept = RoutedLoRALinear.forward, peft_class.forward, RoutedLoRALinear._add_kept_on_cpu
    real_call = routed_layer.kept_output
    kept: dict = {}
    elapsed = [0]

    def timed(forward):
        def call(self, x, *args, **kwargs):
            started = time.perf_counter_ns()
            result = forward(self, x, *args, **kwargs)
            elapsed[0] += time.perf_counter_ns() - started
            return result
        return call

    def put(owner, forward, kept_path, kept_call):  # a variant's forward (and the kept paths, or refusals) in place
        owner.forward = forward
        RoutedLoRALinear._add_kept_on_cpu = kept_path
        routed_layer.kept_output = kept_call

    with torch.inference_mode():
        providers = multi_decode_providers(setup, ids, mask, routes)[0]
        gated = providers["gatedlora torch"]
        # name: (step, the class whose forward is timed, that forward, the layers' kept paths)
        variants = {"peft one adapter": (providers["peft one adapter"], peft_class, real_peft, real_kept, real_call),
                    "gatedlora": (gated, RoutedLoRALinear, real, real_kept, real_call),
                    "gatedlora, concatenation kept": (gated, RoutedLoRALinear, real, real_kept, decline),
                    "gatedlora through the op": (gated, RoutedLoRALinear, real, decline, decline),
                    "floor": (gated, RoutedLoRALinear, stripped_forward(False, False, kept), real_kept, real_call),
                    "floor +weights": (gated, RoutedLoRALinear, stripped_forward(True, False, kept), real_kept,
                                       real_call),
                    "floor +weights +lookup": (gated, RoutedLoRALinear, stripped_forward(True, True, kept),
                                               real_kept, real_call)}
        try:
            expected = gated()
            for name, (step, owner, forward, *kept_paths) in variants.items():
                put(owner, forward, *kept_paths)
                if owner is RoutedLoRALinear and not torch.equal(step(), expected):
                    raise SystemExit(f"{name}: its logits differ from gatedlora's")
                put(owner, real if owner is RoutedLoRALinear else real_peft, real_kept, real_call)
            per_call = {name: [] for name in variants}
            outside = {name: [] for name in variants}
            for _ in range(options.rounds):
                order = list(variants)
                random.shuffle(order)
                for name in order:
                    step, owner, forward, *kept_paths = variants[name]
                    put(owner, timed(forward), *kept_paths)
                    for _ in range(3):
                        step()
                    elapsed[0] = 0
                    started = time.perf_counter_ns()
                    for _ in range(options.steps):
                        step()
                    whole = time.perf_counter_ns() - started
                    put(owner, real if owner is RoutedLoRALinear else real_peft, real_kept, real_call)
                    per_call[name].append(elapsed[0] / options.steps / layers / 1e3)
                    outside[name].append((whole - elapsed[0]) / options.steps / 1e3)
        finally:
            RoutedLoRALinear.forward, peft_class.forward, RoutedLoRALinear._add_kept_on_cpu = real, real_peft, real_kept
            routed_layer.kept_output = real_call
    print(f"decode step, batch 8, 4 adapters (routes {routes.tolist()}), {options.rounds} rounds x {options.steps} "
          f"steps, one thread; us per call of the {layers} patched layers (median; each round's ratio to PEFT's: "
          "median and quartiles), us per step outside them:")
    for name, values in per_call.items():
        ratios = [value / peft for value, peft in zip(values, per_call["peft one adapter"])]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"  {name:29s} {statistics.median(values):7.1f} us  x PEFT {statistics.median(ratios):.3f} "
              f"({low:.3f} .. {high:.3f})  outside {statistics.median(outside[name]):7.0f} us")


if __name__ == "__main__":
    main()
