"""Everything only a GPU can show, in one prepared command (about 8 minutes on an H100).

    python tools/gpu_check.py --out DIR [--budget SECONDS] [--stages env,build,tests,sanitizer,layer,model]
    python tools/gpu_check.py --out DIR --dry-run      # on a CPU: every stage's plumbing on tiny shapes

Stages, each in its own process with its own time budget (a stage that fails or runs out of time
is reported and the next one runs):

* ``env``: device, versions, commit; the two ceilings the byte model needs, measured (a large
  device-to-device copy, a large bf16 matrix product).
* ``build``: the cuda extension, built for this device's architecture only (or loaded).
* ``tests``: ``pytest -m gpu tests``: the triton and cuda sweeps against the fp64 reference, closed rows
  bitwise, CUDA-graph capture and replay, no host sync under ``set_sync_debug_mode("error")``.
* ``sanitizer``: ``compute-sanitizer`` memcheck and racecheck over the cuda kernels (and memcheck over
  the Triton kernel) at small shapes; skipped, with the reason, where the tool is missing or refuses.
* ``layer``: each backend against the base layer and PEFT at the Llama-3-8B projection shapes
  (``gatedlora.benchmarking.layer_level``), timed with ``triton.testing.do_bench`` (L2 flushed) and,
  at decode sizes, ``do_bench_cudagraph`` over weights rotated past L2.
* ``model``: ``gatedlora bench``'s model-level comparison in bf16, decode replayed from CUDA graphs; then,
  with the last third of its budget, the same with four adapters and one router (``gatedlora bench
  --adapters 4``: PEFT's mixed batch, one PEFT forward per route group, PEFT with one adapter).
* ``route``: the route-only front end (``gatedlora route``) against the full model's prefill, bf16, on a
  Llama with Llama-3-8B block shapes and 8 blocks: peak memory, load and forward time, and whether its
  probabilities equal the full model's bitwise.

Writes ``DIR/<device>-<commit>.json`` (everything, with device, versions and commit), ``DIR/<same>.png``
(ratios to base with their spread) and ``DIR/gpu_check.log`` (each stage's output), and prints a summary.
Copy the JSON and PNG to ``benchmarks/results/`` and run ``python benchmarks/record_results.py
--table-only`` to regenerate the README's tables.

``--dry-run`` runs every stage on the CPU: the Triton kernel in the interpreter, tiny shapes, the decode
step compiled with ``torch.compile(fullgraph=True)`` instead of captured; the cuda stages say "no CUDA
device". CI runs it so that this script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shares of the total budget (default 470 s: 8 minutes less the start-up of the interpreter and the
# summary); time a stage leaves unused goes to the stages after it. Measured on an H100 (second run,
# benchmarks/results/gpu-notes.md): env 7 s, build 25-31 s (sm_90 only), tests 77-95 s, sanitizer 29 s,
# model 52 s for every scenario (one adapter and four), route 67 s; layer takes what it gets (its 90 s
# covered q_proj and part of two other shapes) and, like model, stops at its deadline. On a cold H200 at
# 091b776, env ran past its 13 s (the first CUDA start-up) and the tests' third selection past the stage's 104 s
# (the first two took 75 s); model used 47 s of 98 and route 50 of 133. On a cold H200 at e74cbd6 (--budget 430):
# build ran past its 35 s (36 s alone), the tests past 112 s (the -m gpu selection's 464 passed, the other two
# did not finish), memcheck took about 50 s and racecheck did not finish in the 30 s left; model used 47 s of
# 82, route 56 of 96, layer 83 of 100.
STAGES = {"env": 0.05, "build": 0.10, "tests": 0.30, "sanitizer": 0.13, "layer": 0.17, "model": 0.12, "route": 0.13}
DEFAULT_BUDGET_S = 470.0
STAGE_GRACE_S = 10.0


# --- the parent: run each stage in a child process, collect, report ---------------------------------------

def run_stage(name: str, budget_s: float, work: Path, dry_run: bool, log) -> dict:
    """Run ``--payload name`` in a child with a timeout; returns its JSON (partial on a timeout)."""
    result_path = work / f"{name}.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--payload", name, "--result", str(result_path),
               "--deadline", str(max(1.0, budget_s - STAGE_GRACE_S))]
    if dry_run:
        command.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before the child imports gatedlora
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timeout after {budget_s:.0f} s"
        output = _text(exc.stdout) + _text(exc.stderr)
    elapsed = time.perf_counter() - started
    log(f"===== stage {name}: {status} in {elapsed:.1f} s =====\n{output}\n")
    data = json.loads(result_path.read_text()) if result_path.exists() else {}
    if data.get("status") and (status == "ok" or str(data["status"]).startswith("failed")):
        # a stage may report "skipped: ..." with exit 0, and says why it failed better than its exit code
        # (at 091b776 on an H200: "failed (exit 1)" stood for "pytest ran past" its share of the budget)
        status = data["status"]
    data.update(stage=name, status=status, seconds=round(elapsed, 1), budget_s=round(budget_s, 1),
                output_tail=output[-3000:])
    return data


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the JSON, PNG and log (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: every stage's plumbing on tiny shapes")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}, in order; NAME:SECONDS fixes a stage's "
                             "budget, the others share what is left in proportion to their default shares")
    parser.add_argument("--payload", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.payload:
        return run_payload(args.payload, Path(args.result), args.deadline or 60.0, args.dry_run)
    if not args.out:
        parser.error("--out DIR is required")
    try:
        stages = parse_stages(args.stages)
    except ValueError as err:
        parser.error(f"--stages: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".stages"
    work.mkdir(exist_ok=True)
    log_path = out / "gpu_check.log"
    log_file = log_path.open("w")

    def log(text: str) -> None:
        log_file.write(text)
        log_file.flush()

    results = {}
    deadline = time.perf_counter() + args.budget
    for i, (name, _) in enumerate(stages):
        budget = stage_budget(stages[i:], deadline - time.perf_counter())
        print(f"[gpu_check] stage {name} (budget {budget:.0f} s) ...", flush=True)
        results[name] = run_stage(name, budget, work, args.dry_run, log)
        print(f"[gpu_check] stage {name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    log_file.close()
    shutil.rmtree(work, ignore_errors=True)

    env = results.get("env", {}).get("environment") or _environment_fallback()
    record = {"kind": "gpu_check", "dry_run": args.dry_run, "environment": env, "stages": results}
    stem = f"{_slug(env.get('device', 'unknown'))}-{env.get('commit') or 'nocommit'}"
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    png_path = out / f"{stem}.png"
    plot_problem = plot(record, png_path)
    print(summary(record))
    print(f"[gpu_check] wrote {json_path}" + ("" if plot_problem else f", {png_path}") + f", {log_path}")
    if plot_problem:
        print(f"[gpu_check] no plot: {plot_problem}")
    failed = [n for n, r in results.items() if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    return 1 if failed else 0


def parse_stages(text: str) -> list[tuple[str, float | None]]:
    """"tests:80,layer" -> [("tests", 80.0), ("layer", None)]; raises ValueError naming what is wrong."""
    stages = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, seconds = item.partition(":")
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; choose from {list(STAGES)}")
        try:
            fixed = float(seconds) if seconds else None
        except ValueError:
            raise ValueError(f"{item!r}: expected NAME or NAME:SECONDS") from None
        if fixed is not None and fixed <= 0:
            raise ValueError(f"{item!r}: seconds must be positive")
        stages.append((name, fixed))
    if not stages:
        raise ValueError("no stage named")
    return stages


def stage_budget(remaining: list[tuple[str, float | None]], seconds_left: float) -> float:
    """The first of ``remaining``'s budget: its fixed seconds, or its share of what the unfixed ones have
    left (so time a stage does not use goes to the stages after it)."""
    name, fixed = remaining[0]
    if fixed is not None:
        return max(1.0, min(fixed, seconds_left))
    free = seconds_left - sum(f for _, f in remaining[1:] if f is not None)
    shares = sum(STAGES[n] for n, f in remaining if f is None)
    return max(1.0, free * STAGES[name] / shares)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _environment_fallback() -> dict:
    import torch

    from gatedlora.benchmarking.report import environment

    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# --- stages (each runs in a child process: --payload NAME) ------------------------------------------------

def run_payload(name: str, result_path: Path, deadline_s: float, dry_run: bool) -> int:
    result: dict = {}

    def save() -> None:  # written as the stage goes, so a stage killed at its budget leaves what it had
        result_path.write_text(json.dumps(result, indent=1, default=str))

    stage = {"env": stage_env, "build": stage_build, "tests": stage_tests, "sanitizer": stage_sanitizer,
             "layer": stage_layer, "model": stage_model, "route": stage_route,
             "sanitizer-workload": sanitizer_workload}[name]
    stage(result, save, deadline_s, dry_run)
    save()
    return 0 if not str(result.get("status", "ok")).startswith("failed") else 1


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_env(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    from gatedlora.benchmarking.device_timing import time_call
    from gatedlora.benchmarking.report import environment

    device = _device()
    result["environment"] = environment(device)
    if device.type != "cuda":
        result["status"] = "ok"
        result["ceilings"] = "no CUDA device: nothing measured"
        return
    props = torch.cuda.get_device_properties(device)
    result["device"] = {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
                        "multiprocessors": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
                        "l2_mib": getattr(props, "L2_cache_size", 0) / 2**20,
                        "cuda": torch.version.cuda, "driver": _driver_version()}
    save()
    src = torch.randn(1 << 28, device=device, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, "eager")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = time_call(lambda: a @ b, device, "eager")
    result["ceilings"] = {"copy_tb_per_s": 2 * src.numel() * 2 / copy.median_s / 1e12,
                          "bf16_matmul_tflop_per_s": 2 * 8192**3 / mm.median_s / 1e12,
                          "note": "copy counts bytes read plus written; random data; L2 flushed between runs"}
    result["status"] = "ok"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def stage_build(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    device = _device()
    if device.type != "cuda":
        result["status"] = "skipped: no CUDA device"
        return
    from gatedlora.ops import cuda_backend, cuda_build

    major, minor = torch.cuda.get_device_capability(device)
    os.environ.setdefault(cuda_build.ARCHS_ENV, f"{major}{minor}")  # this device only: half the build time
    started = time.perf_counter()
    problem = cuda_backend.extension_problem(device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["archs"] = os.environ[cuda_build.ARCHS_ENV]
    result["status"] = "ok" if problem is None else f"failed: {problem}"


# The gpu-marked tests; then the Triton sweep and the autograd tests through the triton forward, which run the
# compiled kernels on CUDA tensors where a GPU exists and in the interpreter elsewhere (so they carry no gpu mark).
TEST_SELECTIONS = (["-m", "gpu", "tests"], ["tests/test_triton_backend.py"], ["tests/test_autograd.py", "-k", "triton"])


def stage_tests(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("GATEDLORA_CUDA_ARCHS", f"{major}{minor}")
    selections = TEST_SELECTIONS[:1] if dry_run else TEST_SELECTIONS  # the interpreter sweep runs in CI anyway
    started, code = time.perf_counter(), 0
    counts: dict = {}
    result["failures"] = []
    # On a GPU most of the time goes to compiling Triton variants, one after another: pytest-xdist spreads the
    # tests (and so the compiles) over the machine's cores; they share the one GPU.
    import importlib.util

    parallel = ["-n", str(min(8, os.cpu_count() or 1))] if (
        torch.cuda.is_available() and importlib.util.find_spec("xdist") is not None) else []
    result["parallel"] = parallel
    for selection in selections:
        junit = Path(os.environ.get("TMPDIR", "/tmp")) / f"gatedlora-gpu-tests-{os.getpid()}.xml"
        command = [sys.executable, "-m", "pytest", *selection, *parallel, "-q", "-rfEs", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]
        left = deadline_s - (time.perf_counter() - started)
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(left, 1))
            output, part_code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, part_code = _text(exc.stdout) + _text(exc.stderr), None
        print(f"--- pytest {' '.join(selection)} ---\n{output[-15000:]}")
        for key, value in _junit_counts(junit).items():
            counts[key] = counts.get(key, 0) + value
        result["failures"] += _junit_failures(junit)
        junit.unlink(missing_ok=True)
        code = None if part_code is None or code is None else max(code, 0 if part_code == 5 else part_code)
        result["counts"] = counts
        save()
    if code is None:
        result["status"] = f"failed: pytest ran past {deadline_s:.0f} s"
    elif counts.get("failures", 0) or counts.get("errors", 0):
        result["status"] = f"failed: {counts.get('failures', 0)} failures, {counts.get('errors', 0)} errors"
    elif code != 0:
        result["status"] = f"failed: pytest exit {code}"
    elif not torch.cuda.is_available():
        result["status"] = "ok"
        result["note"] = "no CUDA device: the gpu tests were collected and skipped"
    else:
        result["status"] = "ok"


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {
        "time_s": float(suite.get("time", 0))}


def _junit_failures(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                out.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                            "message": (node.get("message") or "")[:500], "detail": (node.text or "")[-1500:]})
    return out


def _find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "compute-sanitizer").is_file():
            return str(Path(root, "bin", "compute-sanitizer"))
    return None


def stage_sanitizer(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    if not torch.cuda.is_available():
        result["status"] = "skipped: no CUDA device"
        return
    tool = _find_sanitizer()
    if tool is None:
        result["status"] = "skipped: compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
        return
    started = time.perf_counter()
    runs = {}
    # memcheck over both backends; racecheck (shared-memory hazards) over the cuda kernels, the ones that use
    # shared memory explicitly. No caching allocator, so a read past a tensor is past an allocation.
    for tool_name, backends in (("memcheck", "cuda,triton"), ("racecheck", "cuda")):
        left = deadline_s - (time.perf_counter() - started)
        if left < 20:
            runs[tool_name] = {"status": "skipped: no time left"}
            continue
        command = [tool, "--tool", tool_name, "--error-exitcode", "99", "--print-limit", "20",
                   sys.executable, str(Path(__file__).resolve()), "--payload", "sanitizer-workload",
                   "--result", os.devnull]
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", GATEDLORA_SANITIZER_BACKENDS=backends)
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = _text(exc.stdout) + _text(exc.stderr), None
        print(f"--- {tool_name} ---\n{output[-6000:]}")
        summary_line = next((line for line in output.splitlines() if "ERROR SUMMARY" in line), "")
        if code is None:
            status = "failed: timed out"
        elif "Device not supported" in output or "Unable to find injection library" in output:
            status = "skipped: compute-sanitizer refused the device"
        elif code == 0:
            status = "ok"
        else:
            status = f"failed: exit {code}"
        accuracy = [line for line in output.splitlines() if line.startswith("accuracy outside the test rule")]
        runs[tool_name] = {"status": status, "summary": summary_line.strip(), "accuracy_notes": accuracy,
                           "output_tail": output[-2000:]}
        save()
    result["runs"] = runs
    statuses = [r["status"] for r in runs.values()]
    if any(s.startswith("failed") for s in statuses):
        result["status"] = "failed: " + "; ".join(f"{k} {v['status']}" for k, v in runs.items())
    elif all(s.startswith("skipped") for s in statuses):
        result["status"] = "skipped: " + "; ".join(f"{k} {v['status']}" for k, v in runs.items())
    else:
        result["status"] = "ok"


def sanitizer_workload(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    """Small, odd shapes through every gate mode and dtype pair, each call on fresh tensors (run under
    compute-sanitizer by ``stage_sanitizer``). A wrong result is also an error here."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import gatedlora
    from gate_cases import check_against_reference, make_case, op_kwargs
    from gatedlora.ops import gated_lora_fused

    backends = os.environ.get("GATEDLORA_SANITIZER_BACKENDS", "cuda").split(",")
    count = 0
    with torch.inference_mode():
        for backend in backends:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for mode in ("none", "given-hard", "given-soft", "token-hard", "token-soft"):
                    for m, k, n, r in ((1, 67, 33, 4), (5, 130, 97, 16), (19, 256, 40, 64)):
                        fraction = "all" if mode in ("none", "token-soft") else "75%"
                        case = make_case(count, m, k, n, r, dtype, mode, fraction, device="cuda",
                                         bias_tensor=count % 2 == 0, linear=backend == "cuda")
                        out = gatedlora.gated_lora(**op_kwargs(case), backend=backend)
                        torch.cuda.synchronize()
                        try:
                            check_against_reference(case, out)
                        except AssertionError as err:  # reported; this stage's verdict is the sanitizer's
                            print(f"accuracy outside the test rule: {backend} {dtype} {mode} M={m} K={k} N={n} "
                                  f"r={r}: (kernel err, torch err, 1 ulp) = {err}")
                        if backend == "cuda" and m <= 16:
                            gated_lora_fused(**{key: v for key, v in case.items() if key not in ("open", "base_out")})
                            torch.cuda.synchronize()
                        count += 1
    print(f"sanitizer workload: {count} cases, backends {backends}")


def _backends_for(device) -> list[str]:
    from gatedlora.benchmarking.runner import choose_backends

    backends, _ = choose_backends(device, None)
    return backends


def stage_layer(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    from gatedlora.benchmarking import layer_level

    device = _device()
    started = time.perf_counter()
    if device.type == "cuda":
        backends = _backends_for(device)
        kwargs = {}
    else:  # plumbing only: tiny shapes, the torch backend and the Triton interpreter, fp32
        backends = ["torch", "triton"]
        kwargs = dict(shapes={"tiny": (64, 96, None)}, rows=(1, 8), fractions=(0.0, 0.75), r=8, dtype=torch.float32,
                      rep_ms=5)
    result["backends"] = backends
    def keep(record: dict) -> None:  # saved case by case: a stage killed at its budget keeps what it timed
        result.setdefault("cases", []).append(record)
        result["auto_table"] = auto_table(result["cases"], device)
        save()

    result.update(layer_level.run_layer_benchmark(device, backends, budget_s=deadline_s - 5, log=print,
                                                  on_case=keep, **kwargs))
    result["auto_table"] = auto_table(result["cases"], device)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["status"] = "ok" if result["cases"] else "failed: no case ran"


def auto_table(cases: list[dict], device) -> dict:
    """Which exact-mode backend is fastest per dtype pair and M, over the shapes and open fractions measured:
    the measured input to ``auto``'s order (gatedlora/ops/preference.py ``MEASURED``). At decode sizes the
    backends compete on graph replays (what a served decode step runs), elsewhere on eager times; a backend
    with no time in that mode does not compete."""
    import torch

    samples: dict = {}
    for case in cases:
        key = (f"{case['dtype']}/{case['lora_dtype']}", case["m"])
        for name, entry in case["providers"].items():
            parts = name.split()
            if parts[0] != "gatedlora" or len(parts) != 2:  # exact mode per backend, not fused or forced paths
                continue
            for mode in ("graph", "eager"):
                ratio = entry.get(mode, {}).get("ratio_to_base")
                if ratio is not None:
                    samples.setdefault(key, {}).setdefault(mode, {}).setdefault(parts[1], []).append(ratio)
    arch = "cpu"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
    table: dict = {}
    for (dtypes, m), by_mode in sorted(samples.items()):
        mode = "graph" if by_mode.get("graph") else "eager"
        # geometric mean over shapes and open fractions: one slow outlier does not decide
        means = {backend: math.exp(sum(map(math.log, v)) / len(v)) for backend, v in by_mode[mode].items()}
        best = min(means, key=means.get)
        table.setdefault(dtypes, {})[str(m)] = {"best": best, "mode": mode, "mean_ratio_to_base": means}
    return {arch: table}


def stage_model(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    """One adapter (``gatedlora bench``'s scenarios), then several adapters (``multi_adapter``) with what is left."""
    import torch

    from gatedlora.benchmarking.runner import run_model_benchmark

    started = time.perf_counter()
    device = _device()
    if device.type == "cuda":
        from gatedlora.benchmarking.scenarios import default_scenarios

        # decode first: its CUDA-graph replays are what only a GPU shows; prefill as the deadline allows.
        # Two thirds of the stage; each run also builds its model (about 10 s).
        order = sorted(default_scenarios(False, device), key=lambda sc: sc.phase != "decode")
        result.update(run_model_benchmark(device="cuda", dtype=torch.bfloat16, budget_s=0.5, scenarios=order,
                                          deadline_s=deadline_s * 2 / 3 - 20))
    else:
        from gatedlora.benchmarking.models import LlamaSpec
        from gatedlora.benchmarking.scenarios import Scenario

        tiny = LlamaSpec(64, 128, 3, 4, 2, 256)
        scenarios = [Scenario("prefill", 2, 8, c) for c in (0, 1)] + [Scenario("decode", 2, 8, c) for c in (0, 2)]
        result.update(run_model_benchmark(device="cpu", dtype=torch.float32, budget_s=0.02, backends=["torch"],
                                          scenarios=scenarios, spec=tiny))
        save()
        result["decode_fullgraph"] = decode_fullgraph_check(tiny)
    save()
    result["multi_adapter"] = multi_adapter_model(deadline_s - (time.perf_counter() - started) - 20, dry_run)
    scenarios = result.get("scenarios", []) + result["multi_adapter"].get("scenarios", [])
    failed = [s["name"] for s in scenarios if str(s.get("check", "")).startswith("FAILED")]
    result["status"] = "ok" if not failed else f"failed: outputs differ in {failed}"


# --- several adapters, one router: the model stage's second part ---------------------------------------------

def multi_adapter_model(deadline_s: float, dry_run: bool) -> dict:
    """``gatedlora bench --adapters 4`` at model level: four adapters, each batch's sequences 25% on the base
    model and the rest spread over the adapters; gatedlora (triton; torch on a CPU) against PEFT's mixed batch,
    one PEFT forward per route group and, at decode, PEFT with one adapter on every sequence. GPU: bf16, the
    Llama-3-8B-shaped model of the model stage, decode replayed from CUDA graphs at batch 8 and 32 first, then
    prefill (512 tokens) at batch 8, within ``deadline_s``. Dry run (CPU): a tiny model, batch 4. Returns the
    run's JSON-ready result; its scenarios' ``check`` says whether the outputs matched."""
    import torch

    from gatedlora.benchmarking.multi_adapter import multi_scenarios
    from gatedlora.benchmarking.runner import run_model_benchmark

    if _device().type == "cuda":
        scenarios = [s for s in multi_scenarios(device=_device(), batches=(8, 32)) if s.phase == "decode"]
        scenarios += [s for s in multi_scenarios(device=_device(), batches=(8,)) if s.phase == "prefill"]
        return run_model_benchmark(device="cuda", dtype=torch.bfloat16, budget_s=0.5, scenarios=scenarios,
                                   adapters=4, deadline_s=deadline_s)
    from gatedlora.benchmarking.models import LlamaSpec

    return run_model_benchmark(device="cpu", dtype=torch.float32, budget_s=0.02, backends=["torch"],
                               scenarios=multi_scenarios(quick=True), spec=LlamaSpec(64, 128, 3, 4, 2, 256),
                               adapters=4, deadline_s=deadline_s)


def stage_route(result: dict, save, deadline_s: float, dry_run: bool) -> None:
    import torch

    from gatedlora.benchmarking.models import LlamaSpec
    from gatedlora.benchmarking.route_only import run_route_only_benchmark

    if _device().type == "cuda":  # Llama-3-8B blocks, 8 of them (2.0B parameters): saved and loaded in seconds
        spec = LlamaSpec(4096, 14336, 8, 32, 8, 32000)
        result.update(run_route_only_benchmark(spec, 0, batch=8, length=512, device="cuda", dtype=torch.bfloat16,
                                               budget_s=2.0))
    else:
        result.update(run_route_only_benchmark(LlamaSpec(64, 128, 3, 4, 2, 256), 0, batch=2, length=8,
                                               budget_s=0.05))
    result["status"] = ("ok" if result["probabilities_bitwise_equal"]
                        else "failed: the route-only probabilities differ from the full model's")


def decode_fullgraph_check(spec) -> dict:
    """CPU stand-ins for graph capture, per provider's decode step over a static cache: gatedlora's own host
    reads of tensor data (what makes a capture fail on a GPU; the triton backend runs in the interpreter,
    the torch backend finds open rows with ``nonzero`` by design), then ``torch.compile(fullgraph=True)``."""
    import torch

    from gatedlora.benchmarking.cuda_graphs import compile_decode_step, gatedlora_host_reads, prefill_static
    from gatedlora.benchmarking.models import add_prism_adapter, build_llama
    from gatedlora.benchmarking.scenarios import build_setup

    setup = build_setup(build_llama(spec, torch.device("cpu"), torch.float32), lambda m: add_prism_adapter(m, 0), 0,
                        ["torch", "triton"])
    for router in setup.routers.values():
        router.pattern = torch.tensor([1.0, 0.0])
    ids = torch.randint(3, spec.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out = {}
    for name, model in [("base", setup.base), ("peft", setup.peft)] + [
            (f"gatedlora {b}", m) for b, m in setup.gated.items()]:
        try:
            with torch.inference_mode():
                _, _, step = prefill_static(model, ids, mask, setup.cache_argument)
                reads = sorted(set(gatedlora_host_reads(lambda model=model, step=step: model(**step))))
                if name != "gatedlora triton":  # the interpreter cannot be compiled; its host reads are checked
                    compile_decode_step(model, ids, mask, setup.cache_argument)
            out[name] = "ok" if not reads else "host reads: " + ", ".join(reads)
        except Exception as exc:  # reported per provider
            out[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        torch._dynamo.reset()
    return out


# --- report --------------------------------------------------------------------------------------------------

def summary(record: dict) -> str:
    from gatedlora.benchmarking.report import differences_text

    lines = [f"gpu_check on {record['environment'].get('device')} (commit {record['environment'].get('commit')})"
             + (" [dry run]" if record["dry_run"] else "")]
    stages = record["stages"]
    for name, r in stages.items():
        lines.append(f"  {name:<10} {r['status']}  ({r['seconds']} s of {r['budget_s']})")
    env = stages.get("env", {})
    if isinstance(env.get("ceilings"), dict):
        c = env["ceilings"]
        lines.append(f"  ceilings: copy {c['copy_tb_per_s']:.2f} TB/s, bf16 matmul {c['bf16_matmul_tflop_per_s']:.0f} "
                     "TFLOP/s")
    tests = stages.get("tests", {})
    if tests.get("counts"):
        c = tests["counts"]
        lines.append(f"  tests: {c.get('tests', 0)} run, {c.get('failures', 0)} failed, {c.get('errors', 0)} errors, "
                     f"{c.get('skipped', 0)} skipped")
        for f in tests.get("failures", [])[:10]:
            lines.append(f"    FAIL {f['test']}: {f['message'][:150]}")
    layer = stages.get("layer", {})
    if layer.get("cases"):
        lines.append("  layer level, ratio to the base layer (graph replay at M<=64, eager with L2 flushed above):")
        for case in layer["cases"]:
            if not case["projection"].startswith(("q_proj", "tiny")) or case["open_fraction"] not in (0.0, 0.06, 1.0):
                continue
            parts = []
            for name, entry in case["providers"].items():
                mode = "graph" if "median_us" in entry.get("graph", {}) else "eager"
                ratio = entry.get(mode, {}).get("ratio_to_base")
                parts.append(f"{name.replace('gatedlora ', 'gl-')} {ratio:.2f}" if ratio else f"{name} -")
            lines.append(f"    {case['name']}: " + ", ".join(parts))
        if layer.get("incomplete"):
            lines.append(f"    (incomplete: {layer['incomplete']})")
        for arch, table in layer.get("auto_table", {}).items():
            for dtype, per_m in table.items():
                best = ", ".join(f"M={m}: {v['best']}" for m, v in per_m.items())
                lines.append(f"  fastest exact backend on {arch} {dtype}: {best}")
    model = stages.get("model", {})
    model_scenarios = model.get("scenarios", []) + model.get("multi_adapter", {}).get("scenarios", [])
    if model_scenarios:
        lines.append("  model level, ratio to the base model:")
        for s in model_scenarios:
            if "base" not in s["median_ms"]:
                lines.append(f"    {s['name']}: {s['check']}")
                continue
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in s["ratio_to_base"].items() if k != "base")
            lines.append(f"    {s['name']} (base {s['median_ms']['base']:.2f} ms, check {s['check']}): {ratios}")
            if s.get("differences"):
                lines.append(f"      {differences_text(s)}")
            for note in s.get("notes", []):
                lines.append(f"      note: {note}")
    if stages.get("route", {}).get("memory"):
        from gatedlora.benchmarking.route_only import format_result

        lines.append("  route-only front end against the full model's prefill:")
        lines += ["    " + line for line in format_result(stages["route"]).splitlines()]
    if model.get("decode_fullgraph"):
        lines.append("  decode step (gatedlora host reads; compiled with fullgraph=True): "
                     + "; ".join(f"{k}: {v}" for k, v in model["decode_fullgraph"].items()))
    return "\n".join(lines)


def plot(record: dict, path: Path) -> str | None:
    """Ratios to base with quartile error bars: layer level (q/o projection) and model level. None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    layer = record["stages"].get("layer", {}).get("cases", [])
    model_stage = record["stages"].get("model", {})
    model, multi = ([s for s in scenarios if "base" in s.get("median_ms", {})]
                    for scenarios in (model_stage.get("scenarios", []),
                                      model_stage.get("multi_adapter", {}).get("scenarios", [])))
    shown = [c for c in layer if c["projection"] in ("q_proj/o_proj", "tiny")]
    panels = [p for p in (("layer", shown), ("model", model), ("multi", multi)) if p[1]]
    if not panels:
        return "no timings to draw"
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 4.5 * len(panels)), squeeze=False)
    for ax, (kind, items) in zip(axes[:, 0], panels):
        if kind == "layer":
            _bars(ax, [c["name"].split(" r=")[0].replace("K=4096 N=4096 ", "") + f" open {c['open_rows']}/{c['m']}"
                       for c in items], [_layer_ratios(c) for c in items])
            ax.set_title("layer level, q_proj shape, LoRA weights as PEFT makes them: time / base layer "
                         "(graph replay at M<=64, eager with L2 flushed above)", fontsize=9)
        else:
            _bars(ax, [s["name"] for s in items], [_model_ratios(s) for s in items])
            ax.set_title(("model level" if kind == "model" else "model level, 4 adapters and one router")
                         + ": time / base model (decode replayed from CUDA graphs on a GPU)", fontsize=9)
    env = record["environment"]
    fig.suptitle(f"gpu_check: {env.get('device')} - commit {env.get('commit')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _layer_ratios(case: dict) -> dict:
    out = {}
    base = case["providers"].get("base", {})
    for name, entry in case["providers"].items():
        mode = "graph" if "median_us" in entry.get("graph", {}) else "eager"
        stats, b = entry.get(mode, {}), base.get(mode, {})
        if name != "base" and "median_us" in stats and "median_us" in b:
            out[name] = (stats["median_us"] / b["median_us"], stats["q1_us"] / b["median_us"],
                         stats["q3_us"] / b["median_us"])
    return out


def _model_ratios(scenario: dict) -> dict:
    base = scenario["median_ms"]["base"]
    return {name: (t / base, scenario["iqr_ms"][name][0] / base, scenario["iqr_ms"][name][1] / base)
            for name, t in scenario["median_ms"].items() if name != "base"}


def _bars(ax, labels: list[str], ratios: list[dict]) -> None:
    providers = []
    for r in ratios:
        providers += [p for p in r if p not in providers]
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(labels))]
        mid = [r.get(p, (float("nan"),) * 3)[0] for r in ratios]
        low = [max(0.0, m - r.get(p, (0, 0, 0))[1]) if p in r else 0 for m, r in zip(mid, ratios)]
        high = [max(0.0, r.get(p, (0, 0, 0))[2] - m) if p in r else 0 for m, r in zip(mid, ratios)]
        ax.bar(xs, mid, width, yerr=[low, high], capsize=1.5, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("time / base (lower is better)")
    ax.legend(fontsize=7, ncol=4)


if __name__ == "__main__":
    sys.exit(main())
