"""Decode steps of this checkout's gatedlora against another checkout's, side by side in one process.

    git archive main gatedlora | tar -x -C /tmp/baseline
    python tools/compare_decode.py --baseline /tmp/baseline [--quick] [--budget 2]

The baseline package is copied as ``gatedlora_baseline`` with its torch.library namespace renamed
(two packages cannot both register ``gatedlora::...``). Both patch weight-sharing copies of one
PEFT model (the ``gatedlora bench`` model and decode scenarios), and every provider's decode step
runs in the same interleaved rounds, so drift hits all alike. Prints median ms per step and the
ratio to the base model. ``--clock thread`` times the calling thread's CPU time (with one intra-op
thread): on a loaded machine it does not count the time the thread waits for a core.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import gatedlora
from gatedlora.benchmarking.models import CPU_DEFAULT, add_prism_adapter, build_llama, weight_sharing_copy
from gatedlora.benchmarking.scenarios import BenchSetup, PatternRouter, decode_providers, default_scenarios, make_batch
from gatedlora.benchmarking.timing import Timing, time_side_by_side


def time_thread_cpu(providers: dict, rounds: int) -> dict[str, Timing]:
    """Interleaved rounds, each call timed by the calling thread's CPU time (time.thread_time)."""
    for fn in providers.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            begin = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - begin)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4)
        out[name] = Timing(statistics.median(values), q[0], q[2], len(values))
    return out


def load_baseline(checkout: Path):
    """The package ``checkout/gatedlora`` imported as ``gatedlora_baseline``."""
    where = Path(tempfile.mkdtemp(prefix="gatedlora_baseline_"))
    target = where / "gatedlora_baseline"
    shutil.copytree(checkout / "gatedlora", target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        renamed = text.replace("gatedlora::", "gatedlora_baseline::").replace("torch.ops.gatedlora.",
                                                                             "torch.ops.gatedlora_baseline.")
        if renamed != text:
            path.write_text(renamed)
    sys.path.insert(0, str(where))
    return importlib.import_module("gatedlora_baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a directory that holds a gatedlora/ package")
    parser.add_argument("--quick", action="store_true", help="the decode scenarios of gatedlora bench --quick")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per scenario (wall clock)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall: perf_counter, as gatedlora bench; thread: this thread's CPU time, 1 thread")
    parser.add_argument("--rounds", type=int, default=100, help="rounds with --clock thread")
    args = parser.parse_args()
    if args.clock == "thread":
        torch.set_num_threads(1)
    baseline = load_baseline(args.baseline)
    torch.manual_seed(0)
    base_model = build_llama(CPU_DEFAULT, torch.device("cpu"), torch.float32)
    base = weight_sharing_copy(base_model)
    peft = add_prism_adapter(base_model, router_layer=0)
    hidden = base_model.config.hidden_size
    gated, routers = {}, {}
    for name, package in (("baseline", baseline), ("this", gatedlora)):
        router = PatternRouter(hidden)
        model = weight_sharing_copy(peft)
        package.patch_model(model, package.GatedLoraConfig(gate="sequence", router_layer=0, router=router))
        gated[name], routers[name] = model, router
    parameters = inspect.signature(peft.get_base_model().forward).parameters
    setup = BenchSetup(base, peft, gated, routers, 0, torch.device("cpu"), base_model.config.vocab_size,
                       "cache" if "cache" in parameters else "past_key_values")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}; model {CPU_DEFAULT}")
    print(f"{'scenario':34s} " + " ".join(f"{p:>26s}" for p in ("base", "peft", "gatedlora baseline",
                                                                "gatedlora this")))
    with torch.inference_mode():
        for scenario in (s for s in default_scenarios(args.quick) if s.phase == "decode"):
            ids, mask, open_mask = make_batch(scenario, setup.vocab_size, setup.device)
            providers, _ = decode_providers(setup, ids, mask, open_mask)
            providers.pop("peft mixed")
            if args.clock == "thread":
                timings = time_thread_cpu(providers, args.rounds)
            else:
                timings = time_side_by_side(providers, setup.device, budget_s=args.budget, max_rounds=400)
            base_s = timings["base"].median_s
            cells = [f"{t.median_s * 1e3:8.3f} ms ({t.median_s / base_s:4.2f}x, n={t.runs})"
                     for t in timings.values()]
            print(f"{scenario.name:34s} " + " ".join(f"{c:>26s}" for c in cells))


if __name__ == "__main__":
    main()
