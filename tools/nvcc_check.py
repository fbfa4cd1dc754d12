"""Compile csrc/ with nvcc for sm_80 and sm_90, report each kernel's resources, load the module: no GPU needed.

    python tools/nvcc_check.py [--arch 80 --arch 90] [--keep DIR]

1. Builds the pybind11 module from scratch in a private folder with the commands of the
   on-first-use build (``gatedlora.ops.cuda_build.build_module``) plus ``-Xptxas -v``, so what is
   checked is what users get. ptxas prints, per kernel and target, the registers, the stack
   frame, spill stores and loads, and static shared memory; the table lists them. Exit status 1
   on a compile error, a spill (spill stores or loads > 0) or static shared memory over 48 KiB.
2. Imports the module in a fresh Python process. On a machine without a GPU it then calls both
   launchers and requires the clear "gatedlora cuda: no CUDA device" error (the launchers check the
   device before touching any pointer). With a GPU that step is skipped (the test suite runs there).

The sibling tools/aot_check.py does the same for the Triton kernels.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = (80, 90)
STATIC_SHARED_LIMIT = 48 * 1024  # static __shared__ per block without an opt-in

_ENTRY = re.compile(r"ptxas info\s+: Compiling entry function '(\S+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (template arguments kept, namespaces dropped)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return {name: name for name in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=False).stdout.split("\n")
    pretty = {}
    for name, line in zip(names, out):
        line = re.sub(r"gatedlora::\(anonymous namespace\)::", "", line.strip())
        line = line.replace("__nv_bfloat16", "bf16").replace("__half", "f16").replace("float", "f32")
        pretty[name] = re.sub(r"^void |\((Adapter|Fused)Args\)$", "", line)
    return pretty


def parse_ptxas(text: str) -> list[dict]:
    """One row per (kernel, target): registers, stack, spill stores/loads, static shared memory."""
    rows = []
    parts = _ENTRY.split(text)
    for i in range(1, len(parts), 3):
        name, target, body = parts[i], parts[i + 1], parts[i + 2]
        props, used = _PROPS.search(body), _USED.search(body)
        if props is None or used is None:
            rows.append(dict(name=name, arch=target, error="ptxas printed no resource line"))
            continue
        stack, spill_st, spill_ld = map(int, props.groups())
        rows.append(dict(name=name, arch=target, regs=int(used.group(1)), stack=stack, spill_stores=spill_st,
                         spill_loads=spill_ld, smem=int(used.group(2) or 0)))
    return rows


def problems(row: dict) -> list[str]:
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills ({row['spill_stores']} B stored, {row['spill_loads']} B loaded)")
    if row["smem"] > STATIC_SHARED_LIMIT:
        found.append(f"static shared memory {row['smem']} B > {STATIC_SHARED_LIMIT} B")
    return found


IMPORT_CHECK = r"""
import json, sys
from gatedlora.ops import cuda_build
ext = cuda_build.load_module_from(sys.argv[1])
report = dict(source_hash=ext.SOURCE_HASH, expected_hash=cuda_build.source_hash(), archs=ext.CUDA_ARCHS,
              device_problem=ext.device_problem(0), errors={})
if report["device_problem"]:
    for name, kwargs in cuda_build.null_launch_arguments().items():
        try:
            getattr(ext, name)(**kwargs)
            report["errors"][name] = None
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--keep", type=Path, help="build here and keep the folder (default: a temporary one)")
    options = parser.parse_args()
    archs = sorted(set(options.arch or ARCHS))

    from gatedlora.ops import cuda_build

    if cuda_build.find_nvcc() is None:
        print("nvcc not found: install the CUDA toolkit (or put nvcc on PATH) to run this check")
        return 1
    start = time.time()
    workdir = options.keep or Path(tempfile.mkdtemp(prefix="gatedlora-nvcc-check-"))
    failures = 0
    try:
        try:
            module, transcript = cuda_build.build_module(workdir, archs, extra_nvcc=("-Xptxas", "-v"))
        except cuda_build.CudaExtensionUnavailable as exc:
            print(f"FAILED: {exc}")
            log = workdir / "build.log"
            if log.is_file():
                print(log.read_text()[-4000:])
            return 1
        built = time.time() - start
        rows = parse_ptxas(transcript)
        names = demangle(sorted({row["name"] for row in rows}))
        print(f"{'sm':<6} {'kernel':<46} {'REG':>4} {'STACK':>5} {'SPILL_ST':>8} {'SPILL_LD':>8} {'SMEM':>6}  status")
        for row in sorted(rows, key=lambda r: (r["arch"], names[r["name"]])):
            found = problems(row)
            failures += bool(found)
            if "error" in row:
                print(f"{row['arch']:<6} {names[row['name']]:<46}    -     -        -        -      -  {found[0]}")
                continue
            print(f"{row['arch']:<6} {names[row['name']]:<46} {row['regs']:>4} {row['stack']:>5} "
                  f"{row['spill_stores']:>8} {row['spill_loads']:>8} {row['smem']:>6}  {'; '.join(found) or 'ok'}")
        expected = 2 * len(archs) * 15  # (adapter: 3 row blocks + GEMV: 3 row buckets) x 5 dtype pairs, per target
        if len(rows) != expected:
            print(f"FAILED: ptxas reported {len(rows)} kernels, expected {expected}")
            failures += 1
        for arch in archs:
            mine = [r for r in rows if r["arch"] == f"sm_{arch}" and "error" not in r]
            print(f"sm_{arch}: {len(mine)} kernels, registers {min(r['regs'] for r in mine)}-"
                  f"{max(r['regs'] for r in mine)}, "
                  f"spills {sum(r['spill_stores'] + r['spill_loads'] for r in mine)} B, "
                  f"static shared <= {max(r['smem'] for r in mine)} B")

        proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(module)], capture_output=True, text=True,
                              cwd=ROOT, check=False)
        if proc.returncode != 0:
            print(f"FAILED: importing {module.name} in a fresh process:\n{proc.stderr[-3000:]}")
            return 1
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\nimported {module.name} ({module.stat().st_size // 1024} KiB) in a fresh process: "
              f"archs {report['archs']}, source hash {report['source_hash']}")
        if report["source_hash"] != report["expected_hash"]:
            print(f"FAILED: the module's source hash {report['source_hash']} != {report['expected_hash']}")
            failures += 1
        if report["device_problem"]:
            for name, error in report["errors"].items():
                ok = error is not None and error.startswith("RuntimeError: gatedlora cuda: no CUDA device")
                failures += not ok
                verdict = "ok" if ok else "FAILED: expected the no CUDA device error"
                print(f"{name} without a GPU: {error!r} ({verdict})")
        else:
            print("a CUDA device is present: the no-device error check is skipped (run the gpu tests instead)")
    finally:
        if options.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nbuilt in {built:.0f} s, checked in {time.time() - start:.0f} s; {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
