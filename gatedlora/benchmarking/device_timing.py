"""Timing one call on a GPU with Triton's benchmarking helpers (and a CPU stand-in for dry runs).

Two modes, both from ``triton.testing``:

* ``eager``: ``do_bench`` with the L2 cache flushed before every call. A 4096x4096 bf16 weight (32 MB)
  fits in an H100's 50 MB L2, so timings without the flush flatter every provider. Host work
  (Python, launches) counts whenever the GPU waits for it, as it does for a user's eager call.
* ``graph``: ``do_bench_cudagraph``: the call captured many times over in one CUDA graph and
  replayed, so host work disappears. It does not flush L2, so callers pass a function that cycles
  through several weight copies whose bytes together exceed L2 (``rotating``).

On a CPU (``gpu_check --dry-run``) both modes fall back to ``time.perf_counter`` rounds, which
exercises the plumbing and says nothing about a GPU.
"""
from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch

from .timing import Timing

MODES = ("eager", "graph")


def _summary(samples_ms: Sequence[float]) -> Timing:
    values = [v / 1e3 for v in samples_ms]
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return Timing(statistics.median(values), quartiles[0], quartiles[2], len(values))


def time_call(fn: Callable[[], object], device: torch.device, mode: str = "eager", warmup_ms: float = 10,
              rep_ms: float = 50) -> Timing:
    """Median and quartiles of one call of ``fn`` in ``mode`` (``eager`` or ``graph``).

    ``graph`` raises whatever capture raises (a host sync inside ``fn``, for example); callers
    record it as the reason the provider has no graph timing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device.type != "cuda":
        return _time_on_host(fn, rep_ms)
    from triton.testing import do_bench, do_bench_cudagraph

    if mode == "eager":
        return _summary(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
    return _summary(do_bench_cudagraph(fn, rep=rep_ms, return_mode="all"))


def _time_on_host(fn: Callable[[], object], rep_ms: float) -> Timing:
    fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 200):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    return _summary(samples)


def rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One function that runs ``calls[0]``, ``calls[1]``, ... in turn (each over its own weights and
    inputs), so repeated calls do not find the previous call's bytes in L2. Under graph capture the
    rotation is unrolled into the graph."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def rotation_count(bytes_per_copy: int, device: torch.device, minimum: int = 2, maximum: int = 16) -> int:
    """How many copies make the working set at least three times the device's L2 cache."""
    if device.type != "cuda":
        return minimum
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(minimum, min(maximum, -(-3 * l2 // max(bytes_per_copy, 1))))
