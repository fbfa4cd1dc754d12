"""The op boundary and the torch backend: argument checks, dispatch, the torch backend's strategies.
The accuracy sweep of every backend is tests/test_backends.py."""
import os

import numpy as np
import pytest
import torch

from gate_cases import bits, check_against_reference, make_case, op_kwargs
import gatedlora
from gatedlora import gated_lora
from gatedlora.ops import backends, clear_dispatch_cache, torch_backend
from gatedlora.ops.args import make_args
from gatedlora.ops.contract import GateKind
from gatedlora.reference import gated_lora_reference

def make_inputs(m, k, n, r, dtype, seed, lead=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (lead or ()) + (m,)
    x = torch.randn(*shape, k, generator=gen).to(dtype)
    base = torch.randn(*shape, n, generator=gen).to(dtype)
    a = (torch.randn(r, k, generator=gen) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=gen) / r ** 0.5).to(dtype)
    return x, base, a, b


def test_leading_dims_and_gate_shapes():
    x, base, a, b = make_inputs(5, 24, 19, 4, torch.float32, 11, lead=(2, 3))
    gate = torch.rand(2, 3, 5)
    out = gated_lora(x, base, a, b, 2.0, gate=gate)
    flat = gated_lora(x, base, a, b, 2.0, gate=gate.reshape(-1))
    assert torch.equal(out, flat)
    ref = gated_lora_reference(x, base, a, b, 2.0, gate=gate)
    assert (out.double() - ref).abs().max() < 1e-5


STRATEGIES = {"folded": torch_backend.add_folded, "gathered": torch_backend.add_gathered,
              "counted": torch_backend.add_counted}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode,fraction", [("given-hard", "none"), ("given-hard", "one"), ("given-hard", "75%"),
                                           ("given-hard", "all"), ("given-soft", "75%"), ("token-hard", "6%"),
                                           ("token-soft", "all")])
@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                              (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32"])
def test_every_strategy_against_the_reference(strategy, mode, fraction, dtype, lora_dtype):
    """Each strategy the torch backend can choose, whatever the size would choose: same contract."""
    case = make_case(len(mode) * 31 + len(fraction), 37, 50, 29, 8, dtype, mode, fraction, lora_dtype=lora_dtype)
    case["x"][(~case["open"]).nonzero().flatten()[:1]] = float("inf")  # a closed row may hold anything
    out = case["base_out"].clone()
    args = make_args(case["x"], 29, case["lora_a"], case["lora_b"], case["scaling"], case.get("gate"),
                     case.get("gate_weight"), case.get("gate_bias"), case["threshold"], case["hard"])
    STRATEGIES[strategy](out, args)
    check_against_reference(case, out)


@pytest.mark.parametrize("mode", ["given-hard", "given-soft", "token-hard"])
@pytest.mark.parametrize("fraction", ["none", "all"])
def test_one_row_strategy(mode, fraction):
    case = make_case(5, 1, 50, 29, 8, torch.float32, mode, fraction)
    out = case["base_out"].clone()
    args = make_args(case["x"], 29, case["lora_a"], case["lora_b"], case["scaling"], case.get("gate"),
                     case.get("gate_weight"), case.get("gate_bias"), case["threshold"], case["hard"])
    torch_backend.add_one_row(out, args)
    check_against_reference(case, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("threshold", [0.7, 0.9, 0.6])  # float32 of it below, below, above it
def test_a_probability_at_the_threshold_decides_alike_alone_and_in_a_batch(threshold, dtype):
    """Hard gates open where ``p >= threshold`` in the probabilities' dtype (fp32, fp64 for fp64 x): a batch
    compares a tensor with the float, so does the one-row path, which reads p on the host."""
    at = torch.tensor(threshold, dtype=dtype)
    gate = torch.stack([at, at.nextafter(torch.zeros_like(at)), at.nextafter(torch.ones_like(at)),
                        torch.tensor(threshold, dtype=torch.float32).to(dtype)])
    x, base, a, b = make_inputs(len(gate), 16, 12, 4, dtype, 41)
    batch = gated_lora(x, base, a, b, 1.5, gate=gate, threshold=threshold)
    ref = gated_lora_reference(x, base, a, b, 1.5, gate=gate, threshold=threshold)
    assert (batch.double() - ref).abs().max() < 1e-5
    for m in range(len(gate)):
        alone = gated_lora(x[m:m + 1], base[m:m + 1], a, b, 1.5, gate=gate[m:m + 1], threshold=threshold)
        opened = bool(gate[m] >= threshold)
        assert (not torch.equal(batch[m], base[m])) == opened, (m, gate[m].item())
        assert (not torch.equal(alone[0], base[m])) == opened, (m, gate[m].item())
        assert (alone[0].double() - ref[m]).abs().max() < 1e-5


def test_fp64_token_gates_take_a_float_bias_in_fp64_and_the_reference_rounds_a_given_gate_as_the_op():
    """fp64 inputs compute the gate in fp64: a Python-float bias was made an fp32 tensor (1e-9 off the fp64
    reference). And the reference compares a given fp64 gate in fp32 for fp32 inputs, as the op does."""
    x, base, a, b = make_inputs(5, 12, 7, 3, torch.float64, 41)
    weight = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(42))
    out = gated_lora(x, base, a, b, 1.0, gate_weight=weight, gate_bias=0.1, hard=False)
    ref = gated_lora_reference(x, base, a, b, 1.0, gate_weight=weight, gate_bias=0.1, hard=False)
    assert (out - ref).abs().max() < 1e-13

    x, base, a, b = make_inputs(2, 12, 7, 3, torch.float32, 43)
    gate = torch.tensor([0.5 - 1e-10, 0.5 - 1e-3], dtype=torch.float64)  # 0.5 in fp32; below 0.5
    out = gated_lora(x, base, a, b, 1.0, gate=gate)
    ref = gated_lora_reference(x, base, a, b, 1.0, gate=gate)
    assert not torch.equal(out[0], base[0]) and not torch.equal(ref[0], base[0].double())
    assert torch.equal(out[1], base[1]) and torch.equal(ref[1], base[1].double())


def test_the_host_read_gate_rule_is_the_tensor_comparison():
    """``gates.gate_is_open`` (one probability read on the host) against ``p >= threshold`` on the tensor, for
    fresh random thresholds and the fp32 and fp64 values around each one's rounding, NaN included."""
    from gatedlora.ops.gates import gate_is_open

    gen = torch.Generator().manual_seed(43)
    for threshold in torch.rand(200, generator=gen, dtype=torch.float64).clamp_min(1e-6).tolist():
        for dtype in (torch.float32, torch.float64):
            p = torch.tensor(threshold, dtype=dtype)
            values = [p, torch.tensor(float("nan"), dtype=dtype)]
            for direction in (0.0, 1.0):
                q = p
                for _ in range(3):
                    q = q.nextafter(torch.tensor(direction, dtype=dtype))
                    values.append(q)
            for value in values:
                assert gate_is_open(value, threshold, True) == bool(value >= threshold), (threshold, value.item())


@pytest.mark.parametrize("open_rows", [0, 1, 8, 133])
def test_gathered_strategy_runs_lora_on_open_rows_only(open_rows, monkeypatch):
    x, base, a, b = make_inputs(133, 40, 30, 8, torch.float32, open_rows)
    gate = torch.zeros(133)
    gate[torch.randperm(133, generator=torch.Generator().manual_seed(open_rows))[:open_rows]] = 1.0
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda t, w, *r: seen.append(t.shape[0]) or real_linear(t, w, *r))
    out = base.clone()
    torch_backend.add_gathered(out, make_args(x, 30, a, b, 1.0, gate, None, None, 0.5, True))
    assert seen == [open_rows, open_rows]  # the LoRA matmuls see the open rows only
    assert torch.equal(out[gate == 0], base[gate == 0])
    ref = gated_lora_reference(x, base, a, b, 1.0, gate=gate)
    assert (out.double() - ref).abs().max() < 1e-5


def test_strategy_is_chosen_once_per_configuration(monkeypatch):
    """M = 1 reads its gate; more rows on the CPU count the open ones; without a gate every row; off the
    CPU folded (no host read). The choice is cached per bucket of M."""
    def strategy(m, k=256, n=256, r=16, kind="given", device="cpu"):
        x = torch.empty(m, k, device=device)
        gate = torch.empty(m, device=device) if kind == "given" else None
        gate_weight = torch.empty(k, device=device) if kind == "token" else None
        args = make_args(x, n, torch.empty(r, k, device=device), torch.empty(n, r, device=device), 1.0, gate,
                         gate_weight, 0.0, 0.5, True)
        return backends.dispatch("torch", args).launch

    assert strategy(1) is torch_backend.add_one_row
    assert strategy(8) is torch_backend.add_folded
    assert strategy(32) is torch_backend.add_counted
    assert strategy(32, kind="token") is torch_backend.add_counted
    assert strategy(8, kind="none") is torch_backend.add_every_row
    assert strategy(2048, device="meta") is torch_backend.add_folded
    # an empty batch is its own entry: its choice must not stand for decode (M = 1), nor decode's for it
    for order in ((0, 1), (1, 0)):
        backends.clear_dispatch_cache()
        assert [strategy(m) is torch_backend.add_one_row for m in order] == [m == 1 for m in order]
    # the choice is cached per bucket of M, so it must not depend on M within one (9..16): either order
    for order in ((15, 16), (16, 15)):
        backends.clear_dispatch_cache()
        assert strategy(order[0]) is strategy(order[1]) is torch_backend.add_counted
    calls = []
    monkeypatch.setattr(torch_backend, "choose_strategy", lambda args: calls.append(args.m) or torch_backend.add_folded)
    backends.clear_dispatch_cache()
    strategy(20), strategy(29), strategy(31), strategy(33)
    assert calls == [20, 33]  # one choice per bucket of M (17..32, 33..64)
    backends.clear_dispatch_cache()


@pytest.mark.parametrize("opened,expected", [(0, "none"), (40, "every"), (9, "gathered"), (20, "folded")])
def test_counted_strategy_picks_by_the_open_count(opened, expected, monkeypatch):
    """Fewer than half the rows open (and M >= 16): gathered; otherwise folded; none or all: no mask at all."""
    seen = []
    for name in ("_add_every_row", "_add_gathered", "_add_folded"):
        monkeypatch.setattr(torch_backend, name, lambda *a, name=name: seen.append(name))
    x, base, a, b = make_inputs(40, 8, 6, 2, torch.float32, 0)
    gate = torch.zeros(40)
    gate[:opened] = 1.0
    torch_backend.add_counted(base, make_args(x, 6, a, b, 1.0, gate, None, None, 0.5, True))
    names = {"none": [], "every": ["_add_every_row"], "gathered": ["_add_gathered"], "folded": ["_add_folded"]}
    assert seen == names[expected]


def test_folded_strategy_keeps_closed_rows_up_to_the_sign_of_zero():
    """The folded strategy adds +0.0 to a closed row: every bit stays, except that -0.0 becomes +0.0 (the
    same number). The gathered strategy does not touch closed rows at all."""
    x, base, a, b = make_inputs(20, 8, 6, 2, torch.float32, 0)
    base[1::2] = -0.0
    gate = torch.zeros(20)
    gate[::2] = 1.0
    args = make_args(x, 6, a, b, 1.0, gate, None, None, 0.5, True)
    folded, gathered = base.clone(), base.clone()
    torch_backend.add_folded(folded, args)
    torch_backend.add_gathered(gathered, args)
    assert torch.equal(folded[1::2], base[1::2])  # equal numbers
    assert torch.equal(bits(gathered[1::2]), bits(base[1::2]))  # equal bits


def test_empty_input_and_inplace():
    x, base, a, b = make_inputs(0, 16, 12, 4, torch.float32, 0)
    assert gated_lora(x, base, a, b, 1.0, gate=torch.rand(0)).shape == (0, 12)
    # an empty tensor may come with a stride of 0 (PyTorch gives (3, 0, 1) * 3 the strides (0, 1, 0)): nothing
    # to alias, so in place is fine
    empty = torch.randn(3, 0, 1) * 3
    assert 0 in empty.stride()
    assert gated_lora(torch.randn(3, 0, 16), empty, a, torch.randn(1, 4), 1.0, inplace=True) is empty
    assert gatedlora.gated_lora_multi(torch.randn(3, 0, 16), empty, [a], [torch.randn(1, 4)], 1.0,
                                      torch.zeros(3, 0, dtype=torch.long), inplace=True) is empty
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
    clear_dispatch_cache()  # the variable is read when a configuration is first dispatched
    assert torch.equal(gated_lora(x, base, a, b, 1.0), gated_lora(x, base, a, b, 1.0, backend="torch"))
    monkeypatch.setenv("GATEDLORA_BACKEND", "fastest")
    gated_lora(x, base, a, b, 1.0)  # already dispatched under "torch": not read again
    clear_dispatch_cache()
    with pytest.raises(ValueError, match="GATEDLORA_BACKEND='fastest' is not a backend"):
        gated_lora(x, base, a, b, 1.0)
    monkeypatch.delenv("GATEDLORA_BACKEND")
    clear_dispatch_cache()
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
    backends.clear_dispatch_cache()
    x, base, a, b = make_inputs(3, 8, 8, 2, torch.float32, 0)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run these inputs: x is on cpu, needs cuda; fp64"):
        gated_lora(x, base, a, b, 1.0, backend="cuda")
    assert torch.equal(gated_lora(x, base, a, b, 1.0), gated_lora(x, base, a, b, 1.0, backend="torch"))
    monkeypatch.undo()
    backends.clear_dispatch_cache()


def test_the_choice_is_made_once_per_configuration(monkeypatch):
    """not_supported_reasons runs once per configuration, not once per call."""
    asked = []
    torch_backend_object = backends._REGISTRY["torch"]
    monkeypatch.setattr(torch_backend_object, "not_supported_reasons", lambda args: asked.append(args.m) or [])
    backends.clear_dispatch_cache()
    x, base, a, b = make_inputs(6, 8, 8, 2, torch.float32, 0)
    for _ in range(3):
        gated_lora(x, base, a, b, 1.0, backend="torch")
    gated_lora(x[:1], base[:1], a, b, 1.0, backend="torch")
    assert asked == [6, 1]
    monkeypatch.undo()
    backends.clear_dispatch_cache()


def test_gate_kind_is_one_enum_and_gate_bias_one_type():
    x = torch.randn(2, 3, 8)
    a, b = torch.randn(4, 8), torch.randn(6, 4)
    token = make_args(x, 6, a, b, 1.0, None, torch.randn(8), 0.25, 0.5, True)
    assert token.gate_kind is GateKind.TOKEN and token.x.shape == (6, 8)
    assert token.gate_bias.shape == () and float(token.gate_bias) == 0.25
    assert make_args(x, 6, a, b, 1.0, None, torch.randn(8), torch.tensor([[0.5]]), 0.5, True).gate_bias.shape == ()
    assert float(make_args(x, 6, a, b, 1.0, None, torch.randn(8), None, 0.5, True).gate_bias) == 0.0
    given = make_args(x, 6, a, b, 1.0, torch.rand(2, 3), None, 0.25, 0.5, True)
    assert given.gate_kind is GateKind.GIVEN and given.gate.shape == (6,) and given.gate_bias is None
    assert make_args(x, 6, a, b, 1.0, None, None, 0.25, 0.5, True).gate_kind is GateKind.NONE


@pytest.mark.parametrize("change,message", [
    (dict(a=torch.randn(4, 9)), r"lora_a must have shape \[r, K\] = \[r, 8\] \(K from x \[3, 8\]\), got \[4, 9\]"),
    (dict(x=torch.randn(3, 9)), r"lora_a must have shape \[r, K\] = \[r, 9\] \(K from x \[3, 9\]\), got \[4, 8\]"),
    (dict(b=torch.randn(7, 4)), r"lora_b must have shape \[N, r\] = \[6, 4\] \(N from base_out \[3, 6\]\), "
                                r"got \[7, 4\]"),
    (dict(b=torch.randn(6, 3)), r"rank mismatch: lora_a has rank 4 .* lora_b has rank 3"),
    (dict(a=torch.randn(0, 8), b=torch.randn(6, 0)), r"rank r must be at least 1"),
    (dict(base=torch.randn(5, 6)), r"base_out must have the leading dims of x, shape \[3, 'N'\], got \[5, 6\]"),
    (dict(x=torch.randn(3, 8).double()), r"x and base_out must share a dtype, got torch.float64 and torch.float32"),
    (dict(x=torch.randint(0, 3, (3, 8))), r"x must be float32, float16, bfloat16 or float64, got torch.int64"),
    (dict(a=torch.randn(4, 8).half()), r"lora_a and lora_b must share a dtype"),
    (dict(gate=torch.rand(4)), r"gate must have one value per row of x: shape \[3\], got \[4\]"),
    (dict(gate=torch.tensor([0.2, float("nan"), 1.0])), r"gate must hold probabilities in \[0, 1\]; rows \[1\]"),
    (dict(gate=torch.tensor([1.7, 0.5, -0.5])), r"rows \[0, 2\] \(of 3\) hold \[1.7.*, -0.5\]"),
    (dict(gate=torch.tensor([0.5, float("inf"), 0.5])), r"gate must hold probabilities in \[0, 1\]; rows \[1\]"),
    (dict(gate=torch.tensor([0, 1, 1])), r"gate must be a float32, float16, bfloat16 or float64 tensor"),
    (dict(gate=torch.rand(3).to(torch.float8_e4m3fn)), r"gate must be a float32, float16, bfloat16 or float64"),
    (dict(hard=None), r"hard must be a bool, got None"),
    (dict(hard=1), r"hard must be a bool, got 1"),
    (dict(inplace="yes"), r"inplace must be a bool, got 'yes'"),
    (dict(gate_weight=torch.randn(8), gate_bias=torch.zeros(2)), r"gate_bias must be a scalar .*got shape \[2\]"),
    (dict(gate_weight=torch.randn(8), gate_bias="0.5"), r"gate_bias must be a float, a one-element tensor or None"),
    (dict(gate_weight=torch.randn(8), gate_bias=float("nan")), r"gate_bias is NaN, which would close every token"),
    (dict(gate_weight=torch.randn(8), gate_bias=np.float32("nan")), r"gate_bias is NaN"),
    (dict(gate_weight=torch.randn(8), gate_bias=torch.tensor(1)), r"gate_bias must be float32, float16, bfloat16"),
    (dict(gate_weight=torch.randint(0, 2, (8,))), r"gate_weight must be float32, float16, bfloat16 or float64"),
    (dict(gate=torch.rand(3), gate_weight=torch.randn(8)), r"either gate .* or gate_weight .*, not both"),
    (dict(gate_weight=torch.randn(7)), r"gate_weight must have shape \[K\] = \[8\], got \[7\]"),
    (dict(a=torch.randn(4, 8, device="meta"), b=torch.randn(6, 4, device="meta")),
     r"lora_a is on meta but x is on cpu"),
    (dict(base=torch.randn(3, 6, device="meta")), r"base_out is on meta but x is on cpu"),
    (dict(threshold=1.5), r"threshold must be a float in \(0, 1\), above 0 in fp32, got 1.5"),
    (dict(threshold=1e-46), r"threshold must be a float in \(0, 1\), above 0 in fp32, got 1e-46"),
    (dict(scaling=float("inf")), r"scaling must be a finite Python float"),
    (dict(scaling=10 ** 400), r"scaling must be a finite Python float"),
    (dict(scaling=np.float32("inf")), r"scaling must be a finite Python float"),  # (not compared in float32)
    (dict(scaling=1e39), r"scaling 1e\+39 does not fit in the LoRA weights' dtype torch.float32 \(largest 3.4"),
    (dict(base=torch.randn(3, 6).to_sparse()), r"base_out must be a dense \(strided\) tensor, got layout torch.sparse"),
    (dict(b=torch.randn(6, 4).to_sparse()), r"lora_b must be a dense \(strided\) tensor"),
    (dict(x=torch.randn(3, 8).to_sparse_csr()), r"x must be a dense \(strided\) tensor, got layout torch.sparse_csr"),
])
def test_bad_input_is_named(change, message):
    args = dict(x=torch.randn(3, 8), base=torch.randn(3, 6), a=torch.randn(4, 8), b=torch.randn(6, 4), scaling=1.0)
    extra = {k: change.pop(k) for k in ("gate", "gate_weight", "gate_bias", "threshold", "hard", "inplace")
             if k in change}
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        gated_lora(args["x"], args["base"], args["a"], args["b"], args["scaling"], **extra)


def test_a_gate_rounded_just_above_one_is_a_probability():
    """P(any adapter), a sum of softmax classes, rounds above 1 in fp32: a soft gate of 1 + 4 * 2**-23 is 1 up to
    rounding and is taken (compared with the reference at that gate). 1.25 is not rounding; nor is bf16's next
    value after 1, 1.0078 (a bf16 gate of it would scale the LoRA term by 0.8% more than 1)."""
    x, base, a, b = torch.randn(3, 8), torch.randn(3, 6), torch.randn(4, 8), torch.randn(6, 4)
    gate = torch.tensor([0.25, 1 + 4 * 2.0 ** -23, 0.0])
    out = gated_lora(x, base, a, b, 0.5, gate=gate, hard=False)
    want = gated_lora_reference(x, base, a, b, 0.5, gate=gate, hard=False)
    assert (out.double() - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"rows \[1\] \(of 3\) hold \[1.25\]"):
        gated_lora(x, base, a, b, 0.5, gate=torch.tensor([0.25, 1.25, 0.0]), hard=False)
    bf16 = [t.bfloat16() for t in (x, base, a, b)]
    with pytest.raises(ValueError, match=r"rows \[1\] \(of 3\) hold \[1.0078125\]"):
        gated_lora(*bf16, 0.5, gate=torch.tensor([0.25, 1.0078125, 0.0], dtype=torch.bfloat16), hard=False)


def test_numpy_scalars_are_numbers():
    """scaling and threshold as NumPy scalars (a threshold swept with numpy.linspace) give what Python floats give;
    a NumPy bool is not a number."""
    import numpy as np

    x, base, a, b = torch.randn(5, 8), torch.randn(5, 6), torch.randn(4, 8), torch.randn(6, 4)
    gate = torch.tensor([0.1, 0.3, 0.31, 0.7, 0.9])
    for scaling, threshold in ((np.float32(0.75), np.float64(0.3)), (np.int64(2), np.float32(0.5))):
        want = gated_lora(x, base, a, b, float(scaling), gate=gate, threshold=float(threshold))
        assert torch.equal(bits(gated_lora(x, base, a, b, scaling, gate=gate, threshold=threshold)), bits(want))
    weight = torch.randn(8)
    token = gated_lora(x, base, a, b, 1.0, gate_weight=weight, gate_bias=np.float32(0.25))
    assert torch.equal(bits(token), bits(gated_lora(x, base, a, b, 1.0, gate_weight=weight, gate_bias=0.25)))
    with pytest.raises(ValueError, match=r"threshold must be a float in \(0, 1\), above 0 in fp32, got np.True_"):
        gated_lora(x, base, a, b, 1.0, gate=gate, threshold=np.bool_(True))


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp64", "bf16-fp32"])
@pytest.mark.parametrize("lead", [(), (3, 2)], ids=["rows", "batch"])
def test_add_lora_equals_the_op_without_a_gate(dtype, lora_dtype, lead):
    """``add_lora_`` (the layers' plain-LoRA path) writes what ``gated_lora`` without a gate returns, bit for
    bit, whether it runs the addmm directly (same dtypes) or through the op (mixed dtypes)."""
    from gatedlora.ops import add_lora_

    x, base, a, b = make_inputs(7, 40, 33, 8, dtype, 21, lead=lead)
    a, b = a.to(lora_dtype), b.to(lora_dtype)
    expected = gated_lora(x, base, a, b, 1.75, backend="torch")
    out = base.clone()
    assert add_lora_(out, x, a, b, 1.75) is out
    assert torch.equal(bits(out), bits(expected))
    ref = gated_lora_reference(x, base, a, b, 1.75)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 5e-2)
    assert (out.double() - ref).abs().max() < tolerance * ref.abs().max()


@pytest.mark.parametrize("gate", ["none", "given", "token", "bool"])
@pytest.mark.parametrize("m", [1, 6, 40])  # the torch backend's strategies by size
def test_autocast_leaves_the_op_computing_in_the_adapters_dtype(gate, m):
    """Under ``torch.autocast`` the op (and ``add_lora_``) computes as without it, forward and backward, as the
    multi-adapter op does: fp32 tensors without a gate failed (a bf16 matmul added in place into fp32)."""
    from gatedlora.ops import add_lora_

    x, base, a, b = make_inputs(m, 24, 20, 4, torch.float32, 8)
    gen = torch.Generator().manual_seed(9)
    options = {"none": {}, "given": {"gate": torch.rand(m, generator=gen)},
               "token": {"gate_weight": torch.randn(24, generator=gen), "gate_bias": 0.1},
               "bool": {"gate": torch.rand(m, generator=gen) < 0.5}}[gate]
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = gated_lora(leaves[0], base, leaves[1], leaves[2], 1.5, backend="torch", **options)
            plain = gated_lora(x, base, a, b, 1.5, backend="torch", **options)
            added = add_lora_(base.clone(), x, a, b, 1.5)
        results.append((out.detach(), plain, added, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for without, under in zip(*results):
        assert torch.equal(bits(under), bits(without))


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_takes_the_op_in_place_or_not(inplace):
    """One graph with fullgraph=True in place too (the overlap check read storage addresses, which Dynamo cannot
    trace); the compiled result and the written base_out are eager's."""
    x, base, a, b = make_inputs(6, 16, 12, 4, torch.float32, 31)
    gate = torch.rand(6, generator=torch.Generator().manual_seed(32))

    def fn(x, base):
        return torch.nn.functional.gelu(gated_lora(x, base, a, b, 1.5, gate=gate, backend="torch", inplace=inplace))

    torch._dynamo.reset()
    eager_base, compiled_base = base.clone(), base.clone()
    with torch.no_grad():
        eager = fn(x, eager_base)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, compiled_base)
    assert torch.equal(compiled, eager) and torch.equal(compiled_base, eager_base)
    assert torch.equal(eager_base, base) != inplace


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mode", ["given-soft", "token-hard"])
def test_torch_compile_with_dynamic_shapes_keeps_one_graph(mode, inplace):
    """dynamic=True makes a float read from a container (the case's scaling and threshold) and the strides
    symbolic: the argument checks must trace with them (math.isfinite did not, nor sorting the strides for the
    in-place overlap check). Two row counts, each against the fp64 reference."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda case: gated_lora(**op_kwargs(case), backend="torch", inplace=inplace),
                             fullgraph=True, dynamic=True, backend="eager")
    for seed, m in ((51, 5), (52, 9)):
        case = make_case(seed, m, 16, 12, 4, torch.float32, mode, "75%")
        before = case["base_out"].clone()
        with torch.no_grad():
            out = compiled(case)
        check_against_reference(case, out, before)
        assert (out is case["base_out"]) == inplace


def test_under_torch_compile_a_nan_gate_closes_its_row():
    """A compiled graph cannot raise on a value, so the CPU's check of a given gate is skipped there (README): a NaN
    gate closes its row, as on a GPU: the result is eager's with that gate 0."""
    x, base, a, b = make_inputs(4, 16, 12, 4, torch.float32, 53)
    gate = torch.tensor([float("nan"), 0.3, 0.9, 0.6])
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(lambda x, g: gated_lora(x, base, a, b, 1.5, gate=g, backend="torch"), fullgraph=True,
                            backend="eager")(x, gate)
        eager = gated_lora(x, base, a, b, 1.5, gate=gate.nan_to_num(0.0), backend="torch")  # row 0 closed
    assert torch.equal(bits(out[0]), bits(base[0]))
    assert torch.equal(out, eager)


@pytest.mark.parametrize("view", [False, True])
@pytest.mark.parametrize("multi", [False, True])
def test_compiled_in_place_calls_that_autograd_records_match_eager(multi, view):
    """With autograd: an in-place call on an intermediate base_out compiles as one graph (fullgraph=True). One on a
    base_out autograd refuses to modify (one of chunk's views) returns a new tensor in eager; compiled, the graph
    breaks at that check, with eager's values and gradients (it raised inside the compiled copy path)."""
    x, base, a, b = make_inputs(6, 16, 12, 4, torch.float32, 61)
    gate = torch.rand(6, generator=torch.Generator().manual_seed(62))

    def fn(x, a, b, source):
        base_out = (source * 1.0).chunk(2, dim=1)[0] if view else source[:, :12] * 1.0
        if multi:
            index = torch.tensor([0, -1, 0, 0, -1, 0])
            y = gatedlora.gated_lora_multi(x, base_out, [a], [b], [1.5], index, backend="torch", inplace=True)
        else:
            y = gated_lora(x, base_out, a, b, 1.5, gate=gate, backend="torch", inplace=True)
        return torch.nn.functional.gelu(y)

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in (x, a, b, torch.cat([base, base], dim=1))]
        y = (torch.compile(fn, backend="aot_eager", fullgraph=not view) if compiled else fn)(*leaves)
        results.append((y.detach(), *torch.autograd.grad(y.sum(), leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-5)  # fp32; aot_eager may reorder


def test_the_ops_run_on_the_meta_device():
    """Shapes only, as a model built on the meta device needs (the autocast check asked about "meta" and raised)."""
    from gatedlora.ops import add_lora_

    x, base, a, b = (t.to("meta") for t in make_inputs(4, 16, 12, 4, torch.float32, 51))
    assert gated_lora(x, base, a, b, 1.0).shape == (4, 12)
    assert gated_lora(x, base, a, b, 1.0, gate_weight=torch.randn(16, device="meta")).shape == (4, 12)
    assert add_lora_(base, x, a, b, 1.0) is base
    index = torch.zeros(4, dtype=torch.long, device="meta")
    assert gatedlora.gated_lora_multi(x, base, [a], [b], 1.0, index).shape == (4, 12)


def test_add_lora_takes_the_op_where_the_direct_add_does_not_apply(monkeypatch):
    """A non-contiguous out, no rows, K = 0, another backend named or set by GATEDLORA_BACKEND: the op runs
    (and gets the answer right)."""
    import importlib

    from gatedlora.ops import add_lora_

    op_module = importlib.import_module("gatedlora.ops.gated_lora")  # (the package's name is the function)

    calls = []
    real = op_module.gated_lora
    monkeypatch.setattr(op_module, "gated_lora", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    x, base, a, b = make_inputs(6, 16, 12, 4, torch.float32, 5)
    expected = gated_lora(x, base, a, b, 0.5, backend="torch")
    strided = base.t().contiguous().t()  # the same values, column-major
    add_lora_(strided, x, a, b, 0.5)
    # (not bitwise the row-major result: MKL rounds a column-major out differently on some CPUs, an AMD EPYC here)
    assert calls == ["auto"]
    assert (strided.double() - gated_lora_reference(x, base, a, b, 0.5)).abs().max() < 1e-5
    for rows, k in ((0, 16), (6, 0)):
        x0, base0, a0, b0 = make_inputs(rows, k, 12, 4, torch.float32, 6)
        out = base0.clone()
        add_lora_(out, x0, a0, b0, 0.5)
        assert torch.equal(bits(out), bits(base0))  # nothing to add: no write (a -0.0 stays -0.0)
    assert len(calls) == 3
    calls.clear()
    direct = base.clone()
    add_lora_(direct, x, a, b, 0.5)
    assert calls == [] and torch.equal(direct, expected)
    if "triton" in backends.available_backends() and os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors
        monkeypatch.setenv(backends.ENV_VAR, "triton")
        clear_dispatch_cache()
        try:
            out = base.clone()
            add_lora_(out, x, a, b, 0.5)
            assert calls == ["auto"]
            assert (out.double() - gated_lora_reference(x, base, a, b, 0.5)).abs().max() < 1e-5
        finally:
            monkeypatch.delenv(backends.ENV_VAR)
            clear_dispatch_cache()
    with pytest.raises(ValueError, match="backend must be one of"):
        add_lora_(base.clone(), x, a, b, 0.5, backend="tritonn")
