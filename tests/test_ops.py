"""gated_lora (torch backend) against the fp64 reference: gate modes, dtypes, odd shapes, bad input."""
import pytest
import torch

from gatedlora import gated_lora
from gatedlora.ops import backends
from gatedlora.reference import gate_probabilities_reference, gate_values_reference, gated_lora_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
POISON = {torch.float32: float("nan"), torch.float16: float("nan"), torch.bfloat16: float("nan")}


def make_inputs(m, k, n, r, dtype, seed, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (lead or ()) + (m,)
    x = torch.randn(*shape, k, generator=gen).to(dtype)
    base = torch.randn(*shape, n, generator=gen).to(dtype)
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=gen) / r ** 0.5).to(dtype)
    return x, base, a, b


def gate_kwargs(mode, x, seed):
    gen = torch.Generator().manual_seed(seed + 7)
    rows = x.shape[:-1]
    if mode == "given":
        return {"gate": torch.rand(rows, generator=gen)}
    if mode == "token":
        return {"gate_weight": torch.randn(x.shape[-1], generator=gen) / x.shape[-1] ** 0.5, "gate_bias": 0.1}
    return {}


def same_dtype_error(x, base, a, b, s, kw, hard):
    """Error of the same computation done in PyTorch at the inputs' dtype (flash-attention's yardstick)."""
    m = x.reshape(-1, x.shape[-1])
    delta = (m @ a.T) @ b.T * s
    g = gate_values_reference(gate_probabilities_reference(x, **kw, dtype=torch.float32), 0.5, hard)
    if g is not None:
        delta = delta * g[:, None].to(delta.dtype)
    out = base.reshape(-1, base.shape[-1]) + delta
    ref = gated_lora_reference(x, base, a, b, s, **kw, hard=hard).reshape(out.shape)
    return (out.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["given", "token", "none"])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("m,k,n,r", [(1, 33, 45, 4), (7, 50, 21, 16), (133, 70, 113, 8)])
def test_matches_fp64_reference(dtype, mode, hard, m, k, n, r):
    seed = hash((str(dtype), mode, hard, m)) % 10_000
    x, base, a, b = make_inputs(m, k, n, r, dtype, seed)
    kw = gate_kwargs(mode, x, seed)
    out = gated_lora(x, base, a, b, 1.7, hard=hard, backend="torch", **kw)
    ref = gated_lora_reference(x, base, a, b, 1.7, hard=hard, **kw)
    assert out.dtype == dtype and out.shape == base.shape
    err = (out.double() - ref).abs().max().item()
    floor = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert err <= 2 * same_dtype_error(x, base, a, b, 1.7, kw, hard) + floor
    g = gate_values_reference(gate_probabilities_reference(x, **kw), 0.5, hard)
    if g is not None:
        closed = g == 0
        assert torch.equal(out[closed], base[closed])  # bitwise
        if mode == "given" and hard:
            assert 0 < int(closed.sum()) < m or m < 3


def test_leading_dims_and_gate_shapes():
    x, base, a, b = make_inputs(5, 24, 19, 4, torch.float32, 11, lead=(2, 3))
    gate = torch.rand(2, 3, 5)
    out = gated_lora(x, base, a, b, 2.0, gate=gate)
    flat = gated_lora(x, base, a, b, 2.0, gate=gate.reshape(-1))
    assert torch.equal(out, flat)
    ref = gated_lora_reference(x, base, a, b, 2.0, gate=gate)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("open_rows", [0, 1, 8, 100, 133])
def test_skip_branch_runs_lora_on_open_rows_only(open_rows, monkeypatch):
    x, base, a, b = make_inputs(133, 40, 30, 8, torch.float32, open_rows)
    gate = torch.zeros(133)
    gate[torch.randperm(133)[:open_rows]] = 1.0
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda t, w, *r: seen.append(t.shape[0]) or real_linear(t, w, *r))
    out = gated_lora(x, base, a, b, 1.0, gate=gate, backend="torch")
    assert seen == ([] if open_rows == 0 else [open_rows, open_rows])  # LoRA matmuls see only the open rows
    assert torch.equal(out[gate == 0], base[gate == 0])
    ref = gated_lora_reference(x, base, a, b, 1.0, gate=gate)
    assert (out.double() - ref).abs().max() < 1e-5


def test_empty_input_and_inplace():
    x, base, a, b = make_inputs(0, 16, 12, 4, torch.float32, 0)
    assert gated_lora(x, base, a, b, 1.0, gate=torch.rand(0)).shape == (0, 12)
    x, base, a, b = make_inputs(6, 16, 12, 4, torch.float32, 1)
    keep = base.clone()
    out = gated_lora(x, base, a, b, 1.0)
    assert torch.equal(base, keep) and out is not base  # not in place by default
    out2 = gated_lora(x, base, a, b, 1.0, inplace=True)
    assert out2 is base and torch.equal(out2, out)


def test_non_contiguous_inputs_and_lora_dtype_like_peft():
    x, base, a, b = make_inputs(9, 32, 20, 4, torch.float32, 3)
    xt = x.T.contiguous().T  # same values, column-major
    bt = base.T.contiguous().T
    gate = torch.rand(9)
    out = gated_lora(xt, bt, a, b, 0.5, gate=gate, inplace=True)
    assert out is bt
    assert (out.double() - gated_lora_reference(x, base, a, b, 0.5, gate=gate)).abs().max() < 1e-5
    # fp32 activations with bf16 LoRA weights: x is cast to bf16 as PEFT does, result stored in fp32
    out = gated_lora(x, base, a.bfloat16(), b.bfloat16(), 0.5)
    want = base + (x.bfloat16() @ a.bfloat16().T @ b.bfloat16().T) * 0.5
    assert out.dtype == torch.float32 and torch.equal(out, want)


def test_backend_selection_and_env_override(monkeypatch):
    x, base, a, b = make_inputs(3, 8, 8, 2, torch.float32, 0)
    monkeypatch.setenv("GATEDLORA_BACKEND", "torch")
    assert torch.equal(gated_lora(x, base, a, b, 1.0), gated_lora(x, base, a, b, 1.0, backend="torch"))
    monkeypatch.setenv("GATEDLORA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="GATEDLORA_BACKEND='fastest' is not a backend"):
        gated_lora(x, base, a, b, 1.0)
    monkeypatch.delenv("GATEDLORA_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        gated_lora(x, base, a, b, 1.0, backend="tpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: .*no CUDA device"):
        gated_lora(x, base, a, b, 1.0, backend="cuda")


def test_explicit_backend_lists_its_reasons(monkeypatch):
    class Picky(backends.Backend):
        name = "cuda"

        def not_supported_reasons(self, args):
            return ["x is on cpu, needs cuda", "fp64 is not supported"]

    monkeypatch.setitem(backends._REGISTRY, "cuda", Picky())
    x, base, a, b = make_inputs(3, 8, 8, 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: x is on cpu, needs cuda; fp64"):
        gated_lora(x, base, a, b, 1.0, backend="cuda")
    assert torch.equal(gated_lora(x, base, a, b, 1.0), gated_lora(x, base, a, b, 1.0, backend="torch"))


@pytest.mark.parametrize("change,message", [
    (dict(a=torch.randn(4, 9)), r"lora_a must have shape \[r, K\] = \[r, 8\], got \[4, 9\]"),
    (dict(b=torch.randn(7, 4)), r"lora_b must have shape \[N, r\] = \[6, 4\], got \[7, 4\]"),
    (dict(b=torch.randn(6, 3)), r"rank mismatch: lora_a has rank 4 .* lora_b has rank 3"),
    (dict(a=torch.randn(0, 8), b=torch.randn(6, 0)), r"rank r must be at least 1"),
    (dict(base=torch.randn(5, 6)), r"base_out must have the leading dims of x, shape \[3, 'N'\], got \[5, 6\]"),
    (dict(x=torch.randn(3, 8).double()), r"x and base_out must share a dtype, got torch.float64 and torch.float32"),
    (dict(x=torch.randint(0, 3, (3, 8))), r"x must be float32, float16, bfloat16 or float64, got torch.int64"),
    (dict(a=torch.randn(4, 8).half()), r"lora_a and lora_b must share a dtype"),
    (dict(gate=torch.rand(4)), r"gate must have one value per row of x: shape \[3\] or \[3\], got \[4\]"),
    (dict(gate=torch.tensor([0.2, float("nan"), 1.0])), r"gate contains NaN at rows \[1\]"),
    (dict(gate=torch.rand(3), gate_weight=torch.randn(8)), r"either gate .* or gate_weight .*, not both"),
    (dict(gate_weight=torch.randn(7)), r"gate_weight must have shape \[K\] = \[8\], got \[7\]"),
    (dict(a=torch.randn(4, 8, device="meta"), b=torch.randn(6, 4, device="meta")),
     r"lora_a is on meta but x is on cpu"),
    (dict(threshold=1.5), r"threshold must be a float in \(0, 1\), got 1.5"),
    (dict(scaling=float("inf")), r"scaling must be a finite Python float"),
])
def test_bad_input_is_named(change, message):
    args = dict(x=torch.randn(3, 8), base=torch.randn(3, 6), a=torch.randn(4, 8), b=torch.randn(6, 4), scaling=1.0)
    extra = {k: change.pop(k) for k in ("gate", "gate_weight", "threshold") if k in change}
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        gated_lora(args["x"], args["base"], args["a"], args["b"], args["scaling"], **extra)
