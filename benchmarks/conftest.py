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
