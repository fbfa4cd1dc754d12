"""Shared setup for the pytest-benchmark suites: device choice and GPU-aware timing wrappers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

DEVICE = torch.device(os.environ.get("GATEDLORA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def synchronized(fn):
    """On a GPU, wait for the work so pytest-benchmark's wall clock times the kernels, not the launches."""
    if DEVICE.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def in_cuda_graph(fn):
    """Capture ``fn`` in a CUDA graph and return its replay (decode-sized calls); None where capture fails,
    e.g. the torch backend, whose ``nonzero`` is a host sync that a graph cannot hold."""
    if DEVICE.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return graph.replay


# pytest-benchmark's defaults print ten columns for 200+ cases, 259 characters wide, with ratios
# "relative to the best" in brackets. Unless the command line says otherwise: median, IQR and
# rounds; sorted by name within each group; short names; skip reasons listed. The summary at the
# end (pytest_terminal_summary) gives each scenario's adapter paths as multiples of its base path.
READABLE_DEFAULTS = {"benchmark_columns": ["median", "iqr", "rounds"], "benchmark_sort": "name",
                     "benchmark_name": "short"}
# per case on a CPU (pytest-benchmark's default is 1.0 s): the sweep then takes about a minute
CPU_MAX_TIME = "0.2"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    given = " ".join(config.invocation_params.args)
    for option, value in READABLE_DEFAULTS.items():
        if "--" + option.replace("_", "-") not in given:
            setattr(config.option, option, value)
    if DEVICE.type == "cpu" and "--benchmark-max-time" not in given:
        config.option.benchmark_max_time = CPU_MAX_TIME
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"  # a skipped case says why


def _scenario_rows(benchmarks) -> dict[str, dict]:
    """Group the timed cases into scenarios: the layer suite's open fractions share their group's base
    and PEFT timings, which do not depend on the gates."""
    groups: dict[str, dict[str, object]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or bench.name, {})[bench] = bench
    rows: dict[str, dict] = {}
    for group, members in groups.items():
        shared = [b for b in members if "fraction" not in b.params]
        fractions = sorted({b.params["fraction"] for b in members if "fraction" in b.params}) or [None]
        for fraction in fractions:
            name = group if fraction is None else f"{group} open {fraction:.0%}"
            row = rows.setdefault(name, {"name": name, "median_ms": {}, "iqr_ms": {}})
            for bench in shared + [b for b in members if b.params.get("fraction", None) == fraction]:
                provider = bench.params["provider"]
                row["median_ms"][provider] = bench.stats.median * 1e3
                row["iqr_ms"][provider] = [bench.stats.q1 * 1e3, bench.stats.q3 * 1e3]
    return {k: v for k, v in rows.items() if "base" in v["median_ms"]}


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables, so it is the last thing on the screen
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.stats and "provider" in b.params]
    if not benchmarks:
        return
    from gatedlora.benchmarking.report import timing_table

    terminalreporter.section("gatedlora: adapter paths against the base path")
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    suites: dict[str, list[dict]] = {}
    for row in _scenario_rows(benchmarks).values():  # one table per suite: layer level, model level
        suites.setdefault(row["name"].split()[0], []).append(row)
    for rows in suites.values():
        providers = sorted({p for row in rows for p in row["median_ms"]}, key=lambda p: order.get(p, len(order)))
        for line in timing_table(rows, providers, with_check=False):
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
    for line in SUMMARY_LEGEND:
        terminalreporter.write_line(line)


PROVIDER_ORDER = ["base", "peft", "peft one adapter", "peft mixed", "peft per group", "prism two-pass",
                  "gatedlora torch", "gatedlora triton", "gatedlora cuda"]
SUMMARY_LEGEND = [
    "median ms per call (lower is better); ±p%: half the interquartile range as a share of the median; "
    "(r x): median / the base path's median in the same group",
    "layer rows: K N M dtype r = in/out features, rows per call (M), dtype and LoRA rank; open p%: the share "
    "of rows whose gate is open (PRISM's rates: 6% MMLU, 75% safety); base and peft do not depend on it",
    "model rows: b = batch, t = prompt tokens, open k/B = sequences routed to the adapter (see gatedlora bench)",
    "rows with 4 adapters: each row (layer) or sequence (model) on the base model (25%) or one of 4 adapters; "
    "peft one adapter: every row on one adapter (see gatedlora bench --adapters 4)",
    "pytest-benchmark's own table above puts ratios to the fastest case of its group in brackets, not to base",
]
