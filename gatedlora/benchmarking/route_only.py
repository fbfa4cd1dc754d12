"""The route-only front end against the full model: memory, load time and prefill time, side by side.

``run_route_only_benchmark`` builds a Llama-architecture model from a config, saves it (safetensors) with
a fresh PRISM adapter and a router (a gatedlora save), and compares

* ``route-only``: ``RouteOnlyModel`` (embeddings, blocks ``0..router_layer``, router), one forward;
* ``full``: the whole model patched with sequence gates (what a server without a front end runs), one
  prefill that keeps only the last position's logits, as serving engines do.

Memory and load time come from a fresh child process per model (peak bytes: CUDA
``max_memory_allocated``; CPU, the process's peak resident set above its peak after the imports), so
that neither model's allocations count against the other. Prefill time is measured in this process,
both models interleaved in rounds, after checking that the route-only probabilities equal the full
model's bitwise.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..patching import block_linear_names
from .machine_load import LoadMeter
from .models import LlamaSpec, build_llama, randomize_parameters
from .timing import time_side_by_side


def prepare(spec: LlamaSpec, router_layer: int, directory: Path, device: torch.device, dtype: torch.dtype
            ) -> tuple[Path, Path]:
    """Save a Llama of shape ``spec`` and a gatedlora save (fresh adapter after ``router_layer`` and a router
    that sends about half of random prompts to it), built on ``device``. Returns (model dir, router dir)."""
    import gatedlora
    from gatedlora import GatedLoraConfig, get_router, patch_model

    model = build_llama(spec, device, dtype)
    model_dir, router_dir = directory / "model", directory / "router"
    model.save_pretrained(model_dir)
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=router_layer,
                                       target_modules=block_linear_names(model)))
    randomize_parameters(model, 1, 0.05, lambda name: "lora_B" in name or name.startswith("gate_router."))
    with torch.no_grad():
        ids = torch.randint(3, spec.vocab_size, (16, 12), generator=torch.Generator().manual_seed(2))
        model(input_ids=ids.to(device))
        last = get_router(model).router.net[-1]
        last.bias -= torch.logit(get_router(model).last_probabilities.double()).median().to(last.bias.dtype)
    gatedlora.save_pretrained(model, router_dir)
    return model_dir, router_dir


def load(kind: str, model_dir: Path, router_dir: Path, device: torch.device, dtype: torch.dtype):
    """The ``route-only`` model, or the ``full`` patched causal LM, on ``device``."""
    import gatedlora
    from gatedlora.route_only import RouteOnlyModel, _quiet_transformers

    if kind == "route-only":
        return RouteOnlyModel.from_pretrained(model_dir, router_dir, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return gatedlora.load_pretrained(model, router_dir)


def run_forward(kind: str, model, input_ids: torch.Tensor, mask: torch.Tensor, use_cache: bool = False
                ) -> torch.Tensor:
    """One routing forward (route-only) or prefill (full, last position's logits only; ``use_cache``: filling a
    KV cache, as ``generate``'s prefill does); the probabilities [B]."""
    from gatedlora import get_router

    with torch.no_grad():
        if kind == "route-only":
            return model(input_ids, mask).probabilities
        model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1, use_cache=use_cache)
        return get_router(model).last_probabilities


def compare_probabilities(route_only: torch.Tensor, full: torch.Tensor) -> dict:
    """Bitwise equality, the largest difference and the number of decisions (p >= 0.5) that differ."""
    difference = (route_only.float() - full.float()).abs().max().item() if route_only.numel() else 0.0
    decisions = int(((route_only.float() >= 0.5) != (full.float() >= 0.5)).sum())
    return {"bitwise_equal": torch.equal(route_only, full), "max_difference": difference,
            "decisions_differing": decisions}


def child_memory(kind: str, model_dir: str, router_dir: str, device: str, dtype: str, batch: int,
                 length: int, vocab: int) -> dict:
    """Run in a fresh process: load ``kind``, run one forward; its load time and peak memory."""
    # everything imported before the baseline, the model's classes included (Transformers imports them lazily)
    import contextlib

    from transformers import AutoConfig

    with contextlib.suppress(ImportError):  # patching looks for PEFT layers when PEFT is installed
        import peft  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    import gatedlora.route_only  # noqa: F401

    config_class = type(AutoConfig.from_pretrained(model_dir))
    MODEL_MAPPING[config_class], MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    dev, dt = torch.device(device), getattr(torch, dtype)
    base = peak_resident_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    started = time.perf_counter()
    model = load(kind, Path(model_dir), Path(router_dir), dev, dt)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    load_s = time.perf_counter() - started
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=gen).to(dev)
    run_forward(kind, model, ids, torch.ones_like(ids))
    tensors = list(model.parameters()) + list(model.buffers())
    result = {"load_s": load_s, "weight_bytes": sum(t.numel() * t.element_size() for t in tensors)}
    if dev.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        result["peak_measure"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_bytes"] = peak_resident_bytes() - base
        result["peak_measure"] = "peak resident set above the peak after imports"
    return result


def peak_resident_bytes() -> int:
    """This process's peak resident set (Linux ``VmHWM``). Not ``ru_maxrss``: Linux carries that over
    ``exec`` from the parent (measured: a fresh child reported its parent's 877 MB before any import)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the CPU peak memory needs Linux")


def run_route_only_benchmark(spec: LlamaSpec, router_layer: int = 0, batch: int = 8, length: int = 128,
                             device: str = "cpu", dtype: torch.dtype = torch.float32, budget_s: float = 5.0,
                             directory: str | None = None) -> dict:
    """Everything in the module docstring; returns a JSON-ready dict."""
    from .report import environment

    dev = torch.device(device)
    meter = LoadMeter.start()
    dtype_name = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        model_dir, router_dir = prepare(spec, router_layer, Path(tmp), dev, dtype)
        memory = {}
        for kind in ("route-only", "full"):
            command = [sys.executable, "-m", "gatedlora.benchmarking.route_only", "--child", kind, "--model",
                       str(model_dir), "--router", str(router_dir), "--device", device, "--dtype", dtype_name,
                       "--batch", str(batch), "--length", str(length), "--vocab", str(spec.vocab_size)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"the {kind} memory child failed:\n{done.stderr[-3000:]}")
            memory[kind] = json.loads(done.stdout.strip().splitlines()[-1])

        models = {kind: load(kind, model_dir, router_dir, dev, dtype) for kind in ("route-only", "full")}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec.vocab_size, (batch, length), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    probabilities = {kind: run_forward(kind, m, ids, mask).clone() for kind, m in models.items()}
    bitwise = torch.equal(probabilities["route-only"], probabilities["full"])
    # against both prefills a server may run: the one timed (no KV cache) and generate()'s (filling one)
    agreement = {"full": compare_probabilities(probabilities["route-only"], probabilities["full"]),
                 "full with KV cache": compare_probabilities(
                     probabilities["route-only"], run_forward("full", models["full"], ids, mask, use_cache=True))}
    routed = int((probabilities["full"].float() >= 0.5).sum())
    timings = time_side_by_side({kind: (lambda k=kind, m=m: run_forward(k, m, ids, mask))
                                 for kind, m in models.items()}, dev, budget_s=budget_s)
    # a model far smaller than the imports' own peak shows no growth on the CPU: no ratio then
    ratio = {key: memory["route-only"][key] / memory["full"][key] if memory["full"][key] > 0 else None
             for key in ("weight_bytes", "peak_bytes")}
    return {
        "environment": environment(dev), "spec": asdict(spec), "router_layer": router_layer, "batch": batch,
        "length": length, "dtype": dtype_name, "probabilities_bitwise_equal": bitwise, "agreement": agreement,
        "routed_to_adapter": f"{routed}/{batch}", "memory": memory,
        "time_ms": {kind: {"median": t.median_s * 1e3, "q1": t.q1_s * 1e3, "q3": t.q3_s * 1e3, "runs": t.runs}
                    for kind, t in timings.items()},
        "machine_load_warnings": meter.warnings(),
        "route_only_over_full": {"time": timings["route-only"].median_s / timings["full"].median_s, **ratio,
                                 "blocks": (router_layer + 1) / spec.num_hidden_layers},
    }


def format_result(result: dict) -> str:
    """A few lines for the terminal and the README."""
    m, t, r = result["memory"], result["time_ms"], result["route_only_over_full"]
    lines = [f"{result['environment']['device']}, {result['dtype']}, Llama {result['spec']}, router_layer "
             f"{result['router_layer']}, batch {result['batch']} x {result['length']} tokens; route-only "
             f"probabilities bitwise the full model's: {result['probabilities_bitwise_equal']} "
             f"({result['routed_to_adapter']} routed to the adapter)",
             f"{'':12s} {'weights MiB':>12s} {'peak MiB':>10s} {'load s':>8s} {'forward ms (q1-q3)':>22s}"]
    for kind in ("route-only", "full"):
        lines.append(f"{kind:12s} {m[kind]['weight_bytes'] / 2**20:12.1f} {m[kind]['peak_bytes'] / 2**20:10.1f} "
                     f"{m[kind]['load_s']:8.2f} {t[kind]['median']:10.2f} ({t[kind]['q1']:.2f}-{t[kind]['q3']:.2f})")
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes']:.3f}"
    lines.append(f"route-only / full: weights {r['weight_bytes']:.3f}, peak memory {peak}, "
                 f"forward time {r['time']:.3f} (blocks {r['blocks']:.3f}); peak: {m['full']['peak_measure']}")
    for kind, found in result.get("agreement", {}).items():
        if not found["bitwise_equal"]:
            lines.append(f"against the {kind}: largest probability difference {found['max_difference']:.3g}, "
                         f"{found['decisions_differing']} decision(s) differ")
    lines += [f"warning: {w}; the times are inflated and noisy" for w in result["machine_load_warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=("route-only", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--router", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(args.child, args.model, args.router, args.device, args.dtype, args.batch,
                                      args.length, args.vocab)))
        return 0
    parser.error("run benchmarks/route_only.py (this module's command line is its memory child)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
