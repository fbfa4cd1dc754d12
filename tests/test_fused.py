"""``gated_lora_fused`` (ops/fused.py): exact mode wherever no backend with a fused kernel can run, and
why; gradients, the warning, the registered op and torch.compile; with a CUDA device (marked ``gpu``)
the one-pass decode GEMV against the fp64 reference, without host sync, in CUDA graphs."""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import gatedlora
from gate_cases import bits, check_fused, fused_kwargs, make_case, op_kwargs
from gatedlora.ops import fused_fallback_reason, gated_lora_fused
from gatedlora.ops import fused as fused_module

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,fraction", [("given-hard", "75%"), ("given-soft", "all"), ("token-hard", "6%"),
                                           ("none", "all")])
def test_fused_falls_back_to_exact_mode_on_cpu(mode, fraction, dtype):
    seed = zlib.crc32(f"fused/{mode}/{dtype}".encode())
    case = make_case(seed, 37, 113, 59, 8, dtype, mode, fraction, bias_tensor=seed % 2 == 0, linear=True)
    reason = fused_fallback_reason(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                   case.get("gate"), case.get("gate_weight"), case.get("gate_bias", 0.0))
    assert reason is not None and ("no CUDA device" in reason or "tensors are on cpu" in reason)
    assert "more than 16 rows (the one-pass GEMV serves decode)" in reason
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
        "backend 'triton' was asked for, and only cuda has a fused kernel")
    assert "x dtype torch.float64 is not supported" in fused_fallback_reason(x.double(), w.double(), b.double(), a, bb)
    assert "weight has stride 8 along K" in fused_fallback_reason(x, torch.zeros(16, 8).t(), b, a, bb)
    assert fused_fallback_reason(x[:0], w, b, a, bb) == "the input has no rows or no output features"
    assert "inputs require grad" in fused_fallback_reason(x, w.clone().requires_grad_(), b, a, bb)


def test_an_empty_batch_is_not_kept_as_the_decode_choice():
    """M = 0 and M = 1 share a bucket of the dispatch cache: an empty batch's "no rows" was served to every
    decode call after it (on a GPU: no fused kernel for decode), and decode's choice to the empty batch."""
    from gatedlora.ops.backends import clear_dispatch_cache

    case = make_case(6, 1, 16, 8, 4, torch.float32, "none", linear=True)
    x, w, b, a, bb = case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"]
    clear_dispatch_cache()
    decode = fused_fallback_reason(x, w, b, a, bb)
    assert decode != "the input has no rows or no output features"
    assert fused_fallback_reason(x[:0], w, b, a, bb) == "the input has no rows or no output features"
    assert fused_fallback_reason(x, w, b, a, bb) == decode
    clear_dispatch_cache()
    assert fused_fallback_reason(x[:0], w, b, a, bb) == "the input has no rows or no output features"
    assert fused_fallback_reason(x, w, b, a, bb) == decode
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'bogus'"):  # whatever the shape
        fused_fallback_reason(x[:0], w, b, a, bb, backend="bogus")


def test_fallback_reason_is_computed_once_per_configuration(monkeypatch):
    """The layer path asks gated_lora_fused once per call; the backend's reasons run once per configuration."""
    from gatedlora.ops import backends

    cuda = backends._REGISTRY["cuda"]
    asked = []
    real = cuda.fused_reasons
    monkeypatch.setattr(cuda, "fused_reasons", lambda *a: asked.append(1) or real(*a))
    backends.clear_dispatch_cache()
    case = make_case(8, 3, 16, 8, 4, torch.float32, "given-hard", "75%", linear=True)
    for _ in range(3):
        gated_lora_fused(**fused_kwargs(case))
    assert fused_fallback_reason(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                                 gate=case["gate"]) is not None
    assert asked == [1]
    monkeypatch.undo()
    backends.clear_dispatch_cache()


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
        (case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], 2.0, case["gate"], None, None,
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

FUSED_CASES = [(m, k, n, r, mode) for m, k, n, r, mode in (
    (1, 4096, 4096, 16, "given-hard"), (1, 113, 203, 4, "token-hard"), (2, 1000, 59, 64, "none"),
    (4, 2048, 600, 16, "given-soft"), (5, 203, 113, 1, "token-soft"), (16, 4096, 1000, 128, "token-hard"),
    (16, 59, 33, 8, "given-hard"))]


@pytest.mark.gpu
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
def test_gpu_fused_all_closed_and_fp32_lora():
    closed = make_case(51, 3, 512, 256, 16, torch.bfloat16, "given-hard", "none", device="cuda", linear=True)
    with torch.no_grad():
        check_fused(closed, gated_lora_fused(**fused_kwargs(closed)))
    mixed = make_case(52, 8, 520, 130, 16, torch.float16, "token-hard", "75%", lora_dtype=torch.float32,
                      device="cuda", linear=True)
    with torch.no_grad():
        check_fused(mixed, gated_lora_fused(**fused_kwargs(mixed)))
