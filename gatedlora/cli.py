"""The ``gatedlora`` command. ``gatedlora bench``: base path against adapter path on a model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the base model against each adapter path (PEFT, PEFT mixed batch, "
                                     "PRISM two-pass, gatedlora per backend), side by side",
                       description="Model-level comparison of the base path and the adapter paths.")
    p.add_argument("--model", metavar="PATH", help="local causal LM directory (default: a built-in "
                   "Llama-architecture config sized for the device)")
    p.add_argument("--adapter", metavar="PATH", help="local PEFT LoRA adapter for --model (default: a fresh "
                   "PRISM-style adapter on the layers after --router-layer)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backends", help="comma-separated gatedlora backends to time (default: all available)")
    p.add_argument("--router-layer", type=int, default=0, help="router tap layer (default 0)")
    p.add_argument("--budget", type=float, default=1.0, metavar="SECONDS",
                   help="timing budget per scenario (default 1.0; at least 5 rounds each)")
    p.add_argument("--quick", action="store_true", help="a few small scenarios (a smoke run, seconds)")
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    if args.adapter and not args.model:
        parser.error("--adapter needs --model (an adapter belongs to the model it was trained on)")
    for flag in ("model", "adapter"):
        path = getattr(args, flag)
        if path and not Path(path).is_dir():
            parser.error(f"--{flag} {path}: no such directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.router_layer < 0:
        parser.error(f"--router-layer must be >= 0, got {args.router_layer}")
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is None:
            continue
        if not Path(path).parent.resolve().is_dir():
            parser.error(f"--{flag} {path}: the directory {Path(path).parent} does not exist")
        if Path(path).exists() and not args.overwrite:
            parser.error(f"--{flag} {path} exists; pass --overwrite to replace it")
    if args.plot and not args.plot.endswith(".png"):
        parser.error(f"--plot {args.plot}: expected a .png file name")
    if args.backends:
        from .ops.backends import PREFERENCE

        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in names if b not in PREFERENCE]
        if unknown or not names:
            parser.error(f"--backends {args.backends!r}: expected names from {PREFERENCE}")
        args.backends = names


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .benchmarking.report import format_table, plot, write_json
    from .benchmarking.runner import run_model_benchmark

    if args.no_progress:
        progress = lambda items, **kw: items  # noqa: E731
    else:
        from tqdm.auto import tqdm as progress
    result = run_model_benchmark(
        model_path=args.model, adapter_path=args.adapter, device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, quick=args.quick, backends=args.backends,
        router_layer=args.router_layer, budget_s=args.budget, progress=progress)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    failed = [s["name"] for s in result["scenarios"] if s["check"].startswith("FAILED")]
    if failed:
        print(f"error: gatedlora outputs did not match the base model / PEFT in {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatedlora", description="Gated LoRA kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        _check_bench_args(sub.choices["bench"], args)
        return _run_bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
