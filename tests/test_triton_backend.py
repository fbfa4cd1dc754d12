"""What only the triton backend has: its tile configurations, launch heuristic and launch plan, the
registered op and torch.compile, the interpreter's bf16 workarounds; with a GPU, no host sync and
CUDA-graph capture (marked ``gpu``). The accuracy sweep is tests/test_backends.py.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 and patches two bf16 defects of the interpreter, tested at the end of this file).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import gate_cases
import gatedlora
from gate_cases import bits, check_against_reference, op_kwargs
from gatedlora.ops import available_backends
from gatedlora.ops.args import make_args
from gatedlora.ops.contract import GateKind

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")

if "triton" in available_backends():
    from gatedlora.ops import triton_backend as tb

    INTERPRETED = tb.kernel_is_interpreted()
else:  # pragma: no cover - the module is skipped
    INTERPRETED = True
DEVICE = "cpu" if INTERPRETED else "cuda"


def make_case(*args, **kwargs) -> dict:
    """``gate_cases.make_case`` on this file's device (CPU under the interpreter, else CUDA)."""
    return gate_cases.make_case(*args, device=DEVICE, **kwargs)


def args_of(case: dict):
    return make_args(case["x"], case["base_out"].shape[-1], case["lora_a"], case["lora_b"], case["scaling"],
                     case.get("gate"), case.get("gate_weight"), case.get("gate_bias"), case["threshold"],
                     case["hard"])


@pytest.mark.parametrize("key", sorted(tb.TILE_CONFIGS) if "triton" in available_backends() else [], ids=str)
@pytest.mark.parametrize("n_split", (1, 2))
def test_every_tile_config(key, n_split):
    """Each one-pass tile config the heuristic can pick, with every loop taking more than one step: two K
    steps, three N tiles, a partial second row block, a rank that leaves BLOCK_R padding."""
    block_r, elt = key
    tiles = tb.TILE_CONFIGS[key]
    block_m = tiles.block_m
    dtype = torch.float32 if elt == 4 else torch.bfloat16
    m, k, n, r = block_m + 3, tiles.block_k + 37, 2 * tiles.block_n + 22, max(1, block_r - 3)
    case = make_case(block_m * 1000 + block_r * 10 + n_split, m, k, n, r, dtype, "token-hard", "75%",
                     bias_tensor=True)
    out = case["base_out"].clone()
    tb.launch(out, args_of(case), tiles=tiles, n_split=n_split)
    check_against_reference(case, out)


TWO_PASS_TILES = sorted({(tb.two_pass_tiles(m_key, r, elt), r, elt) for m_key in (1, 64) for r in (3, 16, 40, 100)
                         for elt in (2, 4)}, key=str) if "triton" in available_backends() else []


@pytest.mark.parametrize("tiles,r,elt", TWO_PASS_TILES, ids=lambda v: str(v) if isinstance(v, int) else
                         f"s{v.shrink_m}x{v.block_k}-e{v.expand_m}x{v.block_n}-R{v.block_r}")
@pytest.mark.parametrize("split_k", (1, 3))
@pytest.mark.parametrize("mode", ("given-hard", "token-soft", "none"))
def test_two_pass_every_tile_config(tiles, r, elt, split_k, mode):
    """Each two-pass tile config with every loop taking more than one step: K shares of two BLOCK_K steps
    and a partial one, a partial row block in both kernels, a partial N tile, ranks that leave BLOCK_R
    padding; the output poisoned past N and between rows."""
    dtype = torch.float32 if elt == 4 else torch.bfloat16
    m, k, n = max(tiles.shrink_m, tiles.expand_m) + 3, split_k * 2 * tiles.block_k + 37, tiles.block_n + 22
    case = make_case(tiles.block_r * 100 + split_k * 10 + elt, m, k, n, r, dtype, mode, "75%", bias_tensor=True,
                     lora_dtype=torch.float32 if elt == 4 else None)
    buffer = torch.full((m, n + 9), float("nan"), dtype=dtype, device=DEVICE)
    out = buffer[:, :n]
    out.copy_(case["base_out"])
    tb.launch_two_pass(out, args_of(case), tiles=tiles, split_k=split_k)
    assert torch.isnan(buffer[:, n:]).all(), "the expand kernel wrote past N"
    check_against_reference(case, out)


def test_two_pass_path_by_rows():
    """From TWO_PASS_FROM_ROWS rows (one row, as the H100 measured) the two passes run; a launch plan below
    it would be the one-pass kernel's."""
    assert tb.TWO_PASS_FROM_ROWS == 1
    for m in (1, 5, 64):
        assert tb.uses_two_pass(args_of(make_case(3, m, 64, 48, 8, torch.float32, "given-hard", "all")))
    launch = tb.TritonBackend().launcher(args_of(make_case(3, 1, 64, 48, 8, torch.bfloat16, "given-hard", "all")))
    assert launch.func is tb.launch_two_pass
    tiles, split_k = tb.two_pass_launch(args_of(make_case(3, 1, 4096, 48, 16, torch.bfloat16, "none")))
    assert tiles.shrink_m == 16 and split_k == 4096 // tiles.block_k  # one token: K split as far as it goes


def test_dot_precision_for_fp32_lora_weights():
    """16-bit x with fp32 LoRA weights: TF32x3 (tensor cores, about fp32 accuracy); fp32 x: IEEE; TF32 only
    where PyTorch's matmuls allow it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert tb.dot_precision(torch.bfloat16, torch.float32) == "tf32x3"
        assert tb.dot_precision(torch.float16, torch.float32) == "tf32x3"
        assert tb.dot_precision(torch.float32, torch.float32) == "ieee"
        assert tb.dot_precision(torch.bfloat16, torch.bfloat16) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert tb.dot_precision(torch.bfloat16, torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_launch_plan_never_syncs(monkeypatch):
    """The launcher turns tensors into pointers and shapes only: any read of a tensor value
    (.item(), bool(), float(), .tolist(), .cpu()) would be a host sync on a GPU."""
    case = make_case(3, 5, 64, 32, 4, torch.float16, "token-hard", "75%", bias_tensor=True)
    args = args_of(case)
    out = case["base_out"].clone()
    tiles, n_split = tb.heuristic_launch(args)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the launcher read a tensor value")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    grid, positional, keywords = tb.launch_plan(out, args, tiles, n_split)
    monkeypatch.undo()
    assert positional[6] is case["gate_bias"], "the bias must travel by pointer"
    assert grid[0] >= 1 and keywords["GATE_KIND"] == GateKind.TOKEN


def test_not_supported_reasons(monkeypatch):
    backend = tb.TritonBackend()

    def args_for(x_dtype=torch.float32, lora_dtype=None, r=4):
        a = torch.randn(r, 8, dtype=lora_dtype or x_dtype)
        return make_args(torch.randn(2, 8, dtype=x_dtype), 6, a, torch.randn(6, r, dtype=lora_dtype or x_dtype),
                         1.0, None, None, None, 0.5, True)

    assert any("float64" in reason for reason in backend.not_supported_reasons(args_for(torch.float64)))
    assert any("rank 129" in reason for reason in backend.not_supported_reasons(args_for(r=129)))
    assert not any("rank" in reason for reason in backend.not_supported_reasons(args_for(r=128)))
    reasons = backend.not_supported_reasons(args_for(lora_dtype=torch.bfloat16))
    assert any("not compiled" in reason for reason in reasons)
    monkeypatch.setattr(tb, "kernel_is_interpreted", lambda: False)
    assert any("TRITON_INTERPRET" in reason for reason in backend.not_supported_reasons(args_for()))


def test_kernel_uses_the_contracts_gate_kinds_by_name():
    """The kernel compares GATE_KIND with the contract's GateKind through named constexprs, no literals."""
    import inspect

    from gatedlora.ops import triton_kernel

    source = inspect.getsource(triton_kernel)
    assert "GATE_KIND == GATE_GIVEN" in source and "GATE_KIND == GATE_TOKEN" in source
    assert "GATE_KIND == 1" not in source and "GATE_KIND == 2" not in source
    assert (triton_kernel.GATE_GIVEN.value, triton_kernel.GATE_TOKEN.value) == (GateKind.GIVEN, GateKind.TOKEN)


def test_heuristic_matches_the_documented_examples():
    """The choice the launcher's docstring derives (bf16, r=16, K=N=4096, 132 SMs), and every rank's tile."""
    decode, split = tb.choose_launch(1, 4096, 4096, 16, 2, 2, 132)
    assert (decode.block_m, split) == (16, 32)
    for m in (1, 7, 16):
        for r, elt in ((1, 2), (16, 2), (100, 2), (128, 2), (1, 4), (64, 4)):
            tiles, split = tb.choose_launch(tb.m_bucket(m), 28672, 4096, r, 2, elt, 132)
            assert tiles in tb.TILE_CONFIGS.values() and tiles.block_r >= r
            assert 1 <= split <= triton.cdiv(28672, tiles.block_n)
    assert not tb.has_one_pass_tile(100, 4)  # fp32 weights of rank > 64: the two-pass path at every M


def test_custom_op_schema_and_fake():
    """torch.library.opcheck: schema, fake (meta) implementation and mutation declaration agree."""
    case = make_case(8, 6, 32, 24, 4, torch.float32, "given-hard", "75%")
    out = case["base_out"].clone()
    torch.library.opcheck(
        torch.ops.gatedlora.gated_lora_add_.default,
        (out, case["x"], case["lora_a"], case["lora_b"], 2.0, case["gate"], None, None, 0.5, True, "torch"),
    )
    token = make_case(9, 6, 32, 24, 4, torch.float32, "token-hard", "75%", bias_tensor=True)
    torch.library.opcheck(
        torch.ops.gatedlora.gated_lora_add_.default,
        (token["base_out"].clone(), token["x"], token["lora_a"], token["lora_b"], 2.0, None, token["gate_weight"],
         token["gate_bias"], 0.5, True, "torch"),
    )
    # The op dispatches to the backend it names.
    out = case["base_out"].clone()
    torch.ops.gatedlora.gated_lora_add_(out, case["x"], case["lora_a"], case["lora_b"], case["scaling"],
                                        case["gate"], None, None, 0.5, True, "triton")
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
def test_without_the_workaround_the_interpreted_backend_refuses_bf16(monkeypatch):
    """Outside this suite (no workaround) the interpreted kernels would return values near 1e9 for bf16: the
    triton backend refuses bf16 there with the reason, for one adapter and several, and auto runs torch."""
    import gatedlora
    from gatedlora.ops.backends import clear_dispatch_cache

    builder = _interpreter_builder()
    monkeypatch.setattr(builder, "create_dot", builder.create_dot._gatedlora_original)
    clear_dispatch_cache()
    try:
        g = torch.Generator().manual_seed(2)
        x, base = torch.randn(4, 32, generator=g).bfloat16(), torch.randn(4, 16, generator=g).bfloat16()
        a, b = torch.randn(8, 32, generator=g).bfloat16(), torch.randn(16, 8, generator=g).bfloat16()
        reason = r"bfloat16 under TRITON_INTERPRET=1: Triton's interpreter multiplies bf16 as integers"
        with pytest.raises(RuntimeError, match=reason):
            gatedlora.gated_lora(x, base, a, b, 1.0, backend="triton")
        with pytest.raises(RuntimeError, match=reason):
            gatedlora.gated_lora_multi(x, base, [a], [b], 1.0, torch.tensor([0, -1, 0, 0]), backend="triton")
        assert torch.equal(gatedlora.gated_lora(x, base, a, b, 1.0),
                           gatedlora.gated_lora(x, base, a, b, 1.0, backend="torch"))
        gatedlora.gated_lora(x.float(), base.float(), a.float(), b.float(), 1.0, backend="triton")  # fp32 runs
    finally:
        monkeypatch.undo()
        clear_dispatch_cache()


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

compiled = pytest.mark.skipif(INTERPRETED, reason="needs the compiled kernel (TRITON_INTERPRET unset or 0)")


@pytest.mark.gpu
@compiled
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
@compiled
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
