"""Model level, CPU or GPU: gatedlora with half the sequences open against PEFT with every sequence open,
at each batch size, for prefill and decode (the hot-path target of docs/design.md, "Choosing the strategy").

    python benchmarks/batch_sweep.py [--batches 1,2,4,8,16,32] [--tokens 64] [--budget 1.0] [--json FILE]
    python benchmarks/batch_sweep.py --adapters 4 [...]
    python benchmarks/batch_sweep.py --adapters 4 --hidden 2048 --phases decode --batches 8 [...]

``--hidden H``: the default model's proportions at hidden size H (``models.at_width``: MLP width, head
size and query heads per KV head kept), to see how a ratio moves with the model's width.

With ``--adapters N`` (several adapters, one router): N adapters and each batch's sequences 25% on the base
model, the rest spread over the adapters (``gatedlora bench --adapters``'s scenarios); each row times
gatedlora against PEFT's mixed batch and, at decode, PEFT with one adapter on every sequence. The targets:
gatedlora below PEFT's mixed batch in every row, and at decode with 8 sequences no slower than PEFT with one
adapter.

Uses the machinery of ``gatedlora bench`` (gatedlora/benchmarking): the same Llama built from a config, the
same PRISM adapter (r=16 on blocks after the router layer), providers timed in interleaved rounds, medians.
Each row: time / base time for PEFT (every sequence open) and gatedlora torch with ``max(1, B // 2)`` of B
sequences open (the first ones: on the CPU the layers then add plain LoRA to that slice of the batch), and, at
batch 8, 1 of 8 open and 4 of 8 scattered (every other sequence: the gate masks the closed rows). The target:
gatedlora's ratio below PEFT's in every row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from gatedlora.benchmarking.models import CPU_DEFAULT, GPU_DEFAULT, LlamaSpec, add_prism_adapter, at_width, build_llama
from gatedlora.benchmarking.report import environment
from gatedlora.benchmarking.multi_adapter import (MultiScenario, build_multi_setup, make_multi_batch,
                                                  multi_decode_providers, multi_prefill_providers)
from gatedlora.benchmarking.scenarios import Scenario, build_setup, decode_providers, make_batch, prefill_providers
from gatedlora.benchmarking.timing import time_side_by_side


def _providers(make, *args) -> dict:
    result = make(*args)
    return result[0] if isinstance(result, tuple) else result  # some versions return (providers, notes)


PHASES = ("prefill", "decode")


def default_model(device: torch.device, hidden: int | None = None) -> tuple[LlamaSpec, torch.dtype]:
    """The bench's default model for the device, or its proportions at width ``hidden``."""
    spec, dtype = (GPU_DEFAULT, torch.bfloat16) if device.type == "cuda" else (CPU_DEFAULT, torch.float32)
    return (spec if hidden is None else at_width(spec, hidden)), dtype


def sweep(batches: list[int], tokens: int, budget_s: float, device: torch.device, clock,
          hidden: int | None = None, phases: tuple[str, ...] = PHASES) -> list[dict]:
    spec, dtype = default_model(device, hidden)
    backend = "cuda" if device.type == "cuda" else "torch"
    setup = build_setup(build_llama(spec, device, dtype), lambda m: add_prism_adapter(m, 0), 0, [backend])
    gated = f"gatedlora {backend}"
    rows = []
    for phase in phases:
        cases = [(b, max(1, b // 2), False) for b in batches] + ([(8, 1, False), (8, 4, True)] if 8 in batches else [])
        for batch, open_count, scattered in cases:
            ids, mask, open_mask = make_batch(Scenario(phase, batch, tokens, open_count), setup.vocab_size, device)
            if scattered:  # every other sequence open: no slice of the batch holds the open ones
                open_mask = torch.arange(batch) % 2 == 0
            every = torch.ones_like(open_mask)
            make = prefill_providers if phase == "prefill" else decode_providers
            with torch.inference_mode():
                # PEFT runs every sequence open whatever the routing; gatedlora sees the scenario's routes
                providers = {"base": _providers(make, setup, ids, mask, every)["base"],
                             "peft": _providers(make, setup, ids, mask, every)["peft"],
                             gated: _providers(make, setup, ids, mask, open_mask)[gated]}
                timings = time_side_by_side(providers, device, budget_s=budget_s, clock=clock)
            base = timings["base"].median_s
            rows.append({"phase": phase, "batch": batch, "open": open_count, "scattered": scattered,
                         "base_ms": base * 1e3, "peft_ratio": timings["peft"].median_s / base,
                         "gated_ratio": timings[gated].median_s / base})
            print(f"{phase:7s} b={batch:2d} open {open_count:2d}/{batch:<2d}{' scattered' if scattered else ''} "
                  f"base {base * 1e3:7.2f} ms  "
                  f"peft {rows[-1]['peft_ratio']:.2f}x  gatedlora {rows[-1]['gated_ratio']:.2f}x  "
                  f"{'ok' if rows[-1]['gated_ratio'] < rows[-1]['peft_ratio'] else 'SLOWER'}", flush=True)
    return rows


def sweep_adapters(adapters: int, batches: list[int], tokens: int, budget_s: float, device: torch.device,
                   clock, hidden: int | None = None, phases: tuple[str, ...] = PHASES) -> list[dict]:
    spec, dtype = default_model(device, hidden)
    backend = "triton" if device.type == "cuda" else "torch"
    setup = build_multi_setup(build_llama(spec, device, dtype), 0, [backend], adapters)
    gated = f"gatedlora {backend}"
    rows = []
    for phase in phases:
        for batch in batches:
            scenario = MultiScenario(phase, batch, tokens, adapters)
            ids, mask, routes = make_multi_batch(scenario, setup.vocab_size, device)
            with torch.inference_mode():
                if phase == "prefill":
                    providers = multi_prefill_providers(setup, ids, mask, routes)
                else:
                    providers = multi_decode_providers(setup, ids, mask, routes, graphs=device.type == "cuda")[0]
                providers = {k: v for k, v in providers.items() if k != "peft per group"}
                warmup_s = 2.0 if not rows else 0.0  # the first row settles thread pools and clocks
                timings = time_side_by_side(providers, device, budget_s=budget_s, clock=clock, warmup_s=warmup_s)
            base = timings["base"].median_s
            row = {"phase": phase, "batch": batch, "base_ms": base * 1e3, "routes": routes.tolist(),
                   **{f"{k}_ratio": t.median_s / base for k, t in timings.items() if k != "base"}}
            rows.append(row)
            one = row.get("peft one adapter_ratio")
            on_base = routes.tolist().count(0)
            print(f"{phase:7s} b={batch:2d} {on_base:2d}/{batch:<2d} on base  base {base * 1e3:7.2f} ms  "
                  f"peft mixed {row['peft mixed_ratio']:.2f}x  " + (f"peft one adapter {one:.2f}x  " if one else "")
                  + f"gatedlora {row[gated + '_ratio']:.2f}x  "
                  + ("ok" if row[gated + "_ratio"] < row["peft mixed_ratio"] else "SLOWER than peft mixed"), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--tokens", type=int, default=64, help="prompt length (prefill) and context (decode)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU timing: wall time (default) or the thread's CPU time (with --threads 1, "
                             "unaffected by other processes on a shared machine)")
    parser.add_argument("--json", help="write the rows and the environment here")
    parser.add_argument("--adapters", type=int, help="several adapters, one router: this many (see above)")
    parser.add_argument("--hidden", type=int, help="the default model's proportions at this hidden size")
    parser.add_argument("--phases", default=",".join(PHASES), help="prefill, decode or both (comma-separated)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    batches = [int(b) for b in args.batches.split(",")]
    phases = tuple(args.phases.split(","))
    if set(phases) - set(PHASES):
        parser.error(f"--phases: expected some of {PHASES}, got {args.phases!r}")
    if args.adapters:
        rows = sweep_adapters(args.adapters, batches, args.tokens, args.budget, device, clock, args.hidden, phases)
    else:
        rows = sweep(batches, args.tokens, args.budget, device, clock, args.hidden, phases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(device), "threads": torch.get_num_threads(), "clock": args.clock,
                       "tokens": args.tokens, "model": asdict(default_model(device, args.hidden)[0]), "rows": rows},
                      f, indent=1)
    if args.adapters:
        gated = [k for k in rows[0] if k.startswith("gatedlora")][0]
        return 0 if all(r[gated] < r["peft mixed_ratio"] for r in rows) else 1
    return 0 if all(r["gated_ratio"] < r["peft_ratio"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
