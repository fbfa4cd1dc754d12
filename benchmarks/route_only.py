"""The route-only front end (``gatedlora route``) against the full model's prefill: memory, load time and
forward time, side by side (see gatedlora/benchmarking/route_only.py).

    python benchmarks/route_only.py [--layers 16] [--router-layer 0] [--batch 8] [--length 128] [--json FILE]

The default model is a Llama of 16 blocks, hidden 512, MLP 1408, vocabulary 32000 (80M parameters),
so that one CPU run takes about a minute and a half on 2 cores; on a GPU pass ``--device cuda --dtype bfloat16``
and a bigger shape. Route-only work is ``router_layer + 1`` of the model's blocks plus the embeddings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatedlora.benchmarking.models import LlamaSpec  # noqa: E402
from gatedlora.benchmarking.route_only import format_result, run_route_only_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--router-layer", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timing (at least 5 rounds)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    spec = LlamaSpec(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
    result = run_route_only_benchmark(spec, args.router_layer, args.batch, args.length, args.device,
                                      getattr(torch, args.dtype), args.budget)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["probabilities_bitwise_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
