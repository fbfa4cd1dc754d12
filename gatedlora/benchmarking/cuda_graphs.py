"""One decode step of a Hugging Face causal LM over a static KV cache, captured in a CUDA graph.

A decode step at batch 8 is a few milliseconds of kernels and, eager, about as much host time
(Python, hooks, launches): eager timings measure the host. Serving stacks replay the step from
a CUDA graph, and so does this: ``capture_decode_step`` prefills a ``StaticCache`` eagerly, then
captures one step. Each replay appends the same token at the same position and is rewound inside
the graph (the static layers count their length on the device), so every replay is the same step
at a fixed context, like the eager decode scenarios.

What makes a step capturable is what makes it graph-safe for users: no host read of device data
(routing decisions included) and no allocation that needs a sync. A capture that fails raises;
callers report the error as the reason that provider has no graph timing.

On a CPU the same step is compiled with ``torch.compile(fullgraph=True)`` instead
(``compile_decode_step``), which fails on the same host reads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _text_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def _static_layers_lengths(cache) -> list[torch.Tensor]:
    lengths = [getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", [])]
    if not lengths or not all(isinstance(t, torch.Tensor) for t in lengths):
        raise RuntimeError("this transformers StaticCache does not keep its length as a device tensor; "
                           "cannot rewind a captured decode step")
    return lengths


def step_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The token ids [B, 1] that every provider's decode step feeds: the prompt's last ones, the same for all.
    Not each provider's own argmax after its prefill: in bf16 a near tie flips between two correct models, and
    the step then compares different inputs (an H100 saw PEFT per group 8.2 from PEFT's mixed batch in the
    logits of a batch of 32, where every gatedlora backend was within 0.07)."""
    return ids[:, -1:]


def prefill_static(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache_argument: str, extra_len: int = 8,
                   **extra) -> tuple[object, torch.Tensor, dict]:
    """Prefill ``ids`` [B, T] into a new StaticCache; returns (cache, next token ids [B, 1], step kwargs)."""
    from transformers import StaticCache

    cache = StaticCache(config=_text_config(model), max_cache_len=ids.shape[1] + extra_len)
    model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_argument: cache}, **extra)
    next_ids = step_tokens(ids)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    # Positions as generate() computes them for left or right padding: real tokens before this one.
    position_ids = (mask.sum(dim=1, keepdim=True)).to(torch.long)
    step = dict(input_ids=next_ids, attention_mask=step_mask, position_ids=position_ids, use_cache=True,
                **{cache_argument: cache}, **extra)
    return cache, next_ids, step


def capture_decode_step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache_argument: str,
                        warmup: int = 2, **extra) -> tuple[Callable[[], None], torch.Tensor]:
    """(replay, logits [B, 1, V]): one decode step over a static cache, captured in a CUDA graph.

    ids, mask: the prompt [B, T]. ``extra`` goes to every forward (e.g. PEFT's ``adapter_names``,
    which cannot be captured: that raises here).
    """
    cache, _, step = prefill_static(model, ids, mask, cache_argument, **extra)
    lengths = _static_layers_lengths(cache)
    prompt = ids.shape[1]

    def run_and_rewind():
        logits = model(**step).logits
        for length in lengths:
            length.sub_(1)  # the step is undone: every replay decodes the same position
        return logits

    def check_lengths(when: str) -> None:
        # Read on the host outside the capture. The cache has 8 spare slots, so a step that was not
        # undone shows here, before a later replay could write past the cache.
        found = [int(length) for length in lengths]
        if any(value != prompt for value in found):
            raise RuntimeError(f"static cache lengths {found} {when}, expected {prompt} (the step was not undone)")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
        for _ in range(warmup):
            run_and_rewind()
    torch.cuda.current_stream().wait_stream(side)
    check_lengths("after the eager warm-up")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = run_and_rewind()
    check_lengths("after the capture")
    graph.replay()
    torch.cuda.synchronize()
    check_lengths("after the first replay")
    return CapturedStep(graph, cache, step), logits


class CapturedStep:
    """Replays a captured decode step. The graph holds raw addresses of what it reads and writes (the step's
    input ids, mask and positions, the static cache and its lengths) but no reference to them: it keeps
    them alive here. Returning ``graph.replay`` alone let them be freed, and a replay after the next
    provider's allocations read token ids and cache lengths from reused memory (a device-side assert in
    the embedding's ``index_select`` and the cache's ``index_copy_``, seen on an H100)."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", cache: object, step: dict):
        self.graph, self.cache, self.step = graph, cache, step

    def __call__(self) -> None:
        self.graph.replay()


def compile_decode_step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache_argument: str,
                        **extra) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """(step, logits of a first step): the decode step compiled with ``fullgraph=True`` (CPU check of
    the graph-safety that ``capture_decode_step`` needs on a GPU). Raises on a graph break."""
    cache, _, step = prefill_static(model, ids, mask, cache_argument, **extra)
    lengths = _static_layers_lengths(cache)

    def run_and_rewind(**kwargs):
        logits = model(**kwargs).logits
        for length in lengths:
            length.sub_(1)
        return logits

    compiled = torch.compile(run_and_rewind, fullgraph=True, dynamic=False)
    logits = compiled(**step)
    return (lambda: compiled(**step)), logits


# Ops that read device data on the host (a sync on a GPU, fatal inside a CUDA graph capture).
HOST_READ_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::equal",
                 "aten::is_nonzero", "aten::allclose")


def gatedlora_host_reads(fn: Callable[[], object]) -> list[str]:
    """Run ``fn`` and list every op that reads tensor data on the host (``.item()``, ``bool(t)``,
    ``nonzero``, ...) that gatedlora's own code calls, as "op at file:line". An empty list is what
    capturing ``fn`` in a CUDA graph needs from gatedlora; it can be checked on a CPU, where such a read
    costs nothing and nothing else would catch it. A read is gatedlora's when the innermost frame outside
    torch belongs to gatedlora (a read inside transformers, called from gatedlora's forward wrapper, is not)."""
    import traceback
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    package = str(Path(__file__).resolve().parents[1])
    torch_dir = str(Path(torch.__file__).resolve().parent)
    found: list[str] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in HOST_READ_OPS:
                caller = next((f for f in reversed(traceback.extract_stack()[:-1])
                               if not f.filename.startswith(torch_dir)), None)
                if caller is not None and caller.filename.startswith(package) and "benchmarking" not in caller.filename:
                    found.append(f"{func._schema.name} at {caller.filename[len(package) + 1:]}:{caller.lineno}")
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return found
