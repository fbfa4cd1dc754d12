"""The triton backend against the fp64 reference.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 and patches two bf16 defects of the interpreter, tested at the end of this
file). With a GPU the same tests run the compiled kernel on CUDA tensors, and the tests marked
``gpu`` also check that a call does not synchronise and captures in a CUDA graph.

Accuracy rule (flash-attention style): on the rows the gate opens, the kernel's largest error
against the fp64 reference is at most twice the error of the torch backend at the same dtype,
plus one unit in the last place of the largest output. Rows the gate closes must equal
``base_out`` bit for bit.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import gatedlora
from gatedlora.ops import available_backends
from gatedlora.ops.checks import GatedLoraArgs
import gate_cases
from gate_cases import FRACTIONS, bits, check_against_reference, check_strided_inplace, op_kwargs, open_count

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")

if "triton" in available_backends():
    from gatedlora.ops import triton_backend as tb

    INTERPRETED = tb.kernel_is_interpreted()
else:  # pragma: no cover - the module is skipped
    INTERPRETED = True
DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_case(*args, **kwargs) -> dict:
    """``gate_cases.make_case`` on this file's device (CPU under the interpreter, else CUDA)."""
    return gate_cases.make_case(*args, device=DEVICE, **kwargs)


MODES_FRACTIONS = [
    (mode, fraction)
    for mode in ("given-hard", "given-soft", "token-hard")
    for fraction in FRACTIONS
] + [("none", "all"), ("token-soft", "all")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,fraction", MODES_FRACTIONS)
def test_gate_modes_and_open_fractions(mode, fraction, dtype):
    seed = zlib.crc32(f"{mode}/{fraction}/{dtype}".encode())  # str hashes vary per process
    case = make_case(seed, 133, 113, 203, 16, dtype, mode, fraction, bias_tensor=(seed % 2 == 0))
    out = gatedlora.gated_lora(**op_kwargs(case), backend="triton")
    assert int(case["open"].sum()) == (open_count(fraction, 133) if mode in ("given-hard", "given-soft", "token-hard") else 133)
    check_against_reference(case, out)


SHAPES = [(m, r, kn) for m in (1, 3, 64, 133) for r, kn in zip((1, 4, 16, 64), ((113, 203), (59, 113), (203, 59), (113, 59)))]


@pytest.mark.parametrize("m,r,kn", SHAPES)
def test_odd_shapes(m, r, kn):
    k, n = kn
    dtype = (torch.float16, torch.float32, torch.bfloat16)[(m + r) % 3]
    mode = ("given-hard", "token-hard", "none")[r % 3]
    case = make_case(1000 + 7 * m + r, m, k, n, r, dtype, mode, "75%")
    check_against_reference(case, gatedlora.gated_lora(**op_kwargs(case), backend="triton"))


@pytest.mark.parametrize("key", sorted(tb.TILE_CONFIGS) if "triton" in available_backends() else [], ids=str)
@pytest.mark.parametrize("n_split", (1, 2))
def test_every_tile_config(key, n_split):
    """Each tile config the heuristic can pick, with every loop taking more than one step: two K
    steps, three N tiles, a partial second row block, a rank that leaves BLOCK_R padding."""
    block_m, block_r, elt = key
    tiles = tb.TILE_CONFIGS[key]
    dtype = torch.float32 if elt == 4 else torch.bfloat16
    m, k, n, r = block_m + 3, tiles.block_k + 37, 2 * tiles.block_n + 22, max(1, block_r - 3)
    case = make_case(block_m * 1000 + block_r * 10 + n_split, m, k, n, r, dtype, "token-hard", "75%",
                     bias_tensor=True)
    out = case["base_out"].clone()
    args = GatedLoraArgs(case["x"], case["lora_a"], case["lora_b"], case["scaling"], None, case["gate_weight"],
                         case["gate_bias"], case["threshold"], True)
    tb.launch(out, args, tiles=tiles, n_split=n_split)
    check_against_reference(case, out)


@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("given-soft", "token-hard"))
def test_fp32_lora_weights_on_16bit_x(x_dtype, mode):
    """PEFT keeps adapter weights in fp32 on a bf16/fp16 model: x is upcast, the sum stored in x's dtype."""
    case = make_case(77, 64, 113, 59, 8, x_dtype, mode, "75%", lora_dtype=torch.float32)
    out = gatedlora.gated_lora(**op_kwargs(case), backend="triton")
    assert out.dtype == x_dtype
    check_against_reference(case, out)


def test_unsupported_dtype_pair_is_explained():
    case = make_case(5, 4, 32, 16, 4, torch.float32, "none", lora_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not compiled"):
        gatedlora.gated_lora(**op_kwargs(case), backend="triton")


def test_strided_inputs_and_inplace_output():
    """Row strides passed to the kernel as they are; transposed A and B copied by the launcher."""
    check_strided_inplace("triton", DEVICE, x_offset=0)


def test_output_with_column_stride_is_staged():
    """An out [M, N] whose columns are not adjacent goes through a contiguous copy (the kernel
    stores contiguous vectors); the result, and the untouched closed rows, are the same."""
    case = make_case(12, 9, 40, 24, 4, torch.float32, "given-hard", "75%")
    buffer = torch.full((9, 48), float("nan"), device=DEVICE)
    out = buffer[:, ::2]
    out.copy_(case["base_out"])
    args = GatedLoraArgs(case["x"], case["lora_a"], case["lora_b"], case["scaling"], case["gate"], None, 0.0,
                         0.5, True)
    tb.TritonBackend().add_into(out, args)
    assert torch.isnan(buffer[:, 1::2]).all()
    check_against_reference(case, out)


def test_nan_probability_closes_row():
    """A NaN gate (given, or a token gate on a row of x holding a NaN) closes the row; on the device
    nothing checks for NaN on the host (that would sync), so the kernel must close it."""
    case = make_case(21, 20, 64, 48, 8, torch.float32, "token-hard", "all")
    case["x"][3, 5] = float("nan")
    case["open"][3] = False
    out = case["base_out"].clone()
    args = GatedLoraArgs(case["x"], case["lora_a"], case["lora_b"], case["scaling"], None, case["gate_weight"],
                         case["gate_bias"], 0.5, True)
    tb.TritonBackend().add_into(out, args)
    check_against_reference(case, out)

    given = make_case(22, 20, 64, 48, 8, torch.float32, "given-soft", "all")
    given["gate"][[0, 7]] = float("nan")
    given["open"][[0, 7]] = False
    out = given["base_out"].clone()
    args = GatedLoraArgs(given["x"], given["lora_a"], given["lora_b"], given["scaling"], given["gate"], None, 0.0,
                         0.5, False)
    tb.TritonBackend().add_into(out, args)
    expected_gate = torch.nan_to_num(given["gate"], nan=0.0)
    check_against_reference(dict(given, gate=expected_gate), out)


def test_launch_plan_never_syncs(monkeypatch):
    """The launcher turns tensors into pointers and shapes only: any read of a tensor value
    (.item(), bool(), float(), .tolist(), .cpu()) would be a host sync on a GPU."""
    case = make_case(3, 5, 64, 32, 4, torch.float16, "token-hard", "75%", bias_tensor=True)
    args = GatedLoraArgs(case["x"], case["lora_a"], case["lora_b"], 1.0, None, case["gate_weight"],
                         case["gate_bias"], 0.5, True)
    out = case["base_out"].clone()

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the launcher read a tensor value")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    grid, positional, keywords = tb.launch_plan(out, args)
    monkeypatch.undo()
    assert positional[6] is case["gate_bias"] and positional[-1] == 1, "the bias must travel by pointer"
    assert grid[0] >= 1 and keywords["GATE_MODE"] == 2


def test_not_supported_reasons(monkeypatch):
    backend = tb.TritonBackend()

    def args_for(x_dtype=torch.float32, lora_dtype=None, r=4, grad=False):
        a = torch.randn(r, 8, dtype=lora_dtype or x_dtype, requires_grad=grad)
        return GatedLoraArgs(torch.randn(2, 8, dtype=x_dtype), a, torch.randn(6, r, dtype=lora_dtype or x_dtype),
                             1.0, None, None, 0.0, 0.5, True)

    assert any("float64" in reason for reason in backend.not_supported_reasons(args_for(torch.float64)))
    assert any("rank 129" in reason for reason in backend.not_supported_reasons(args_for(r=129)))
    assert not any("rank" in reason for reason in backend.not_supported_reasons(args_for(r=128)))
    assert any("grad" in reason for reason in backend.not_supported_reasons(args_for(grad=True)))
    with torch.no_grad():
        assert not any("grad" in reason for reason in backend.not_supported_reasons(args_for(grad=True)))
    monkeypatch.setattr(tb, "kernel_is_interpreted", lambda: False)
    assert any("TRITON_INTERPRET" in reason for reason in backend.not_supported_reasons(args_for()))


def test_heuristic_matches_the_documented_examples():
    """The choices the launcher's docstring derives (bf16, r=16, K=N=4096, 132 SMs)."""
    decode, split = tb.choose_launch(1, 4096, 4096, 16, 2, 2, 132)
    assert (decode.block_m, split) == (16, 32)
    batched, split = tb.choose_launch(64, 4096, 4096, 16, 2, 2, 132)
    assert (batched.block_m, split) == (16, 8)
    prefill, split = tb.choose_launch(4096, 4096, 4096, 16, 2, 2, 132)
    assert (prefill.block_m, split) == (64, 1)
    for m in (1, 7, 300, 9000):
        for r in (1, 16, 100, 128):
            tiles, split = tb.choose_launch(tb.m_bucket(m), 28672, 4096, r, 2, 4, 132)
            assert tiles in tb.TILE_CONFIGS.values() and tiles.block_r >= r
            assert 1 <= split <= triton.cdiv(28672, tiles.block_n)


def test_custom_op_schema_and_fake():
    """torch.library.opcheck: schema, fake (meta) implementation and mutation declaration agree."""
    case = make_case(8, 6, 32, 24, 4, torch.float32, "given-hard", "75%")
    out = case["base_out"].clone()
    torch.library.opcheck(
        torch.ops.gatedlora.gated_lora_add_.default,
        (out, case["x"], case["lora_a"], case["lora_b"], 2.0, case["gate"], None, None, 0.0, 0.5, True, "torch"),
    )
    # The op dispatches to the backend it names.
    out = case["base_out"].clone()
    torch.ops.gatedlora.gated_lora_add_(out, case["x"], case["lora_a"], case["lora_b"], case["scaling"],
                                        case["gate"], None, None, 0.0, 0.5, True, "triton")
    check_against_reference(case, out)


class _GatedModel(torch.nn.Module):
    def __init__(self, k: int, n: int, r: int, backend: str, token: bool):
        super().__init__()
        self.base = torch.nn.Linear(k, n)
        self.lora_a = torch.nn.Parameter(torch.randn(r, k) * k ** -0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(n, r) * r ** -0.5)
        self.gate_weight = torch.nn.Parameter(torch.randn(k) * k ** -0.5) if token else None
        self.gate_bias = torch.nn.Parameter(torch.tensor(0.1)) if token else None
        self.backend = backend

    def forward(self, x, gate=None):
        y = self.base(x)
        if self.gate_weight is not None:
            y = gatedlora.gated_lora(x, y, self.lora_a, self.lora_b, 2.0, gate_weight=self.gate_weight,
                                     gate_bias=self.gate_bias, backend=self.backend)
        else:
            y = gatedlora.gated_lora(x, y, self.lora_a, self.lora_b, 2.0, gate=gate, backend=self.backend)
        return torch.nn.functional.gelu(y)


@pytest.mark.parametrize("backend,token", [("torch", False), ("torch", True), ("triton", False)])
def test_torch_compile_without_graph_break(backend, token):
    """fullgraph=True fails on any graph break; the compiled model must match eager exactly."""
    torch.manual_seed(4)
    model = _GatedModel(48, 40, 8, backend, token).to(DEVICE)
    x = torch.randn(2, 7, 48, device=DEVICE)
    gate = torch.rand(2, 7, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, gate)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, gate)
    assert torch.equal(compiled, eager)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch.manual_seed(5)
    model = _GatedModel(48, 40, 8, "auto", False).to(DEVICE)
    x, gate = torch.randn(3, 5, 48, device=DEVICE), torch.rand(3, 5, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, gate)
        compiled = torch.compile(model, fullgraph=True)(x, gate)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


# --- the interpreter's bf16 defects and their workaround (tests/conftest.py) -------------------

@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs).to(tl.bfloat16))


def _interpreter_builder():
    from triton.runtime import interpreter

    return interpreter.InterpreterBuilder


@pytest.mark.skipif(not INTERPRETED, reason="tests the Triton interpreter (TRITON_INTERPRET=1)")
def test_interpreter_bf16_dot_workaround_is_needed_and_correct(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    exact = a.double() @ b.double()  # bf16 products are exact in fp32; only the sum rounds
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, BLOCK=16)
    torch.testing.assert_close(c.double(), exact, rtol=1e-6, atol=1e-6)

    builder = _interpreter_builder()
    monkeypatch.setattr(builder, "create_dot", builder.create_dot._gatedlora_original)
    _dot_kernel[(1,)](a, b, c, BLOCK=16)
    # Unpatched, the interpreter multiplies the uint16 bit patterns: values near 1e9, not O(1).
    assert (c.double() - exact).abs().max().item() > 1e6


@pytest.mark.skipif(not INTERPRETED, reason="tests the Triton interpreter (TRITON_INTERPRET=1)")
def test_interpreter_bf16_cast_workaround_is_needed_and_correct(monkeypatch):
    g = torch.Generator().manual_seed(1)
    src = torch.randn(1024, generator=g)
    dst = torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](src, dst, BLOCK=1024)
    assert torch.equal(bits(dst), bits(src.bfloat16())), "fp32 -> bf16 must round to nearest even, as torch"

    builder = _interpreter_builder()
    monkeypatch.setattr(builder, "cast_impl", builder.cast_impl._gatedlora_original)
    _cast_kernel[(1,)](src, dst, BLOCK=1024)
    truncated = torch.from_numpy((src.numpy().view(np.uint32) >> 16).astype(np.uint16).view(np.int16))
    assert torch.equal(bits(dst), truncated), "unpatched, the interpreter truncates"
    assert not torch.equal(bits(dst), bits(src.bfloat16()))


# --- GPU only ------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                         reason="needs a CUDA device and the compiled kernel (TRITON_INTERPRET unset or 0)")


@pytest.mark.gpu
@gpu
def test_cuda_call_does_not_synchronise():
    case = make_case(31, 1, 4096, 4096, 16, torch.bfloat16, "token-hard", "all", bias_tensor=True)
    gatedlora.gated_lora(**op_kwargs(case), backend="triton")  # compile outside the check
    given = make_case(32, 8, 4096, 4096, 16, torch.bfloat16, "given-hard", "75%")
    gatedlora.gated_lora(**op_kwargs(given), backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gatedlora.gated_lora(**op_kwargs(case), backend="triton")
        out_given = gatedlora.gated_lora(**op_kwargs(given), backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check_against_reference(case, out)
    check_against_reference(given, out_given)


@pytest.mark.gpu
@gpu
def test_cuda_graph_capture_follows_gate_values():
    """Capture once, then change the gate tensor in place: the replay must follow the new gates,
    which only works if the skip is decided on the device."""
    case = make_case(41, 4, 1024, 2048, 16, torch.float16, "given-hard", "all")
    gate = case["gate"]
    kwargs = op_kwargs(case)
    gatedlora.gated_lora(**kwargs, backend="triton")  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gatedlora.gated_lora(**kwargs, backend="triton")
    for step in range(3):
        new_gate = torch.rand(4, device="cuda")
        new_gate[step] = 0.0
        gate.copy_(new_gate)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(dict(case, gate=new_gate.clone(), open=new_gate >= 0.5), out)
