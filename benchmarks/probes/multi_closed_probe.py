"""GPU diagnostic probe: why gatedlora's sequences on the base model may differ from the base model's at decode with
several adapters (gpu_check's model stage, "decode b=8 t=512 4 adapters, 2/8 base"). Not part of the package.

    python benchmarks/probes/multi_closed_probe.py [--batch 8] [--tokens 512] [--small]

Builds the model stage's multi-adapter setup and one decode scenario, then prints, for the base sequences:
1. the captured (CUDA graph) steps as the stage compares them: each gatedlora backend against the base model, the
   backends against each other, and the base model against a second capture of itself;
2. the same steps eager (no graph);
3. eager, module by module (forward hooks): the first module whose output on the base sequences differs between
   the base model and each gatedlora model, and the largest difference there.
On a CPU (``--small`` implied) only 2 and 3 run, on the tiny model of ``gpu_check --dry-run``.
"""
from __future__ import annotations

import argparse
import re

import torch

from gatedlora.benchmarking.models import GPU_DEFAULT, LlamaSpec, build_llama
from gatedlora.benchmarking.multi_adapter import (MultiScenario, _logits, build_multi_setup, make_multi_batch,
                                                  multi_decode_providers)
from gatedlora.benchmarking.scenarios import decode_stepper


def report(label: str, outputs: dict, closed: torch.Tensor) -> None:
    base = outputs["base"][closed].float()
    for name, logits in outputs.items():
        if name == "base":
            continue
        part = logits[closed].float()
        per_row = (part - base).abs().flatten(1).amax(dim=1).tolist()
        print(f"{label}: {name} vs base on base sequences: bitwise {torch.equal(logits[closed], outputs['base'][closed])}"
              f", largest difference per sequence {per_row}")


def module_trace(model: torch.nn.Module, step, closed: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(module name from 'layers.' on, or the last part, its output on the base sequences) in call order."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or "lora_" in name or name.endswith("base_layer"):
            continue
        short = name[name.index("layers."):] if "layers." in name else name.split(".")[-1]

        def hook(mod, args, output, short=short):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and out.shape[0] == closed.shape[0]:
                seen.append((short, out[closed].detach().float().clone()))
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            step()
    finally:
        for h in handles:
            h.remove()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    spec = LlamaSpec(64, 128, 3, 4, 2, 256) if args.small or not cuda else GPU_DEFAULT
    tokens = args.tokens if cuda and not args.small else 16
    backends = ["triton", "torch"] if cuda else ["torch"]
    setup = build_multi_setup(build_llama(spec, dev, dtype), 0, backends, 4)
    scenario = MultiScenario("decode", args.batch, tokens, 4)
    ids, mask, routes = make_multi_batch(scenario, setup.vocab_size, dev)
    closed = (routes == 0).to(dev)
    print(f"device {dev}, {spec}, routes {routes.tolist()}, torch {torch.__version__}")
    keep = lambda name: name == "base" or name.startswith("gatedlora")  # noqa: E731
    if cuda:
        providers, notes = multi_decode_providers(setup, ids, mask, routes, graphs=True)
        with torch.inference_mode():
            outputs = {name: _logits(fn()) for name, fn in providers.items() if keep(name)}
            second = decode_stepper("base again", setup.base, ids, mask, setup.cache_argument, True, [])
            outputs["base captured again"] = _logits(second())
            outputs["base replayed again"] = _logits(providers["base"]())
        report("graph", outputs, closed)
        names = [n for n in outputs if n.startswith("gatedlora")]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                print(f"graph: {a} vs {b} on base sequences: bitwise {torch.equal(outputs[a][closed], outputs[b][closed])}")
        del providers
    providers, _ = multi_decode_providers(setup, ids, mask, routes, graphs=False)
    with torch.inference_mode():
        eager = {name: _logits(fn()) for name, fn in providers.items() if keep(name)}
    report("eager", eager, closed)
    if cuda:
        report("eager base vs graph", {"base": outputs["base"], "eager base": eager["base"],
                                       **{f"eager {n}": eager[n] for n in eager if n != "base"}}, closed)
    base_trace = module_trace(setup.base, providers["base"], closed)
    for backend, model in setup.gated.items():
        trace = module_trace(model, providers[f"gatedlora {backend}"], closed)
        base_by_name: dict[str, list] = {}
        for name, out in base_trace:
            base_by_name.setdefault(re.sub(r"^model\.", "", name), []).append(out)
        first = None
        compared = 0
        for name, out in trace:
            candidates = base_by_name.get(re.sub(r"^model\.", "", name))
            if not candidates:
                continue
            ref = candidates.pop(0)
            if ref.shape != out.shape:
                continue
            compared += 1
            if not torch.equal(ref, out):
                first = (name, (ref - out).abs().max().item())
                break
        print(f"eager modules, gatedlora {backend}: {compared} outputs compared, first differing on base sequences: "
              f"{first}")


if __name__ == "__main__":
    main()
