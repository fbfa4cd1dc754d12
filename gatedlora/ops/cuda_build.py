"""Build and load the CUDA extension of csrc/ (``_cuda_kernels``): prebuilt, or built on first use.

Order: a module built by ``setup.py`` (``GATEDLORA_BUILD_CUDA=1 pip install .``) when it is importable
and was built from the same sources; otherwise a build with ``nvcc`` into a cache directory
(``$GATEDLORA_CACHE`` or ``~/.cache/gatedlora``), one folder per key of source hash, target
architectures (``GATEDLORA_CUDA_ARCHS``, default ``80;90``), nvcc version, Python version and
pybind11 version. ninja runs the build when it is installed (``pip install ninja``); otherwise the
same three commands run one after the other. Nothing needs torch headers: the kernels see the CUDA
runtime only (linked statically), the bindings pybind11 and Python.

Nothing here runs at ``import gatedlora``: ``load_extension`` is called by the cuda backend when it
first sees CUDA tensors, or by a caller that asks for it. A missing toolkit or a failed build is
reported once (a one-line warning) and kept as the backend's reason; it never raises at import.

This module imports no torch and nothing from gatedlora, so that ``setup.py`` can load it by path.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

MODULE_NAME = "_cuda_kernels"
PREBUILT = "gatedlora._cuda_kernels"
SOURCE_FILES = ("gated_lora.h", "gated_lora_kernels.cu", "bindings.cpp")
DEFAULT_ARCHS = "80;90"
ARCHS_ENV = "GATEDLORA_CUDA_ARCHS"
CACHE_ENV = "GATEDLORA_CACHE"
logger = logging.getLogger("gatedlora")


class CudaExtensionUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


def source_dir() -> Path:
    """csrc/ of a source checkout (editable install), else the copy that setup.py puts in the package."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "csrc", package / "_csrc"):
        if all((candidate / name).is_file() for name in SOURCE_FILES):
            return candidate
    raise CudaExtensionUnavailable(f"the CUDA sources ({', '.join(SOURCE_FILES)}) are not in {package.parent / 'csrc'} "
                                   f"or {package / '_csrc'}")


def source_hash(src: Optional[Path] = None) -> str:
    """sha256 (16 hex digits) of the source files' names and contents."""
    src = src or source_dir()
    digest = hashlib.sha256()
    for name in SOURCE_FILES:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cuda_archs(value: Optional[str] = None) -> list[int]:
    """Compute capabilities from ``GATEDLORA_CUDA_ARCHS`` ("80;90", "8.0 9.0", "80,90"), sorted."""
    text = os.environ.get(ARCHS_ENV, DEFAULT_ARCHS) if value is None else value
    archs = set()
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.?(\d)?", item)
        if match is None:
            raise CudaExtensionUnavailable(f"{ARCHS_ENV}={text!r}: {item!r} is not a compute capability like 80 or 9.0")
        archs.add(int(match.group(1) + (match.group(2) or "")))
    if not archs:
        raise CudaExtensionUnavailable(f"{ARCHS_ENV}={text!r} names no architecture")
    return sorted(archs)


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1] if out.strip() else "unknown"


def pybind11_include() -> tuple[str, str]:
    """(include dir, version) of pybind11; raises CudaExtensionUnavailable when it is not installed."""
    try:
        import pybind11
    except ImportError as exc:
        raise CudaExtensionUnavailable(
            f"pybind11 is not installed ({exc}); pip install pybind11 ninja") from None
    return pybind11.get_include(), pybind11.__version__


def gencode_flags(archs: list[int]) -> list[str]:
    """SASS for each architecture, plus PTX of the newest so later GPUs can JIT it."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def build_commands(src: Path, build_dir: Path, output: Path, archs: list[int], nvcc: str,
                   extra_nvcc: tuple[str, ...] = ()) -> list[list[str]]:
    """The compile, compile and link commands (kernels with nvcc, bindings with the host compiler
    through nvcc so that both use the same one, then a shared object with static cudart)."""
    py_include = sysconfig.get_paths()["include"]
    pb_include, _ = pybind11_include()
    defines = [f'-DGATEDLORA_SOURCE_HASH="{source_hash(src)}"',
               f'-DGATEDLORA_CUDA_ARCHS="{";".join(map(str, archs))}"']
    common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
    kernels_o, bindings_o = build_dir / "gated_lora_kernels.o", build_dir / "bindings.o"
    return [
        [nvcc, *common, *gencode_flags(archs), "--threads", str(min(len(archs) + 1, os.cpu_count() or 1)),
         *extra_nvcc, "-c", str(src / "gated_lora_kernels.cu"), "-o", str(kernels_o)],
        [nvcc, *common, *defines, "-x", "c++", f"-I{py_include}", f"-I{pb_include}", "-c", str(src / "bindings.cpp"),
         "-o", str(bindings_o)],
        [nvcc, "-shared", "-cudart", "static", str(kernels_o), str(bindings_o), "-o", str(output)],
    ]


def _ninja_file(commands: list[list[str]], outputs: list[Path], inputs: list[list[Path]]) -> str:
    def esc(text: str) -> str:
        return text.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc", ""]
    for command, output, deps in zip(commands, outputs, inputs):
        lines.append(f"build {esc(str(output))}: run {' '.join(esc(str(d)) for d in deps)}")
        lines.append(f"  cmd = {' '.join(shlex.quote(part).replace('$', '$$') for part in command)}")
        lines.append(f"  desc = {output.name}")
    return "\n".join(lines) + "\n"


def find_ninja() -> Optional[str]:
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # the PyPI package ships the binary

        candidate = Path(ninja.BIN_DIR) / "ninja"
        return str(candidate) if candidate.is_file() else None
    except ImportError:
        return None


def build_module(build_dir: Path, archs: Optional[list[int]] = None, extra_nvcc: tuple[str, ...] = (),
                 output_name: Optional[str] = None, log: Optional[Path] = None) -> tuple[Path, str]:
    """Compile csrc/ into ``build_dir``; returns (shared object, compiler output), which is also written to
    ``log`` (default ``build_dir/build.log``).

    Raises CudaExtensionUnavailable with the compiler's last lines and the log's path when a step fails.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaExtensionUnavailable("nvcc not found (no CUDA toolkit on PATH, $CUDA_HOME or /usr/local/cuda)")
    src = source_dir()
    archs = archs or cuda_archs()
    build_dir = Path(build_dir).resolve()  # ninja -C runs in build_dir: relative paths would point inside it
    build_dir.mkdir(parents=True, exist_ok=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    output = build_dir / (output_name or (MODULE_NAME + suffix))
    commands = build_commands(src, build_dir, output, archs, nvcc, extra_nvcc)
    log = Path(log) if log is not None else build_dir / "build.log"
    ninja = find_ninja()
    if ninja is not None:
        kernels_o, bindings_o = build_dir / "gated_lora_kernels.o", build_dir / "bindings.o"
        deps = [[src / "gated_lora_kernels.cu", src / "gated_lora.h"], [src / "bindings.cpp", src / "gated_lora.h"],
                [kernels_o, bindings_o]]
        (build_dir / "build.ninja").write_text(_ninja_file(commands, [kernels_o, bindings_o, output], deps))
        steps = [[ninja, "-C", str(build_dir), "-v"]]
    else:
        steps = commands
    transcript = []
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False)
        transcript.append(" ".join(step) + "\n" + proc.stdout + proc.stderr)
        log.write_text("\n".join(transcript))
        if proc.returncode != 0:
            tail = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if line.strip()][-3:]
            raise CudaExtensionUnavailable(
                f"building the CUDA extension failed ({Path(step[0]).name} exit {proc.returncode}): "
                f"{' | '.join(tail)[:400]} (full log: {log})")
    return output, "\n".join(transcript)


def load_module_from(path: Path) -> ModuleType:
    """Import the extension from a file (its init function is named after MODULE_NAME)."""
    spec = importlib.util.spec_from_file_location(PREBUILT, path)
    if spec is None or spec.loader is None:
        raise CudaExtensionUnavailable(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gatedlora")


def cache_key(archs: list[int], nvcc: str) -> str:
    _, pb_version = pybind11_include()
    parts = [source_hash(), ";".join(map(str, archs)), nvcc_version(nvcc), sys.version.split()[0],
             sysconfig.get_config_var("EXT_SUFFIX") or "", pb_version]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _prebuilt() -> Optional[ModuleType]:
    """The module setup.py built, if importable and built from these sources."""
    try:
        module = importlib.import_module(PREBUILT)
    except ImportError:
        return None
    try:
        current = source_hash()
    except CudaExtensionUnavailable:
        return module  # an installed package without sources: trust what was installed with it
    return module if getattr(module, "SOURCE_HASH", None) == current else None


def build_cached() -> ModuleType:
    """Build (or reuse) the extension in the cache directory and import it."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaExtensionUnavailable("nvcc not found (no CUDA toolkit on PATH, $CUDA_HOME or /usr/local/cuda)")
    archs = cuda_archs()
    target = cache_root() / f"cuda-{cache_key(archs, nvcc)}"
    output = target / (MODULE_NAME + importlib.machinery.EXTENSION_SUFFIXES[0])
    if not output.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # 27 to 61 s on 2 CPU cores for sm_80 + sm_90 (measured while writing tools/nvcc_check.py).
        logger.info("gatedlora: building the CUDA extension into %s (first use; about a minute)", target)
        # Build in a private folder and rename it into place: two processes building at once
        # both succeed and one rename wins; a half-written module is never loaded.
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        # Each build's log beside the cache entry, named as its staging folder (two builds at once each keep
        # their own): the folder is removed however the build ends, the log only after a success.
        log = staging.with_name(staging.name + ".build.log")
        try:
            build_module(staging, archs, log=log)
            log.unlink(missing_ok=True)
            try:
                staging.rename(target)
            except OSError:  # another process got there first
                pass
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        if not output.is_file():
            raise CudaExtensionUnavailable(f"the build finished but {output} is missing")
    return load_module_from(output)


_lock = threading.Lock()
_state: dict[str, object] = {}


def load_extension() -> ModuleType:
    """The extension module (built on the first call if needed); CudaExtensionUnavailable if impossible.

    The outcome is remembered for the process: a failed build is not retried, and warns once.
    """
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        if "error" in _state:
            raise CudaExtensionUnavailable(_state["error"])
        try:
            module = _prebuilt() or build_cached()
        except CudaExtensionUnavailable as exc:
            _state["error"] = str(exc)
            warnings.warn(f"gatedlora: the cuda backend is unavailable: {exc}", RuntimeWarning, stacklevel=3)
            raise
        except Exception as exc:  # an import error of the built module, an OSError, ...
            _state["error"] = f"loading the CUDA extension failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"gatedlora: the cuda backend is unavailable: {_state['error']}", RuntimeWarning,
                          stacklevel=3)
            raise CudaExtensionUnavailable(_state["error"]) from exc
        _state["module"] = module
        return module


def unavailable_reason() -> Optional[str]:
    """None when the extension loads (building it if needed), else why it cannot."""
    try:
        load_extension()
    except CudaExtensionUnavailable as exc:
        return str(exc)
    return None


def reset() -> None:
    """Forget the remembered outcome (tests)."""
    with _lock:
        _state.clear()


def null_launch_arguments() -> dict[str, dict]:
    """Keyword arguments of one ``adapter_add`` and one ``fused_gemv`` call with null pointers, by entry
    point: on a machine without a CUDA device each must raise "no CUDA device" before it reads a pointer
    (the check that the launchers test the device first; tests and tools/nvcc_check.py run it)."""
    common = dict(gate_kind=0, hard=1, threshold=0.5, gate=0, stride_g=0, gate_dtype=0, gate_weight=0,
                  gate_weight_dtype=0, gate_bias=0, gate_bias_dtype=0, x=0, a=0, b=0, m=1, n=8, k=8, r=4, stride_xm=8,
                  stride_ar=8, stride_bn=4, x_dtype=1, lora_dtype=1, scaling=1.0, device=0, stream=0)
    return dict(adapter_add=dict(common, out=0, stride_om=8, n_split=0),
                fused_gemv=dict(common, y=0, w=0, bias=0, workspace=0, stride_wn=8, stride_ym=8))
