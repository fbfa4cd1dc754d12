"""Compile every configuration of the gated-LoRA Triton kernels for sm_80 and sm_90, without a GPU.

    python tools/aot_check.py [--jobs N] [--quiet]

What is compiled: every (kernel, gate mode, x dtype, LoRA dtype, dot precision, tile config) the triton
backend can launch (the one-pass kernel, the two-pass path's shrink and expand kernels, and the
multi-adapter kernel, gate mode ``multi`` below), in the
layout of contiguous, 16-byte aligned tensors with K and N multiples
of 16 (the usual case; Triton then assumes 16-byte alignment and divisibility). The token-gate
mode, the one with the most work in its K loop, and the multi-adapter kernel are compiled a second time in a
generic layout
(misaligned pointers, odd row strides, odd K and N; inner strides are always 1 because the
launcher copies other layouts), the specialisation with the least information. The argument
lists come from ``triton_backend.launch_plan`` and ``two_pass_plan`` (``triton_multi.launch_plan``) and pass
through Triton's own
specialisation code, so what is compiled is what the launcher launches.

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
MODES = ("none", "given", "token", "multi")  # multi: the multi-adapter kernel (every adapter in one launch)


@dataclass
class Job:
    arch: int
    layout: str
    mode: str
    x_dtype: str
    lora_dtype: str
    precision: str
    kernel: str  # "one-pass", "shrink" or "expand"
    tiles: str  # the tile sizes, as the table prints them
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


KERNELS = {"one-pass": ("triton_kernel", "gated_lora_add_kernel"), "shrink": ("triton_two_pass", "shrink_kernel"),
           "expand": ("triton_two_pass", "expand_kernel"), "multi": ("triton_multi", "gated_lora_multi_add_kernel")}


def kernel_function(name: str):
    import importlib

    module, attribute = KERNELS[name]
    return getattr(importlib.import_module(f"gatedlora.ops.{module}"), attribute)


def _one_pass_label(t) -> str:
    return f"BM{t.block_m} BN{t.block_n} BK{t.block_k} BR{t.block_r} w{t.num_warps} s{t.num_stages}"


def _launches(tb, out, args):
    """(kernel name, tiles label, positional, keywords) for every tile config of both paths that fits ``args``'s
    LoRA element size and rank (``args.r`` is the largest rank of a BLOCK_R)."""
    elt = args.lora_a.element_size()
    for key, tiles in sorted(tb.TILE_CONFIGS.items()):
        if key[1] == elt and tiles.block_r == args.r:
            _, positional, keywords = tb.launch_plan(out, args, tiles=tiles, n_split=1)
            yield "one-pass", _one_pass_label(tiles), positional, keywords
    for tiles in sorted({tb.two_pass_tiles(m_key, args.r, elt) for m_key in (1, 64)}, key=str):
        for (_, _, positional, keywords), name in zip(tb.two_pass_plan(out, args, tiles, split_k=4),
                                                            ("shrink", "expand")):
            label = (f"BM{tiles.shrink_m} BK{tiles.block_k} BR{tiles.block_r} w{tiles.shrink_warps} "
                     f"s{tiles.shrink_stages}" if name == "shrink" else
                     f"BM{tiles.expand_m} BN{tiles.block_n} BR{tiles.block_r} w{tiles.expand_warps}")
            yield name, label, positional, keywords


def _multi_launches(out, x, lora_a, lora_b):
    """The multi-adapter kernel's launch (as ``_launches`` yields it) for two adapters of ranks r and r / 2 and
    a per-row index, where the kernel has a tile for rank r and this LoRA element size."""
    import torch

    from gatedlora.ops import triton_multi
    from gatedlora.ops.multi_args import make_multi_args

    tiles = triton_multi.multi_tiles().get((lora_a.shape[0], lora_a.element_size()))
    if tiles is None:
        return
    half = lora_a[: lora_a.shape[0] // 2]
    index = torch.zeros(x.shape[0], dtype=torch.int64)
    args = make_multi_args(x, out.shape[1], [lora_a, half], [lora_b, lora_b[:, :half.shape[0]]], (2.0, 1.5), index)
    _, positional, keywords = triton_multi.launch_plan(out, args, tiles=tiles, n_split=1)
    yield "multi", _one_pass_label(tiles), positional, keywords


def build_jobs() -> list[Job]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from gatedlora.ops import triton_backend as tb
    from gatedlora.ops.args import make_args

    jobs = []
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for arch in ARCHS:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            binders = {name: create_function_from_signature(kernel_function(name).signature,
                                                            kernel_function(name).params, backend)
                       for name in KERNELS}
            for layout in ("aligned", "generic"):
                aligned = layout == "aligned"
                m, k, n = (64, 4096, 4096) if aligned else (63, 4095, 4093)
                for mode in MODES if aligned else ("token", "multi"):
                    for x_name, lora_name, tf32 in DTYPE_VARIANTS:
                        x_dtype, lora_dtype = getattr(torch, x_name), getattr(torch, lora_name)
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        for r in sorted({t.block_r for t in tb.TILE_CONFIGS.values()}):
                            x = _tensor((m, k), x_dtype, aligned)
                            lora_a, lora_b = _tensor((r, k), lora_dtype, aligned), _tensor((n, r), lora_dtype, aligned)
                            out = _tensor((m, n), x_dtype, aligned)
                            if mode == "multi":
                                launches = _multi_launches(out, x, lora_a, lora_b)
                            else:
                                args = make_args(
                                    x=x, n=n, lora_a=lora_a, lora_b=lora_b, scaling=2.0,
                                    gate=_tensor((m,), torch.float32, aligned) if mode == "given" else None,
                                    gate_weight=_tensor((k,), torch.float32, aligned) if mode == "token" else None,
                                    gate_bias=_tensor((), torch.float32, aligned) if mode == "token" else None,
                                    threshold=0.5, hard=True)
                                launches = _launches(tb, out, args)
                            for name, label, positional, keywords in launches:
                                bound, specialization, options = binders[name](*positional, **keywords)
                                options, signature, constexprs, attrs = kernel_function(name)._pack_args(
                                    backend, keywords, bound, specialization, options)
                                jobs.append(Job(arch, layout, mode, x_name, lora_name, keywords["DOT_PRECISION"],
                                                name, label, signature, constexprs, attrs, options.__dict__))
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
        source = ASTSource(fn=kernel_function(job.kernel), signature=job.signature,
                           constexprs=job.constexprs, attrs=job.attrs)
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
    parser.add_argument("--kernel", choices=tuple(KERNELS), help="only this kernel (default: all)")
    options = parser.parse_args()

    start = time.time()
    with tempfile.TemporaryDirectory() as cache:
        # A private cache: every run compiles from scratch, so a stale cached binary cannot pass.
        os.environ["TRITON_CACHE_DIR"] = os.environ.get("GATEDLORA_AOT_CACHE_DIR", cache)
        jobs = [job for job in build_jobs()
                if options.arch in (None, job.arch) and options.mode in (None, job.mode)
                and options.layout in (None, job.layout) and options.kernel in (None, job.kernel)]
        import multiprocessing

        with ProcessPoolExecutor(max_workers=options.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, jobs, chunksize=4))

    header = (f"{'sm':>3} {'layout':<8} {'gate':<6} {'x':<9} {'lora':<9} {'dot':<6} {'kernel':<8} {'tiles':<28} "
              f"{'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SHARED':>7}  status")
    failures = 0
    lines = [header]
    for row in rows:
        job = row["job"]
        found = problems(row)
        failures += bool(found)
        resources = ("   -     -     -       -" if "error" in row else
                     f"{row['regs']:>4} {row['stack']:>5} {row['local']:>5} {row['shared']:>7}")
        line = (f"{job.arch:>3} {job.layout:<8} {job.mode:<6} {job.x_dtype:<9} {job.lora_dtype:<9} "
                f"{job.precision:<6} {job.kernel:<8} {job.tiles:<28} {resources}  {'; '.join(found) or 'ok'}")
        if found or not options.quiet:
            lines.append(line)
    print("\n".join(lines))

    # Per kernel, tile config and arch: the worst case over gate modes, dtypes and layouts.
    print("\nsummary: worst case per (sm, kernel, tile config, LoRA element size) over gate modes, dtypes and layouts")
    print(f"{'sm':>3} {'kernel':<8} {'tiles':<28} {'elt':>3} {'variants':>8} {'REG max':>7} {'spills':>6} "
          f"{'SHARED max':>10} {'limit':>7}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        job = row["job"]
        elt = 4 if job.lora_dtype == "float32" else 2
        groups.setdefault((job.arch, job.kernel, job.tiles, elt), []).append(row)
    for (arch, kernel, tiles, elt), group in sorted(groups.items()):
        ok = [r for r in group if "error" not in r]
        spills = sum(r["stack"] + r["local"] for r in ok)
        regs, shared = max((r["regs"] for r in ok), default=0), max((r["shared"] for r in ok), default=0)
        print(f"{arch:>3} {kernel:<8} {tiles:<28} {elt:>3} {len(group):>8} {regs:>7} {spills:>6} {shared:>10} "
              f"{SHARED_LIMIT[arch]:>7}"
              + (f"  {len(group) - len(ok)} failed to compile" if len(ok) < len(group) else ""))
    print(f"\n{len(rows)} kernels compiled for sm_{' sm_'.join(map(str, ARCHS))} in {time.time() - start:.0f} s; "
          f"{failures} failed the check")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
