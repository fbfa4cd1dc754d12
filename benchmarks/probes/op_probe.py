"""Diagnostic probe (GPU): why the public ``gated_lora`` op timed slower than its own two-pass launch at prefill
sizes in gpu_check's layer stage (eager, L2 flushed), and by how much the multi-adapter model check passes.

    python benchmarks/probes/op_probe.py op      # public op (validate on/off) against the forced launches
    python benchmarks/probes/op_probe.py multi   # four adapters at model level: each provider's difference

``op``: K = N = 4096, r = 16, bf16 x, fp32 and bf16 LoRA weights, M = 512 and 4096, every gate closed and every
gate open. Each provider runs base layer + adapter as the layer stage's providers do; ``triton.testing.do_bench``
(L2 flushed, median), providers interleaved over three rounds; then a profile of a few calls of the public op
and of the forced two-pass launch, to show any extra kernels. ``--dry-run`` (CPU, TRITON_INTERPRET=1): the
plumbing on tiny shapes with a host clock.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def _median_us(fn, cuda: bool) -> float:
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def op_providers(m: int, k: int, n: int, lora_dtype, device, open_rows: bool) -> dict:
    import torch

    from gatedlora.ops import gated_lora
    from gatedlora.ops import triton_backend as tb
    from gatedlora.ops.args import make_args

    torch.manual_seed(0)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    a = (torch.randn(16, k, device=device) * k ** -0.5).to(lora_dtype)
    b = (torch.randn(n, 16, device=device) * 0.02).to(lora_dtype)
    gate = torch.full((m,), 1.0 if open_rows else 0.0, device=device)
    args = make_args(x, n, a, b, 2.0, gate, None, None, 0.5, True)
    tiles, split_k = tb.two_pass_launch(args)

    def base():
        return torch.nn.functional.linear(x, weight)

    return {
        "base": base,
        "public validate": lambda: gated_lora(x, base(), a, b, 2.0, gate=gate, backend="triton", inplace=True),
        "public no validate": lambda: gated_lora(x, base(), a, b, 2.0, gate=gate, backend="triton", inplace=True,
                                                 validate=False),
        "forced two-pass": lambda: tb.launch_two_pass(base(), args, tiles, split_k),
        "forced two-pass, args per call": lambda: tb.launch_two_pass(
            base(), make_args(x, n, a, b, 2.0, gate, None, None, 0.5, True), tiles, split_k),
    }


def probe_op(dry_run: bool) -> None:
    import torch

    cuda = not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    k = n = 4096 if cuda else 64
    rows = (512, 4096) if cuda else (8,)
    for lora_dtype in (torch.float32, torch.bfloat16):
        for m in rows:
            for open_rows in (False, True):
                providers = op_providers(m, k, n, lora_dtype, device, open_rows)
                with torch.inference_mode():
                    for fn in providers.values():
                        fn()
                    times = {name: [] for name in providers}
                    for _ in range(3):
                        for name, fn in providers.items():
                            times[name].append(_median_us(fn, cuda))
                cells = ", ".join(f"{name} {statistics.median(t):.1f}" for name, t in times.items())
                print(f"M={m} lora {str(lora_dtype)[6:]} {'open' if open_rows else 'closed'} (us): {cells}",
                      flush=True)
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        providers = op_providers(4096, k, n, torch.float32, device, False)
        for name in ("public validate", "forced two-pass"):
            fn = providers[name]
            with torch.inference_mode():
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
            print(f"--- profile, 5 calls of {name} (M=4096, fp32 LoRA, closed) ---")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def probe_multi(dry_run: bool) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import gpu_check
    from gatedlora.benchmarking.report import differences_text

    result = gpu_check.multi_adapter_model(150.0, dry_run)
    for scenario in result.get("scenarios", []):
        print(f"{scenario['name']}: check {scenario['check']}; {differences_text(scenario)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("op", "multi"))
    parser.add_argument("--dry-run", action="store_true")
    options = parser.parse_args()
    (probe_op if options.part == "op" else probe_multi)(options.dry_run)


if __name__ == "__main__":
    main()
