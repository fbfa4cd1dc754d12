"""Timing side by side: providers run interleaved in rounds so drift hits them all alike.

CPU: ``time.perf_counter`` (or another clock, see ``time_side_by_side``). CUDA: CUDA events around
each call, after warm-up.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


MIN_ROUNDS = 8  # every provider is timed at least this often, enough for a quartile spread


@dataclass
class Timing:
    """Median and spread of one provider's calls, in seconds."""

    median_s: float
    q1_s: float
    q3_s: float
    runs: int


def _time_once(fn: Callable[[], object], device: torch.device, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = clock()
    fn()
    return clock() - begin


def warm_up(providers: dict[str, Callable[[], object]], device: torch.device, calls: int = 2,
            seconds: float = 0.0) -> None:
    """Call every provider in turn until each has run ``calls`` times and ``seconds`` have passed.

    The first scenario of a run needs seconds, not calls: thread pools, the allocator and the CPU
    clock settle then (2-core CPU: the first row's base time was 99 ms against 76-83 ms in the
    next rows of the same shape, with 2 warm-up calls).
    """
    begin = time.perf_counter()
    done = 0
    while done < calls or time.perf_counter() - begin < seconds:
        for fn in providers.values():
            fn()
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(providers: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                      min_rounds: int = MIN_ROUNDS, max_rounds: int = 50, budget_s: float = 2.0,
                      warmup_s: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every provider in interleaved rounds until ``budget_s`` is spent (at least ``min_rounds``,
    enough for a quartile spread). Each round runs the providers in a new order (shuffled, seeded): a
    provider pays for what the one before it evicted from the caches, and in a fixed or rotated order it
    always follows the same one (on one CPU core, decode at batch 8, two providers running the same code
    measured 1.28-1.29 and 1.245-1.25x base in a rotated order, the first always right after PEFT; shuffled,
    1.28-1.29 both).

    ``clock`` (CPU only): ``time.perf_counter`` (wall time, the default) or ``time.thread_time`` (the
    calling thread's CPU time: with ``torch.set_num_threads(1)`` the work of a call, unaffected by
    other processes on a shared machine)."""
    warm_up(providers, device, warmup, warmup_s)
    names = list(providers)
    samples: dict[str, list[float]] = {name: [] for name in providers}
    spent = 0.0
    rounds = 0
    order = random.Random(0)
    while rounds < min_rounds or (spent < budget_s and rounds < max_rounds):
        order.shuffle(names)
        for name in names:
            t = _time_once(providers[name], device, clock)
            samples[name].append(t)
            spent += t
        rounds += 1
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = Timing(statistics.median(values), q[0], q[2], len(values))
    return out
