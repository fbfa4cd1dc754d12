"""The cuda backend (csrc/) and ``gated_lora_fused``.

On every machine: the extension builds with nvcc and imports; a launch without a GPU fails with
"no CUDA device"; the wrapper's validation names the tensor; the dispatcher explains why the cuda
backend cannot run; ``gated_lora_fused`` falls back to exact mode and matches the fp64 reference;
nothing is built at import. Tests marked ``gpu`` run the kernels against the fp64 reference (the
sweep of tests/test_triton_backend.py), capture a CUDA graph and forbid host syncs; they are
skipped without a CUDA device.

Accuracy rule (flash-attention style): on open rows the kernel's largest error against the fp64
reference is at most twice the error of the same computation done by PyTorch at the same dtype,
plus one unit in the last place of the largest output. In exact mode closed rows equal
``base_out`` bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import gatedlora
from gatedlora.ops import backends, cuda_backend, cuda_build, fused_fallback_reason, gated_lora_fused
from gatedlora.ops import fused as fused_module
from gatedlora.ops.checks import GatedLoraArgs
from gatedlora.reference import gated_lora_reference
from gate_cases import FRACTIONS, bits, check_against_reference, check_strided_inplace, make_case, op_kwargs

HAS_GPU = torch.cuda.is_available()
needs_nvcc = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not found: the CUDA toolkit is not installed")
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_kwargs(case: dict) -> dict:
    kwargs = {key: value for key, value in case.items() if key not in ("open", "base_out")}
    return kwargs


def args_of(case: dict) -> GatedLoraArgs:
    return GatedLoraArgs(case["x"], case["lora_a"], case["lora_b"], case["scaling"], case.get("gate"),
                         case.get("gate_weight"), case.get("gate_bias", 0.0), case["threshold"], case["hard"])


def fused_reference(case: dict) -> torch.Tensor:
    """x W^T + bias + the gated LoRA term, all in fp64. Returns [M, N]."""
    base = F.linear(case["x"].double(), case["weight"].double(), case["bias"].double())
    kwargs = dict(op_kwargs(case), base_out=base)
    return gated_lora_reference(**kwargs)


def check_fused(case: dict, y: torch.Tensor) -> None:
    """Every row: error <= 2x that of F.linear + the torch backend at the same dtype, + 1 ulp."""
    ref = fused_reference(case)
    with torch.no_grad():
        base = F.linear(case["x"], case["weight"], case["bias"])
        same_dtype = gatedlora.gated_lora(**dict(op_kwargs(case), base_out=base), backend="torch")
    err = (y.double() - ref).abs().max().item()
    err_torch = (same_dtype.double() - ref).abs().max().item()
    floor = torch.finfo(y.dtype).eps * ref.abs().max().item()
    assert y.shape == ref.shape and y.dtype == case["x"].dtype
    assert err <= 2 * err_torch + floor, (err, err_torch, floor)


@pytest.fixture
def fresh_build_state():
    """Forget the remembered build outcome before and after a test that fakes one."""
    cuda_build.reset()
    yield
    cuda_build.reset()


# --- the extension on this machine (CPU) ------------------------------------------------------------

@needs_nvcc
def test_extension_builds_and_imports():
    """Built (or found in the cache) from these sources, for the configured architectures."""
    ext = cuda_build.load_extension()
    assert ext.SOURCE_HASH == cuda_build.source_hash()
    assert ext.CUDA_ARCHS == ";".join(map(str, cuda_build.cuda_archs()))
    assert (ext.MAX_RANK, ext.MAX_FUSED_ROWS, ext.WORKSPACE_BYTES) == (
        cuda_backend.MAX_RANK, cuda_backend.MAX_FUSED_ROWS, cuda_backend.WORKSPACE_BYTES)


def _null_launch_kwargs(**extra) -> dict:
    gate = dict(gate_mode=0, hard=1, threshold=0.5, gate=0, stride_g=0, gate_dtype=0, gate_weight=0,
                gate_weight_dtype=0, gate_bias=0, gate_bias_dtype=0, bias_from_ptr=0, gate_bias_value=0.0)
    return dict(gate, x=0, a=0, b=0, m=1, n=8, k=8, r=4, stride_ar=8, stride_bn=4, stride_xm=8, x_dtype=1,
                lora_dtype=1, scaling=1.0, device=0, stream=0, **extra)


@needs_nvcc
@pytest.mark.skipif(HAS_GPU, reason="checks the error on a machine without a CUDA device")
def test_launch_without_gpu_fails_clearly():
    """The launchers check the device before touching a pointer: null pointers are never read."""
    ext = cuda_build.load_extension()
    assert ext.device_problem(0).startswith("no CUDA device")
    with pytest.raises(RuntimeError, match=r"^gatedlora cuda: no CUDA device"):
        ext.adapter_add(**_null_launch_kwargs(out=0, stride_om=8, n_split=0))
    with pytest.raises(RuntimeError, match=r"^gatedlora cuda: no CUDA device"):
        ext.fused_gemv(**_null_launch_kwargs(y=0, w=0, bias=0, workspace=0, stride_wn=8, stride_ym=8))


def test_cpu_tensors_are_refused_by_the_launchers():
    case = make_case(1, 3, 16, 8, 4, torch.float16, "given-hard", "75%", linear=True)
    out = case["base_out"].clone()
    with pytest.raises(ValueError, match="out is on cpu; the cuda backend runs on CUDA tensors"):
        cuda_backend.CudaBackend().add_into(out, args_of(case))
    with pytest.raises(ValueError, match="x is on cpu; the fused GEMV runs on CUDA tensors"):
        cuda_backend.fused_gemv(case["x"], case["weight"], case["bias"], args_of(case))
    assert torch.equal(bits(out), bits(case["base_out"]))


# --- validation: every message names the tensor, the expectation and what came -------------------

def _valid(dtype=torch.float16, lora_dtype=None, m=3, k=16, n=8, r=4, mode="given-hard"):
    case = make_case(2, m, k, n, r, dtype, mode, "75%", lora_dtype=lora_dtype, bias_tensor=True, linear=True)
    return case, case["base_out"].clone(), args_of(case)


def _replace(args: GatedLoraArgs, **changes) -> GatedLoraArgs:
    fields = dict(args.__dict__)
    fields.update(changes)
    return GatedLoraArgs(**fields)


CPU = torch.device("cpu")

ADAPTER_ERRORS = [
    ("x dtype", lambda c, o, a: (o, _replace(a, x=a.x.double())), TypeError,
     r"x must have dtype float16, bfloat16, float32, got torch.float64"),
    ("x dims", lambda c, o, a: (o, _replace(a, x=a.x[None])), ValueError, r"x must have shape \[M, K\], got \[1, 3, 16\]"),
    ("x stride", lambda c, o, a: (o, _replace(a, x=torch.randn(16, 3).half().t())), ValueError,
     r"x must have unit stride along its last dim, got strides \(1, 3\)"),
    ("out dtype", lambda c, o, a: (o.float(), a), TypeError, r"out must have dtype float16, got torch.float32"),
    ("out shape", lambda c, o, a: (o[:2], a), ValueError, r"out must have shape \[3, 8\], got \[2, 8\]"),
    ("out device", lambda c, o, a: (o.to("meta"), a), ValueError, r"out must be on cpu, got a tensor on meta"),
    ("lora_a shape", lambda c, o, a: (o, _replace(a, lora_a=a.lora_a[:, :15])), ValueError,
     r"lora_a must have shape \[r, 16\], got \[4, 15\]"),
    ("rank", lambda c, o, a: (o, _replace(a, lora_a=torch.zeros(129, 16).half(), lora_b=torch.zeros(8, 129).half())),
     ValueError, r"rank must be in \[1, 128\], lora_a has shape \[129, 16\]"),
    ("lora_b shape", lambda c, o, a: (o, _replace(a, lora_b=a.lora_b[:, :3])), ValueError,
     r"lora_b must have shape \[8, 4\], got \[8, 3\]"),
    ("lora_b dtype", lambda c, o, a: (o, _replace(a, lora_b=a.lora_b.float())), TypeError,
     r"lora_b must have dtype float16, got torch.float32"),
    ("dtype pair", lambda c, o, a: (o.float(), _replace(a, x=a.x.float())), TypeError,
     r"x in torch.float32 with lora weights in torch.float16 is not compiled"),
    ("gate shape", lambda c, o, a: (o, _replace(a, gate=a.gate[:2])), ValueError, r"gate must have shape \[3\], got \[2\]"),
    ("gate device", lambda c, o, a: (o, _replace(a, gate=a.gate.to("meta"))), ValueError,
     r"gate must be on cpu, got a tensor on meta"),
    ("gate dtype", lambda c, o, a: (o, _replace(a, gate=a.gate.to(torch.int32))), TypeError,
     r"gate must have dtype float32, float16, bfloat16, float64, got torch.int32"),
    ("gate_weight shape", lambda c, o, a: (o, _replace(a, gate=None, gate_weight=torch.zeros(15))), ValueError,
     r"gate_weight must have shape \[16\], got \[15\]"),
    ("gate_bias size", lambda c, o, a: (o, _replace(a, gate=None, gate_weight=torch.zeros(16), gate_bias=torch.zeros(2))),
     ValueError, r"gate_bias must hold one value, got shape \[2\]"),
]


@pytest.mark.parametrize("what,change,error,message", ADAPTER_ERRORS, ids=[e[0] for e in ADAPTER_ERRORS])
def test_adapter_validation_names_the_tensor(what, change, error, message):
    case, out, args = _valid()
    cuda_backend.validate_adapter(out, args, CPU)  # the unchanged inputs pass
    bad_out, bad_args = change(case, out, args)
    with pytest.raises(error, match="^gatedlora cuda: " + message):
        cuda_backend.validate_adapter(bad_out, bad_args, CPU)


FUSED_ERRORS = [
    ("rows", lambda c, a: (torch.zeros(17, 16).half(), c["weight"], c["bias"], a), ValueError,
     r"x must have 1 to 16 rows for the fused GEMV, got shape \[17, 16\]"),
    ("weight dtype", lambda c, a: (c["x"], c["weight"].float(), c["bias"], a), TypeError,
     r"weight must have dtype float16, got torch.float32"),
    ("weight shape", lambda c, a: (c["x"], c["weight"][:, :15], c["bias"], a), ValueError,
     r"weight must have shape \[N, 16\], got \[8, 15\]"),
    ("weight stride", lambda c, a: (c["x"], torch.zeros(16, 8).half().t(), c["bias"], a), ValueError,
     r"weight must have unit stride along its last dim, got strides \(1, 8\)"),
    ("bias shape", lambda c, a: (c["x"], c["weight"], c["bias"][:7], a), ValueError,
     r"bias must have shape \[8\], got \[7\]"),
    ("lora_b rows", lambda c, a: (c["x"], c["weight"][:6], c["bias"][:6], a), ValueError,
     r"lora_b must have shape \[6, 4\], got \[8, 4\]"),
]


@pytest.mark.parametrize("what,change,error,message", FUSED_ERRORS, ids=[e[0] for e in FUSED_ERRORS])
def test_fused_validation_names_the_tensor(what, change, error, message):
    case, _, args = _valid()
    cuda_backend.validate_fused(case["x"], case["weight"], case["bias"], args, CPU)
    x, weight, bias, bad_args = change(case, args)
    with pytest.raises(error, match="^gatedlora cuda: " + message):
        cuda_backend.validate_fused(x, weight, bias, _replace(bad_args, x=x), CPU)


def test_gate_arguments_travel_as_pointers_without_sync(monkeypatch):
    """A gate_bias tensor goes to the kernel by address; nothing reads a tensor value on the host."""
    case, _, args = _valid(mode="token-hard")
    bias = case["gate_bias"]

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the wrapper read a tensor value")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    kwargs = cuda_backend._gate_kwargs(args, args.x.dtype)
    strided_gate = torch.rand(3, 16)[:, 0]
    given = cuda_backend._gate_kwargs(_replace(args, gate=strided_gate, gate_weight=None), args.x.dtype)
    monkeypatch.undo()
    assert (kwargs["gate_mode"], kwargs["bias_from_ptr"], kwargs["gate_bias"]) == (2, 1, bias.data_ptr())
    assert kwargs["gate_weight"] == case["gate_weight"].data_ptr() and kwargs["gate_weight_dtype"] == 0
    # a strided given gate passes its stride (x[:, 0] has stride K = 16), not a copy
    assert (given["gate_mode"], given["stride_g"], given["gate_dtype"]) == (1, 16, 0)


# --- backend selection -------------------------------------------------------------------------

def test_not_supported_reasons_without_building(monkeypatch):
    """On CPU tensors the reasons come from dtypes, shapes and the device; the extension is not
    built or loaded to find them."""
    def no_build():
        raise AssertionError("not_supported_reasons tried to load the extension")

    monkeypatch.setattr(cuda_build, "load_extension", no_build)
    monkeypatch.setattr(cuda_build, "unavailable_reason", no_build)
    backend = cuda_backend.CudaBackend()

    def args_for(x_dtype=torch.float32, lora_dtype=None, r=4, grad=False):
        a = torch.randn(r, 8, dtype=lora_dtype or x_dtype, requires_grad=grad)
        return GatedLoraArgs(torch.randn(2, 8, dtype=x_dtype), a, torch.randn(6, r, dtype=lora_dtype or x_dtype),
                             1.0, None, None, 0.0, 0.5, True)

    device_reason = "no CUDA device" if not HAS_GPU else "tensors are on cpu"
    assert any(device_reason in reason for reason in backend.not_supported_reasons(args_for()))
    assert any("float64" in reason for reason in backend.not_supported_reasons(args_for(torch.float64)))
    assert any("not compiled" in reason for reason in
               backend.not_supported_reasons(args_for(torch.float32, torch.bfloat16)))
    assert any("rank 129" in reason for reason in backend.not_supported_reasons(args_for(r=129)))
    assert not any("rank" in reason for reason in backend.not_supported_reasons(args_for(r=128)))
    assert any("grad" in reason for reason in backend.not_supported_reasons(args_for(grad=True)))
    with torch.no_grad():
        assert not any("grad" in reason for reason in backend.not_supported_reasons(args_for(grad=True)))


def test_explicit_cuda_backend_explains_itself(monkeypatch):
    case = make_case(3, 4, 16, 8, 4, torch.float32, "given-hard", "75%")
    expected = "no CUDA device" if not HAS_GPU else "tensors are on cpu"
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run these inputs: .*{expected}"):
        gatedlora.gated_lora(**op_kwargs(case), backend="cuda")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=expected):
        gatedlora.gated_lora(**op_kwargs(case))


def test_auto_still_takes_the_torch_backend_on_cpu():
    case = make_case(4, 9, 24, 16, 4, torch.float32, "token-hard", "75%")
    assert "cuda" in backends.available_backends()
    assert backends.select_backend("auto", args_of(case)).name == "torch"
    auto = gatedlora.gated_lora(**op_kwargs(case))
    assert torch.equal(bits(auto), bits(gatedlora.gated_lora(**op_kwargs(case), backend="torch")))


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


# --- gated_lora_fused off the GPU path ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,fraction", [("given-hard", "75%"), ("given-soft", "all"), ("token-hard", "6%"),
                                           ("none", "all")])
def test_fused_falls_back_to_exact_mode_on_cpu(mode, fraction, dtype):
    seed = zlib.crc32(f"fused/{mode}/{dtype}".encode())
    case = make_case(seed, 37, 113, 59, 8, dtype, mode, fraction, bias_tensor=seed % 2 == 0, linear=True)
    reason = fused_fallback_reason(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                   case.get("gate"), case.get("gate_weight"), case.get("gate_bias", 0.0))
    assert reason is not None and ("no CUDA device" in reason or "tensors are on cpu" in reason)
    assert "more than 16 rows (the one-pass GEMV serves decode; got 37)" in reason
    y = gated_lora_fused(**fused_kwargs(case))
    base = F.linear(case["x"], case["weight"], case["bias"])
    exact = gatedlora.gated_lora(**dict(op_kwargs(case), base_out=base))
    assert torch.equal(bits(y), bits(exact)), "the fallback is F.linear + gated_lora"
    check_fused(case, y)
    closed = ~case["open"]
    assert torch.equal(bits(y[closed]), bits(base[closed])), "exact mode keeps closed rows bitwise"


def test_fused_fallback_reasons():
    case = make_case(5, 2, 16, 8, 4, torch.float32, "none", linear=True)
    x, w, b, a, bb = case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"]
    assert fused_fallback_reason(x, w, b, a, bb, backend="triton") == (
        "backend 'triton' was asked for (the fused GEMV is the cuda backend's)")
    assert "x dtype torch.float64 is not supported" in fused_fallback_reason(x.double(), w.double(), b.double(), a, bb)
    assert "weight has stride 8 along K" in fused_fallback_reason(x, torch.zeros(16, 8).t(), b, a, bb)
    assert "inputs require grad" in fused_fallback_reason(x, w.requires_grad_(), b, a, bb)
    assert fused_fallback_reason(x[:0], w, b, a, bb) == "the input has no rows or no output features"


def test_fused_gradients_use_exact_mode():
    case = make_case(6, 3, 16, 8, 4, torch.float64, "given-soft", "all", linear=True)
    leaves = {name: case[name].clone().requires_grad_() for name in ("x", "weight", "bias", "lora_a", "lora_b")}
    fused_args = dict(fused_kwargs(case), **leaves)
    gated_lora_fused(**fused_args).square().sum().backward()
    expected = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    base = F.linear(expected["x"], expected["weight"], expected["bias"])
    plain = dict(op_kwargs(case), x=expected["x"], base_out=base, lora_a=expected["lora_a"], lora_b=expected["lora_b"])
    gatedlora.gated_lora(**plain).square().sum().backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad, expected[name].grad, rtol=1e-12, atol=1e-12)


def test_warn_fused_fallback_once_per_kind():
    fused_module._warned.clear()
    with pytest.warns(RuntimeWarning, match="base_mode='fused' runs exact mode here: more than 16 rows .*got 40"):
        assert fused_module.warn_fused_fallback_once("more than 16 rows (got 40)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused_module.warn_fused_fallback_once("more than 16 rows (got 512)")
    with pytest.warns(RuntimeWarning, match="no CUDA device"):
        assert fused_module.warn_fused_fallback_once("no CUDA device")
    fused_module._warned.clear()


def test_fused_custom_op_schema_and_fake():
    case = make_case(7, 5, 32, 24, 4, torch.float32, "given-hard", "75%", linear=True)
    torch.library.opcheck(
        torch.ops.gatedlora.gated_lora_fused.default,
        (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 2.0, case["gate"], None, None, 0.0,
         0.5, True, "auto"),
    )


class _FusedModel(torch.nn.Module):
    def __init__(self, k: int, n: int, r: int):
        super().__init__()
        self.base = torch.nn.Linear(k, n)
        self.lora_a = torch.nn.Parameter(torch.randn(r, k) * k ** -0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(n, r) * r ** -0.5)

    def forward(self, x, gate):
        y = gated_lora_fused(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, 2.0, gate=gate)
        return torch.nn.functional.gelu(y)


def test_fused_torch_compile_without_graph_break():
    torch.manual_seed(8)
    model = _FusedModel(48, 40, 8)
    x, gate = torch.randn(2, 7, 48), torch.rand(2, 7)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, gate)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, gate)
    assert torch.equal(compiled, eager)


# --- GPU only --------------------------------------------------------------------------------------

MODES_FRACTIONS = [(mode, fraction) for mode in ("given-hard", "given-soft", "token-hard") for fraction in FRACTIONS] + [
    ("none", "all"), ("token-soft", "all")]
SHAPES = [(m, r, kn) for m in (1, 3, 64, 133) for r, kn in zip((1, 4, 16, 64), ((113, 203), (59, 113), (203, 59), (113, 59)))]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,fraction", MODES_FRACTIONS)
def test_gpu_gate_modes_and_open_fractions(mode, fraction, dtype):
    seed = zlib.crc32(f"cuda/{mode}/{fraction}/{dtype}".encode())
    case = make_case(seed, 133, 113, 203, 16, dtype, mode, fraction, bias_tensor=seed % 2 == 0, device="cuda")
    check_against_reference(case, gatedlora.gated_lora(**op_kwargs(case), backend="cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,r,kn", SHAPES)
def test_gpu_odd_shapes(m, r, kn):
    k, n = kn
    dtype = (torch.float16, torch.float32, torch.bfloat16)[(m + r) % 3]
    mode = ("given-hard", "token-hard", "none")[r % 3]
    case = make_case(1000 + 7 * m + r, m, k, n, r, dtype, mode, "75%", device="cuda")
    check_against_reference(case, gatedlora.gated_lora(**op_kwargs(case), backend="cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n_split", (1, 2, 7))
@pytest.mark.parametrize("m,k,r", [(1, 4096, 128), (5, 1000, 64), (20, 2048, 17)])
def test_gpu_n_split_and_ranks(n_split, m, k, r):
    """Row blocks of 1, 4 and 8; K a multiple of 8 (vector path) or not; ranks with and without a
    scalar tail along R."""
    case = make_case(m * 31 + r, m, k, 600, r, torch.bfloat16, "token-hard", "75%", bias_tensor=True, device="cuda")
    out = case["base_out"].clone()
    cuda_backend.launch(out, args_of(case), n_split=n_split)
    check_against_reference(case, out)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("given-soft", "token-hard"))
def test_gpu_fp32_lora_weights_on_16bit_x(x_dtype, mode):
    case = make_case(77, 64, 113, 59, 8, x_dtype, mode, "75%", lora_dtype=torch.float32, device="cuda")
    out = gatedlora.gated_lora(**op_kwargs(case), backend="cuda")
    assert out.dtype == x_dtype
    check_against_reference(case, out)


@pytest.mark.gpu
@gpu
def test_gpu_strided_misaligned_inputs_and_poisoned_output():
    """Odd row strides and x one element off alignment: the kernel's scalar path."""
    check_strided_inplace("cuda", "cuda", x_offset=1)


@pytest.mark.gpu
@gpu
def test_gpu_nan_probability_closes_row():
    case = make_case(21, 20, 64, 48, 8, torch.float32, "token-hard", "all", device="cuda")
    case["x"][3, 5] = float("nan")
    case["open"][3] = False
    check_against_reference(case, gatedlora.gated_lora(**op_kwargs(case), backend="cuda"))
    given = make_case(22, 20, 64, 48, 8, torch.float32, "given-soft", "all", device="cuda")
    given["gate"][[0, 7]] = float("nan")
    given["open"][[0, 7]] = False
    out = gatedlora.gated_lora(**op_kwargs(given), backend="cuda")
    check_against_reference(dict(given, gate=torch.nan_to_num(given["gate"], nan=0.0)), out)


FUSED_CASES = [(m, k, n, r, mode) for m, k, n, r, mode in (
    (1, 4096, 4096, 16, "given-hard"), (1, 113, 203, 4, "token-hard"), (2, 1000, 59, 64, "none"),
    (4, 2048, 600, 16, "given-soft"), (5, 203, 113, 1, "token-soft"), (16, 4096, 1000, 128, "token-hard"),
    (16, 59, 33, 8, "given-hard"))]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r,mode", FUSED_CASES)
def test_gpu_fused_gemv_against_reference(m, k, n, r, mode, dtype):
    case = make_case(zlib.crc32(f"gemv/{m}/{k}/{mode}/{dtype}".encode()), m, k, n, r, dtype, mode, "75%",
                     bias_tensor=m % 2 == 1, device="cuda", linear=True)
    kwargs = fused_kwargs(case)
    assert fused_fallback_reason(**{key: kwargs[key] for key in ("x", "weight", "bias", "lora_a", "lora_b")},
                                 gate=case.get("gate"), gate_weight=case.get("gate_weight"),
                                 gate_bias=case.get("gate_bias", 0.0)) is None
    with torch.no_grad():
        y = gated_lora_fused(**kwargs)
    check_fused(case, y)
    # the workspace is left zeroed: a second launch on the stream gives the same bits
    with torch.no_grad():
        assert torch.equal(bits(gated_lora_fused(**kwargs)), bits(y))


@pytest.mark.gpu
@gpu
def test_gpu_fused_all_closed_and_fp32_lora():
    closed = make_case(51, 3, 512, 256, 16, torch.bfloat16, "given-hard", "none", device="cuda", linear=True)
    with torch.no_grad():
        check_fused(closed, gated_lora_fused(**fused_kwargs(closed)))
    mixed = make_case(52, 8, 520, 130, 16, torch.float16, "token-hard", "75%", lora_dtype=torch.float32,
                      device="cuda", linear=True)
    with torch.no_grad():
        check_fused(mixed, gated_lora_fused(**fused_kwargs(mixed)))


@pytest.mark.gpu
@gpu
def test_gpu_calls_do_not_synchronise():
    exact = make_case(31, 1, 4096, 4096, 16, torch.bfloat16, "token-hard", "all", bias_tensor=True, device="cuda")
    fused = make_case(32, 4, 4096, 4096, 16, torch.bfloat16, "given-hard", "75%", device="cuda", linear=True)
    with torch.no_grad():
        gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")  # build, load and allocate outside the check
        gated_lora_fused(**fused_kwargs(fused))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
            y = gated_lora_fused(**fused_kwargs(fused))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check_against_reference(exact, out)
    check_fused(fused, y)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_decode_step_follows_gate_values():
    """One decode step (exact-mode adapter + fused GEMV) captured once; gates changed in place
    between replays must be followed, which works only if the skip is decided on the device."""
    exact = make_case(41, 4, 1024, 2048, 16, torch.float16, "given-hard", "all", device="cuda")
    fused = make_case(42, 4, 1024, 2048, 16, torch.float16, "given-hard", "all", device="cuda", linear=True)
    gate = exact["gate"]
    fused["gate"] = gate  # one gate tensor drives both kernels
    with torch.no_grad():
        gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs advises
            gated_lora_fused(**fused_kwargs(fused))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
            y = gated_lora_fused(**fused_kwargs(fused))
    for step in range(3):
        new_gate = torch.rand(4, device="cuda")
        new_gate[step] = 0.0
        gate.copy_(new_gate)
        graph.replay()
        torch.cuda.synchronize()
        opened = new_gate >= 0.5
        check_against_reference(dict(exact, gate=new_gate.clone(), open=opened), out)
        check_fused(dict(fused, gate=new_gate.clone(), open=opened), y)
