"""The CUDA extension (ops/cuda_build.py): built with nvcc and imported on every machine, a launch without
a GPU fails with "no CUDA device", nothing is built at ``import gatedlora``, a failed build leaves the
backend unavailable with its reason, and the csrc/ constants mirror the Python contract."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from gatedlora.ops import contract, cuda_backend, cuda_build

HAS_GPU = torch.cuda.is_available()
needs_nvcc = pytest.mark.skipif(cuda_build.find_nvcc() is None,
                                reason="nvcc not found: the CUDA toolkit is not installed")


@pytest.fixture
def fresh_build_state():
    """Forget the remembered build outcome before and after a test that fakes one."""
    cuda_build.reset()
    yield
    cuda_build.reset()


@needs_nvcc
def test_extension_builds_and_imports():
    """Built (or found in the cache) from these sources, for the configured architectures, with the
    constants of the Python side (sizes and gate kinds)."""
    ext = cuda_build.load_extension()
    assert ext.SOURCE_HASH == cuda_build.source_hash()
    assert ext.CUDA_ARCHS == ";".join(map(str, cuda_build.cuda_archs()))
    assert cuda_backend.mismatched_constants(ext) == []
    assert (ext.GATE_NONE, ext.GATE_GIVEN, ext.GATE_TOKEN) == tuple(contract.GateKind)


def test_header_mirrors_the_contract():
    """csrc/gated_lora.h holds the contract's gate kinds and largest rank under their C++ names (read
    from the text, so this holds without a CUDA toolkit)."""
    header = (cuda_build.source_dir() / "gated_lora.h").read_text()
    enum = re.search(r"enum GateKind : int \{([^}]*)\}", header).group(1)
    values = {name: int(value) for name, value in re.findall(r"(kGate\w+) = (\d+)", enum)}
    assert values == {f"kGate{kind.name.title()}": int(kind) for kind in contract.GateKind}
    assert int(re.search(r"constexpr int kMaxRank = (\d+);", header).group(1)) == contract.MAX_RANK
    assert int(re.search(r"constexpr int kMaxFusedRows = (\d+);", header).group(1)) == cuda_backend.MAX_FUSED_ROWS


@needs_nvcc
@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a CUDA device")
def test_launch_without_gpu_fails_clearly():
    """The launchers check the device before touching a pointer: null pointers are never read."""
    ext = cuda_build.load_extension()
    assert ext.device_problem(0).startswith("no CUDA device")
    for name, kwargs in cuda_build.null_launch_arguments().items():
        with pytest.raises(RuntimeError, match=r"^gatedlora cuda: no CUDA device"):
            getattr(ext, name)(**kwargs)


def test_failed_build_leaves_the_backend_unavailable_with_a_reason(fresh_build_state, monkeypatch):
    """No toolkit: one warning, the reason kept for the process, no exception at the caller."""
    monkeypatch.setattr(cuda_build, "_prebuilt", lambda: None)
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    with pytest.warns(RuntimeWarning, match="the cuda backend is unavailable: nvcc not found"):
        reason = cuda_build.unavailable_reason()
    assert reason.startswith("nvcc not found")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second ask neither warns nor retries
        assert cuda_build.unavailable_reason() == reason
        assert cuda_backend.extension_problem(torch.device("cuda", 0)) == f"the CUDA extension is unavailable: {reason}"
    with pytest.raises(cuda_build.CudaExtensionUnavailable, match="nvcc not found"):
        cuda_build.load_extension()


@needs_nvcc
def test_a_failed_build_keeps_the_log_its_error_names(monkeypatch, tmp_path):
    """The build runs in a staging folder that is removed whatever happens: its log is kept beside the cache."""
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("GATEDLORA_CUDA_ARCHS", "10")  # an architecture nvcc refuses at once
    with pytest.raises(cuda_build.CudaExtensionUnavailable, match=r"building the CUDA extension failed") as failed:
        cuda_build.build_cached()
    log = re.search(r"\(full log: (.*)\)$", str(failed.value)).group(1)
    assert "compute_10" in open(log).read()
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(log)]  # the staging folder is gone


def test_import_builds_nothing():
    """``import gatedlora`` (and a CPU call) must neither load the extension nor run nvcc."""
    code = ("import sys, torch, gatedlora\n"
            "from gatedlora.ops import cuda_build\n"
            "gatedlora.gated_lora(torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 8), torch.randn(4, 2), 1.0)\n"
            "assert 'gatedlora._cuda_kernels' not in sys.modules\n"
            "assert not cuda_build._state, cuda_build._state\n"
            "print('ok')\n")
    env = dict(os.environ, GATEDLORA_CACHE="/nonexistent/gatedlora-cache", PATH="/usr/bin:/bin")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cuda_archs_setting():
    assert cuda_build.cuda_archs("80;90") == [80, 90]
    assert cuda_build.cuda_archs("9.0, 8.0") == [80, 90]
    assert cuda_build.cuda_archs("86") == [86]
    with pytest.raises(cuda_build.CudaExtensionUnavailable, match="'sm_80' is not a compute capability"):
        cuda_build.cuda_archs("sm_80")
    flags = cuda_build.gencode_flags([80, 90])
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                     "-gencode", "arch=compute_90,code=compute_90"]
