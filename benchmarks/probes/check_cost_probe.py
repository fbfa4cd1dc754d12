"""CPU diagnostic probe: what the checks of a routed layer's kept record (``gatedlora.kept_call``) cost in the
README's decode comparison, where every provider's step finds the caches cold. Not part of the package.

    python benchmarks/probes/check_cost_probe.py [--processes 14]

The bench model, four rank-16 adapters, 8 sequences routed as ``gatedlora bench --adapters 4`` routes them,
one decode step at a fixed context; base, PEFT with one adapter and PEFT's mixed batch as in
``benchmarks/batch_sweep.py --adapters 4``, and beside them gatedlora copies of the model (their own layers and KV
caches, the same weights) whose layers run ``kept_output`` with some of its checks:

* ``floor``: the decision's record, the base linear and ``add_kept_product_``, nothing checked;
* ``+weights key``: + ``copy_key`` (the eight adapter weights' data pointers and versions);
* ``+registries``: + every entry of the module registries and ``_parameters`` dicts, by identity;
* ``checks in each call``: every check of the record made in the layer's own call (its ``depends.hold()``), as
  the package did before the first call of a forward checked every layer's record at once;
* ``gatedlora``: the package as it is.

The stripped layers are correct only for this unchanging model (they skip what they do not check). One thread,
its CPU time, providers interleaved in a new order each round (``timing.time_side_by_side``), medians over PEFT
with one adapter. One process's ratios move by a few percent with where its allocations landed, more than
the differences asked about, so ``--processes N`` runs the comparison in N fresh processes and prints, per
provider, the median, quartiles and how many processes had it below PEFT with one adapter.
"""
from __future__ import annotations

import argparse
import json
import operator
import statistics
import subprocess
import sys
import time
import warnings
from itertools import chain

import torch
import torch.nn.functional as F

import gatedlora.routed_layer as routed_layer
from gatedlora import GatedLoraConfig, patch_model
from gatedlora.benchmarking.models import CPU_DEFAULT, build_llama, weight_sharing_copy
from gatedlora.benchmarking.multi_adapter import (MultiScenario, RoutePatternRouter, build_multi_setup,
                                                  make_multi_batch, multi_decode_providers)
from gatedlora.benchmarking.timing import time_side_by_side
from gatedlora.kept_call import kept_output
from gatedlora.ops.multi_weights import copy_key
from gatedlora.ops.torch_multi import add_kept_product_

# Each stripped copy and the groups of checks its layers make in each call (stripped_output)
VARIANTS = {"floor": 0, "+weights key": 1, "+registries": 2, "checks in each call": 3}
REFERENCE = "peft one adapter"


def stripped_output(layer, calls: dict, x: torch.Tensor, checks: int) -> torch.Tensor | None:
    """``kept_output`` with its first ``checks`` groups of checks (0: none, 1: the weights' key, 2: + registries,
    3: all of them, in this call)."""
    state = layer.__dict__
    decision = state["route"].in_force()
    kept = calls.get(id(decision))
    if kept is None:
        return None
    concatenation = kept.concatenation
    if checks >= 3 and (torch.compiler.is_compiling() or torch.is_grad_enabled() or kept.decision is not decision
                        or not kept.depends.hold() or x.shape != kept.shape or x.dtype is not kept.dtype
                        or not x.is_cpu or torch.is_autocast_enabled("cpu")):
        return None
    if checks in (1, 2) and copy_key(concatenation.weights) != concatenation.key:
        return None
    depends = kept.depends
    if checks == 2 and not all(map(operator.is_, chain.from_iterable(depends._sections(depends.referents())),
                                   depends.identities)):
        return None
    parameters = state["_modules"]["base_layer"]._parameters
    result = F.linear(x, parameters["weight"], parameters["bias"])
    add_kept_product_(result, x, concatenation)
    return result


def layer_output(layer, calls: dict, x: torch.Tensor) -> torch.Tensor | None:
    """``routed_layer.kept_output`` for the probe: a layer of a stripped copy runs its variant."""
    checks = layer.__dict__.get("_probe_checks")
    return kept_output(layer, calls, x) if checks is None else stripped_output(layer, calls, x, checks)


def one_process(rounds_budget_s: float) -> dict[str, float]:
    """One comparison in this process: each provider's median step time / PEFT one adapter's."""
    torch.set_num_threads(1)
    routed_layer.kept_output = layer_output
    device = torch.device("cpu")
    setup = build_multi_setup(build_llama(CPU_DEFAULT, device, torch.float32), 0, ["torch"], 4)
    config = setup.peft.get_base_model().config
    for variant in VARIANTS:
        router = RoutePatternRouter(config.hidden_size, len(setup.names) + 1)
        model = weight_sharing_copy(setup.peft)
        patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, adapters=setup.names, router=router,
                                           backend="torch"))
        layers = [m for m in model.modules() if isinstance(m, routed_layer.RoutedLoRALinear)]
        for layer in layers:
            layer.__dict__["_probe_checks"] = VARIANTS[variant]
        setup.gated[variant], setup.routers[variant] = model, router
    ids, mask, routes = make_multi_batch(MultiScenario("decode", 8, 128, 4), setup.vocab_size, device)
    with torch.inference_mode():
        providers, _ = multi_decode_providers(setup, ids, mask, routes)
        del providers["peft per group"]
        timings = time_side_by_side(providers, device, budget_s=rounds_budget_s, clock=time.thread_time,
                                    warmup_s=2.0)
    reference = timings[REFERENCE].median_s
    return {name.removeprefix("gatedlora torch").strip() or "gatedlora": t.median_s / reference
            for name, t in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="fresh processes to run the comparison in")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timing per process")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: print one line
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.one:
        print(json.dumps(one_process(args.budget)))
        return 0
    runs = []
    for n in range(args.processes):
        line = subprocess.run([sys.executable, __file__, "--one", "--budget", str(args.budget)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs.append(json.loads(line))
        print(f"process {n + 1}: " + "  ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)
    print(f"time / {REFERENCE}'s, decode step, batch 8, 4 adapters, one thread's CPU time; over {len(runs)} processes:")
    for name in runs[0]:
        values = [run[name] for run in runs]
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        below = sum(v < 1 for v in values)
        print(f"  {name:32s} median {q[1]:.3f}  quartiles {q[0]:.3f}-{q[2]:.3f}  "
              f"below {REFERENCE}: {below}/{len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
