"""Compile every configuration of the gated-LoRA Triton kernels for sm_80 and sm_90, without a GPU.

    python tools/aot_check.py [--jobs N] [--quiet]

What is compiled: every (gate mode, x dtype, LoRA dtype, dot precision, tile config) the triton
backend can launch, in the layout of contiguous, 16-byte aligned tensors with K and N multiples
of 16 (the usual case; Triton then assumes 16-byte alignment and divisibility). The token-gate
mode, the one with the most work in its K loop, is compiled a second time in a generic layout
(misaligned pointers, odd row strides, odd K and N; inner strides are always 1 because the
launcher copies other layouts), the specialisation with the least information. The argument
lists come from ``triton_backend.launch_plan`` and pass through Triton's own specialisation
code, so what is compiled is what the launcher launches. The multi-adapter kernel
(``triton_multi.gated_lora_multi_add_kernel``, gate mode ``multi`` below) is compiled the same way, from
``triton_multi.launch_plan``, in both layouts.

For each compiled kernel it reads registers, stack and local memory from the cubin with the
``cuobjdump`` shipped inside the triton package, and shared memory from the kernel's metadata
(Triton's dynamic allocation) plus the cubin's static shared memory. It exits with status 1 on a
compile failure, a spill (STACK > 0 or LOCAL > 0) or shared memory over the target's limit.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# The kernel must be a compiled JITFunction, not the interpreter's stand-in.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default; set to silence its warning
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = (80, 90)
# Largest dynamic shared memory a block may opt into (CUDA C Programming Guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (x dtype, LoRA dtype, allow TF32): the pairs contract.dtype_pair_supported accepts, and
# TF32 on/off where the LoRA weights are fp32 (the only dtype for which the flag changes the dot).
DTYPE_VARIANTS = (
    ("float16", "float16", False),
    ("bfloat16", "bfloat16", False),
    ("float32", "float32", False),
    ("float32", "float32", True),
    ("float16", "float32", False),
    ("float16", "float32", True),
    ("bfloat16", "float32", False),
    ("bfloat16", "float32", True),
)
MODES = ("none", "given", "token", "multi")  # multi: the multi-adapter kernel (one launch for every adapter)
KERNELS = {"multi": "gated_lora_multi_add_kernel"}  # by mode, in gatedlora.ops.triton_multi; the others: triton_kernel


@dataclass
class Job:
    arch: int
    layout: str
    mode: str
    x_dtype: str
    lora_dtype: str
    precision: str
    tiles: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _tensor(shape, dtype, aligned: bool):
    """A CPU tensor of ``shape``: contiguous and aligned, or with odd row strides and a misaligned
    start (never read: only its pointer, strides and dtype matter). The inner stride stays 1, as
    the launcher copies any other layout before it launches."""
    import torch

    if aligned:
        return torch.empty(shape, dtype=dtype)
    strides, span = [], 1
    for size in reversed(shape):
        strides.insert(0, span if not strides else span + 1)
        span = size * strides[0]
    flat = torch.empty(span + 8, dtype=dtype)
    return flat.as_strided(shape, strides, storage_offset=1)


def kernel_of(mode: str):
    """The JIT function that gate mode ``mode`` compiles."""
    from gatedlora.ops import triton_kernel, triton_multi

    return getattr(triton_multi, KERNELS[mode]) if mode in KERNELS else triton_kernel.gated_lora_add_kernel


def _multi_plan(x, n, lora_a, lora_b, out, tiles):
    """``triton_multi.launch_plan`` for two adapters (ranks BLOCK_R and BLOCK_R / 2) and a per-row index."""
    import torch

    from gatedlora.ops import triton_multi
    from gatedlora.ops.multi_args import make_multi_args

    half = lora_a[: max(1, lora_a.shape[0] // 2)]
    index = torch.zeros(x.shape[0], dtype=torch.int64)
    args = make_multi_args(x, n, [lora_a, half], [lora_b, lora_b[:, :half.shape[0]]], (2.0, 1.5), index)
    return triton_multi.launch_plan(out, args, tiles=tiles, n_split=1)


def build_jobs() -> list[Job]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from gatedlora.ops import triton_backend as tb
    from gatedlora.ops import triton_multi
    from gatedlora.ops.args import make_args

    jobs = []
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in ARCHS:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            binders = {mode: (kernel_of(mode), create_function_from_signature(kernel_of(mode).signature,
                                                                              kernel_of(mode).params, backend))
                       for mode in MODES}
            for layout in ("aligned", "generic"):
                aligned = layout == "aligned"
                m, k, n = (64, 4096, 4096) if aligned else (63, 4095, 4093)
                for mode in MODES if aligned else ("token", "multi"):
                    kernel, binder = binders[mode]
                    for x_name, lora_name, tf32 in DTYPE_VARIANTS:
                        x_dtype, lora_dtype = getattr(torch, x_name), getattr(torch, lora_name)
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        table = triton_multi.multi_tiles() if mode == "multi" else tb.TILE_CONFIGS
                        for key, tiles in sorted(table.items()):
                            if key[2] != lora_dtype.itemsize:
                                continue
                            r = tiles.block_r
                            x, a, b = (_tensor((m, k), x_dtype, aligned), _tensor((r, k), lora_dtype, aligned),
                                       _tensor((n, r), lora_dtype, aligned))
                            out = _tensor((m, n), x_dtype, aligned)
                            if mode == "multi":
                                _, positional, keywords = _multi_plan(x, n, a, b, out, tiles)
                            else:
                                args = make_args(
                                    x=x, n=n, lora_a=a, lora_b=b, scaling=2.0,
                                    gate=_tensor((m,), torch.float32, aligned) if mode == "given" else None,
                                    gate_weight=_tensor((k,), torch.float32, aligned) if mode == "token" else None,
                                    gate_bias=_tensor((), torch.float32, aligned) if mode == "token" else None,
                                    threshold=0.5, hard=True)
                                _, positional, keywords = tb.launch_plan(out, args, tiles=tiles, n_split=1)
                            bound, specialization, options = binder(*positional, **keywords)
                            options, signature, constexprs, attrs = kernel._pack_args(
                                backend, keywords, bound, specialization, options)
                            jobs.append(Job(arch, layout, mode, x_name, lora_name, keywords["DOT_PRECISION"], tiles,
                                            signature, constexprs, attrs, options.__dict__))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return jobs


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_job(job: Job) -> dict:
    """Compile one variant; returns its resources or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(job=job)
    try:
        source = ASTSource(fn=kernel_of(job.mode), signature=job.signature, constexprs=job.constexprs,
                           attrs=job.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # any compiler error is a failed check, reported per configuration
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return result
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=False).stdout
    match = _RESOURCE.search(dump)
    if match is None:
        result["error"] = f"cuobjdump printed no resource line: {dump.strip()[:200]}"
        return result
    regs, stack, static_shared, local = map(int, match.groups())
    result.update(regs=regs, stack=stack, local=local, shared=static_shared + compiled.metadata.shared)
    return result


def problems(row: dict) -> list[str]:
    if "error" in row:
        return [f"compile failed: {row['error']}"]
    found = []
    if row["stack"] > 0 or row["local"] > 0:
        found.append(f"spills (STACK {row['stack']}, LOCAL {row['local']})")
    limit = SHARED_LIMIT[row["job"].arch]
    if row["shared"] > limit:
        found.append(f"shared memory {row['shared']} B > {limit} B")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--quiet", action="store_true", help="print only the summary and failures")
    parser.add_argument("--arch", type=int, choices=ARCHS, help="only this target (default: all)")
    parser.add_argument("--mode", choices=MODES, help="only this gate mode (default: all)")
    parser.add_argument("--layout", choices=("aligned", "generic"), help="only this layout (default: both)")
    options = parser.parse_args()

    start = time.time()
    with tempfile.TemporaryDirectory() as cache:
        # A private cache: every run compiles from scratch, so a stale cached binary cannot pass.
        os.environ["TRITON_CACHE_DIR"] = os.environ.get("GATEDLORA_AOT_CACHE_DIR", cache)
        jobs = [job for job in build_jobs()
                if options.arch in (None, job.arch) and options.mode in (None, job.mode)
                and options.layout in (None, job.layout)]
        import multiprocessing

        with ProcessPoolExecutor(max_workers=options.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, jobs, chunksize=4))

    header = (f"{'sm':>3} {'layout':<8} {'gate':<6} {'x':<9} {'lora':<9} {'dot':<5} "
              f"{'BM':>3} {'BN':>3} {'BK':>4} {'BR':>4} {'wp':>3} {'st':>3} {'REG':>4} {'STACK':>5} {'LOCAL':>5} "
              f"{'SHARED':>7}  status")
    failures = 0
    lines = [header]
    for row in rows:
        job, t = row["job"], row["job"].tiles
        found = problems(row)
        failures += bool(found)
        resources = ("   -     -     -       -" if "error" in row else
                     f"{row['regs']:>4} {row['stack']:>5} {row['local']:>5} {row['shared']:>7}")
        line = (f"{job.arch:>3} {job.layout:<8} {job.mode:<6} {job.x_dtype:<9} {job.lora_dtype:<9} "
                f"{job.precision:<5} {t.block_m:>3} {t.block_n:>3} {t.block_k:>4} {t.block_r:>4} "
                f"{t.num_warps:>3} {t.num_stages:>3} {resources}  {'; '.join(found) or 'ok'}")
        if found or not options.quiet:
            lines.append(line)
    print("\n".join(lines))

    # Per tile config and arch: the worst case over gate modes, dtypes and layouts.
    print("\nsummary: worst case per (sm, tile config) over gate modes, dtypes and layouts")
    print(f"{'sm':>3} {'BM':>3} {'BN':>3} {'BK':>4} {'BR':>4} {'elt':>3} {'wp':>3} {'st':>3} {'variants':>8} "
          f"{'REG max':>7} {'spills':>6} {'SHARED max':>10} {'limit':>7}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        job = row["job"]
        elt = 4 if job.lora_dtype == "float32" else 2
        groups.setdefault((job.arch, job.tiles, elt), []).append(row)
    for (arch, t, elt), group in sorted(groups.items(), key=lambda item: (item[0][0], item[0][2], item[0][1].block_m,
                                                                          item[0][1].block_r)):
        ok = [r for r in group if "error" not in r]
        spills = sum(r["stack"] + r["local"] for r in ok)
        print(f"{arch:>3} {t.block_m:>3} {t.block_n:>3} {t.block_k:>4} {t.block_r:>4} {elt:>3} {t.num_warps:>3} "
              f"{t.num_stages:>3} {len(group):>8} {max((r['regs'] for r in ok), default=0):>7} {spills:>6} "
              f"{max((r['shared'] for r in ok), default=0):>10} {SHARED_LIMIT[arch]:>7}"
              + (f"  {len(group) - len(ok)} failed to compile" if len(ok) < len(group) else ""))
    print(f"\n{len(rows)} kernels compiled for sm_{' sm_'.join(map(str, ARCHS))} in {time.time() - start:.0f} s; "
          f"{failures} failed the check")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
