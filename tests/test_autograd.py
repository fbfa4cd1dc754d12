"""Gradients of gated_lora: gradcheck, closed rows, straight-through hard gates, every backend."""
import pytest
import torch

import gatedlora
from gatedlora import gated_lora
from gatedlora.ops import available_backends
from gatedlora.ops.autograd import lora_backward
from gatedlora.reference import gated_lora_reference

SCALING = 1.5
FP64 = torch.float64


def make_inputs(shape=(2, 3), k=7, n=5, r=3, dtype=FP64, seed=0, bias_tensor=True, device="cpu"):
    """Leaf tensors for one call: x [*shape, K], base [*shape, N], A [r, K], B [N, r], a given gate
    [*shape] and a token gate (w [K], b). Probabilities stay at least 0.05 away from the threshold 0.5,
    so no finite-difference step (1e-6) or rounding flips a hard gate."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    gate = torch.rand(shape, generator=gen, dtype=dtype) * 0.4
    gate = torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.5, gate + 0.55, gate + 0.05)
    x = rand(*shape, k)
    w = rand(k)
    bias = 0.1
    logits = x @ w + bias
    keep_away = torch.where(logits.abs() < 0.3, torch.sign(logits + 1e-9) * 0.3 - logits, torch.zeros_like(logits))
    base = rand(*shape, n)
    # move the rows whose token-gate logit is near 0 along w until it is at least 0.3 away
    x = x + keep_away[..., None] * w / (w @ w)
    values = dict(x=x, base_out=base, lora_a=rand(r, k), lora_b=rand(n, r), gate=gate, gate_weight=w,
                  gate_bias=torch.tensor(bias, dtype=dtype) if bias_tensor else bias)
    assert ((torch.sigmoid(values["x"] @ w + bias) - 0.5).abs() > 0.05).all()
    return {key: v.to(device).requires_grad_() if isinstance(v, torch.Tensor) else v for key, v in values.items()}


GATE_KINDS = {
    "plain": ("x", "base_out", "lora_a", "lora_b"),
    "given": ("x", "base_out", "lora_a", "lora_b", "gate"),
    "token": ("x", "base_out", "lora_a", "lora_b", "gate_weight", "gate_bias"),
}


def op(inputs, kind, names, **options):
    """gated_lora as a function of the tensors named in ``names`` (what gradcheck perturbs)."""
    fixed = {k: inputs[k] for k in GATE_KINDS[kind] if k not in names}
    if kind == "token" and not isinstance(inputs["gate_bias"], torch.Tensor):
        fixed["gate_bias"] = inputs["gate_bias"]

    def fn(*tensors):
        kwargs = {**fixed, **dict(zip(names, tensors))}
        return gated_lora(scaling=SCALING, **kwargs, **options)

    return fn


@pytest.mark.parametrize("kind,hard", [("plain", False), ("given", False), ("token", False), ("given", True),
                                       ("token", True)])
def test_gradcheck_torch_backend_fp64(kind, hard):
    """Soft gates: the exact derivative. Hard gates (no straight-through): the forward is piecewise
    constant in the gate, so the gate's true derivative is 0 away from the threshold, which the
    backward must report (as None or zeros)."""
    inputs = make_inputs()
    names = [k for k in GATE_KINDS[kind]]
    fn = op(inputs, kind, names, hard=hard, backend="torch")
    assert torch.autograd.gradcheck(fn, [inputs[k] for k in names])


def test_gradcheck_float_gate_bias_and_flat_gate():
    """gate_bias as a Python float, and a gate given flat [M] for x [2, 3, K]."""
    inputs = make_inputs(bias_tensor=False)
    names = ["x", "lora_a", "lora_b", "gate_weight"]
    assert torch.autograd.gradcheck(op(inputs, "token", names, hard=False, backend="torch"),
                                    [inputs[k] for k in names])
    flat = inputs["gate"].detach().reshape(-1).requires_grad_()
    fn = lambda x, g: gated_lora(x, inputs["base_out"], inputs["lora_a"], inputs["lora_b"], SCALING,  # noqa: E731
                                 gate=g, hard=False, backend="torch")
    assert torch.autograd.gradcheck(fn, [inputs["x"], flat])


def grads_of(fn, inputs, names, seed=7):
    """Gradients of <fn(...), R> for a fixed random R, w.r.t. ``names`` (None where there is none)."""
    for name in names:
        inputs[name].grad = None
    out = fn(*[inputs[k] for k in names])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    (out * weights).sum().backward()
    return {k: None if inputs[k].grad is None else inputs[k].grad.clone() for k in names}


@pytest.mark.parametrize("kind", ["given", "token"])
def test_straight_through_gate_gradient_equals_the_soft_one(kind):
    """Forward hard, backward as soft: the gate inputs get exactly the soft gate's gradient, and every
    input gets the gradient of ``g = p + (hard(p) - p).detach()`` in the fp64 oracle."""
    inputs = make_inputs()
    names = list(GATE_KINDS[kind])
    ste = grads_of(op(inputs, kind, names, hard=True, straight_through=True, backend="torch"), inputs, names)
    soft = grads_of(op(inputs, kind, names, hard=False, backend="torch"), inputs, names)
    no_ste = grads_of(op(inputs, kind, names, hard=True, backend="torch"), inputs, names)

    def oracle(*tensors):
        v = dict(zip(names, tensors))
        rows = v["x"].reshape(-1, v["x"].shape[-1])
        p = v["gate"].reshape(-1) if kind == "given" else torch.sigmoid(rows @ v["gate_weight"] + v["gate_bias"])
        g = p + ((p >= 0.5).to(p.dtype) - p).detach()
        delta = (rows @ v["lora_a"].T) @ v["lora_b"].T * SCALING
        return (v["base_out"].reshape(delta.shape) + g[:, None] * delta).reshape(v["base_out"].shape)

    expected = grads_of(oracle, inputs, names)
    gate_names = ["gate"] if kind == "given" else ["gate_weight", "gate_bias"]
    for name in gate_names:
        torch.testing.assert_close(ste[name], soft[name], rtol=1e-12, atol=1e-12)
        assert no_ste[name] is None
    for name in names:
        torch.testing.assert_close(ste[name], expected[name], rtol=1e-12, atol=1e-12)


def test_straight_through_equals_soft_when_gates_are_zero_or_one():
    inputs = make_inputs()
    with torch.no_grad():
        inputs["gate"].copy_((inputs["gate"] > 0.5).to(FP64))
    names = list(GATE_KINDS["given"])
    ste = grads_of(op(inputs, "given", names, hard=True, straight_through=True, backend="torch"), inputs, names)
    soft = grads_of(op(inputs, "given", names, hard=False, backend="torch"), inputs, names)
    for name in names:
        torch.testing.assert_close(ste[name], soft[name], rtol=1e-12, atol=1e-12)


def test_closed_rows_give_no_lora_gradient():
    inputs = make_inputs(shape=(9,))
    open_rows = inputs["gate"].detach() >= 0.5
    assert 0 < int(open_rows.sum()) < 9
    names = ["x", "lora_a", "lora_b"]
    fn = op(inputs, "given", names, hard=True, backend="torch")
    got = grads_of(fn, inputs, names)
    assert torch.count_nonzero(got["x"][~open_rows]) == 0
    # the same call on the open rows alone gives the same weight gradients
    sub = {k: (v.detach()[open_rows] if k in ("x", "base_out", "gate") else v.detach()).requires_grad_()
           for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    weights = torch.randn((9, 5), generator=torch.Generator().manual_seed(7), dtype=FP64)
    out = gated_lora(sub["x"], sub["base_out"], sub["lora_a"], sub["lora_b"], SCALING, gate=sub["gate"],
                     backend="torch")
    (out * weights[open_rows]).sum().backward()
    torch.testing.assert_close(got["lora_a"], sub["lora_a"].grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got["lora_b"], sub["lora_b"].grad, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got["x"][open_rows], sub["x"].grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("straight_through", [False, True])
def test_all_gates_closed_lora_weights_get_exactly_zero(straight_through):
    inputs = make_inputs()
    with torch.no_grad():
        inputs["gate"].mul_(0.0).add_(0.2)
    names = list(GATE_KINDS["given"])
    out = op(inputs, "given", names, hard=True, straight_through=straight_through, backend="torch")(
        *[inputs[k] for k in names])
    assert torch.equal(out, inputs["base_out"])
    out.sum().backward()
    assert torch.count_nonzero(inputs["lora_a"].grad) == 0 and torch.count_nonzero(inputs["lora_b"].grad) == 0
    assert torch.count_nonzero(inputs["x"].grad) == 0
    # straight-through: closed gates still learn (their gradient is <go, delta>, not 0)
    assert (inputs["gate"].grad is not None and torch.count_nonzero(inputs["gate"].grad) == 6) == straight_through


@pytest.mark.parametrize("hard", [False, True])
def test_row_selection_and_masking_agree(hard):
    """The CPU path leaves closed rows out of the matmuls; other devices multiply them by 0."""
    inputs = make_inputs(shape=(11,))
    args = {k: inputs[k].detach() for k in ("x", "lora_a", "lora_b", "gate")}
    go = torch.randn(11, 5, dtype=FP64)
    picked = lora_backward(go, args["x"], args["lora_a"], args["lora_b"], SCALING, args["gate"], None, None, 0.5,
                           hard, gate_grad=True, select_rows=True)
    masked = lora_backward(go, args["x"], args["lora_a"], args["lora_b"], SCALING, args["gate"], None, None, 0.5,
                           hard, gate_grad=True, select_rows=False)
    assert picked.keys() == masked.keys() == {"x", "lora_a", "lora_b", "gate"}
    for name in picked:
        torch.testing.assert_close(picked[name], masked[name], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("select_rows", [True, False])
def test_inf_in_a_closed_row_leaves_the_lora_gradients_finite(select_rows):
    """A closed row of x holding inf gives the LoRA weights no gradient: both backward paths (rows left
    out on the CPU, rows zeroed elsewhere and under compile) give the gradients of the open rows alone."""
    inputs = make_inputs(shape=(11,))
    gate = inputs["gate"].detach()
    x = inputs["x"].detach().clone()
    closed = (gate < 0.5).nonzero().flatten()
    x[closed[0]] = float("inf")
    x[closed[-1], 2] = float("nan")
    go = torch.randn(11, 5, dtype=FP64)
    got = lora_backward(go, x, inputs["lora_a"].detach(), inputs["lora_b"].detach(), SCALING, gate, None, None, 0.5,
                        True, gate_grad=False, select_rows=select_rows)
    clean = torch.where((gate >= 0.5)[:, None], x, torch.zeros_like(x))
    want = lora_backward(go, clean, inputs["lora_a"].detach(), inputs["lora_b"].detach(), SCALING, gate, None, None,
                         0.5, True, gate_grad=False, select_rows=True)
    for name in ("lora_a", "lora_b", "x"):
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind", ["plain", "given", "token"])
def test_double_backward_through_soft_gates(kind):
    """create_graph=True: the gradients are themselves differentiable (gradient penalties, gradgradcheck),
    the gate included: d/dgate of dL/dA is the right second derivative, not None."""
    inputs = make_inputs(shape=(4,), k=5, n=3, r=2)
    names = list(GATE_KINDS[kind])
    fn = op(inputs, kind, names, hard=False, backend="torch")
    assert torch.autograd.gradgradcheck(fn, [inputs[k] for k in names])
    if kind == "given":
        out = fn(*[inputs[k] for k in names])
        (grad_a,) = torch.autograd.grad(out.square().sum(), inputs["lora_a"], create_graph=True)
        (second,) = torch.autograd.grad(grad_a.sum(), inputs["gate"])
        assert second is not None and torch.count_nonzero(second) > 0


def test_double_backward_of_a_hard_gate_matches_the_soft_formula_it_stands_for():
    """Straight-through gradients are not derivatives of the forward (no finite difference can check
    them); their second derivatives are those of ``g = p + (hard(p) - p).detach()``, the fp64 oracle."""
    inputs = make_inputs(shape=(4,), k=5, n=3, r=2)
    x, a, b, base, gate = (inputs[k] for k in ("x", "lora_a", "lora_b", "base_out", "gate"))

    def second(fn):
        (grad_a,) = torch.autograd.grad(fn().square().sum(), a, create_graph=True)
        return torch.autograd.grad(grad_a.square().sum(), [x, gate, b])

    ours = second(lambda: gated_lora(x, base, a, b, SCALING, gate=gate, hard=True, straight_through=True))

    def oracle():
        g = gate + ((gate >= 0.5).to(gate.dtype) - gate).detach()
        return base + g[..., None] * ((x @ a.T) @ b.T) * SCALING

    for got, want in zip(ours, second(oracle)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_nan_probability_closes_the_gate_and_passes_no_gradient():
    inputs = make_inputs()
    with torch.no_grad():
        inputs["gate_bias"].fill_(float("nan"))
    names = list(GATE_KINDS["token"])
    out = op(inputs, "token", names, hard=False, backend="torch")(*[inputs[k] for k in names])
    assert torch.equal(out, inputs["base_out"])
    out.sum().backward()
    for name in names:
        grad = inputs[name].grad
        expected = torch.ones_like(grad) if name == "base_out" else torch.zeros_like(grad)
        assert torch.equal(grad, expected), name


def reference_grads(inputs, names, go, **options):
    """Gradients of the fp64 reference w.r.t. ``names``, for ``inputs`` and the output gradient ``go``."""
    leaves = {k: inputs[k].detach().double().requires_grad_() for k in names}
    fixed = {k: v for k, v in inputs.items() if k not in leaves and k in GATE_KINDS["token"]}
    out = gated_lora_reference(**leaves, **fixed, scaling=SCALING, **options)
    return dict(zip(names, torch.autograd.grad(out, list(leaves.values()), go.double())))


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu", "as-on-a-gpu"])
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_a_token_gate_row_whose_x_is_not_finite_passes_no_gate_gradient(poison, host_reads, monkeypatch):
    """A row of x holding NaN (p NaN) or inf (p 0 or 1, sigmoid' 0) passes nothing on to the gate's weight and
    bias, nor, where its gate is closed, to the LoRA weights: those gradients are the other rows' alone (0 * NaN
    used to make dL/dw_g NaN). Both of the backward's paths: what the CPU runs, and what a GPU or torch.compile
    runs."""
    inputs = make_inputs(shape=(9,), dtype=torch.float32, seed=3)
    x = inputs["x"].detach().clone()
    w = inputs["gate_weight"].detach()
    x[4] = float(poison) * (torch.sign(w) if poison != "nan" else 1)  # a logit of +-inf (p exactly 1 or 0), or NaN
    go = torch.randn(9, 5)
    args = (x, inputs["lora_a"].detach(), inputs["lora_b"].detach(), SCALING, None, w, inputs["gate_bias"].detach(),
            0.5, False)
    rest = [m for m in range(9) if m != 4]
    want = lora_backward(go[rest], x[rest], *args[1:], gate_grad=True, need_x=False)
    if not host_reads:  # the path a GPU or torch.compile runs: nothing read on the host
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = lora_backward(go, *args, gate_grad=True, need_x=False, select_rows=host_reads)
    clean = dict(inputs, x=x[rest], base_out=inputs["base_out"][rest])
    exact = reference_grads(clean, ["gate_weight", "gate_bias"], go[rest], hard=False)
    # (a logit of +inf opens the soft gate: that row's LoRA gradients are inf, as its output is)
    for name in ("gate_weight", "gate_bias") + (("lora_a", "lora_b") if poison != "inf" else ()):
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    for name in ("gate_weight", "gate_bias"):
        torch.testing.assert_close(got[name].double(), exact[name].reshape(got[name].shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape,k", [((0,), 7), ((2, 0), 7), ((3,), 0)], ids=["M=0", "[2, 0]", "K=0"])
@pytest.mark.parametrize("hard,straight_through", [(False, False), (True, False), (True, True)],
                         ids=["soft", "hard", "straight-through"])
def test_a_token_gate_on_an_empty_batch_has_gradients(shape, k, hard, straight_through):
    """M = 0 (x [0, K] or [2, 0, K]) or K = 0: the token gate's probabilities are [M] (addmv gives a 0-dim result
    there), so the backward runs and every input gets its gradient, equal to the reference's."""
    gen = torch.Generator().manual_seed(5)
    inputs = {name: t.requires_grad_() for name, t in dict(
        x=torch.randn(*shape, k, generator=gen), base_out=torch.randn(*shape, 6, generator=gen),
        lora_a=torch.randn(3, k, generator=gen), lora_b=torch.randn(6, 3, generator=gen),
        gate_weight=torch.randn(k, generator=gen), gate_bias=torch.randn(1, generator=gen)).items()}
    out = gated_lora(scaling=SCALING, hard=hard, straight_through=straight_through, **inputs)
    go = torch.randn(out.shape, generator=gen)
    names = list(inputs)
    grads = dict(zip(names, torch.autograd.grad(out, list(inputs.values()), go, allow_unused=True, retain_graph=True)))
    exact = reference_grads(inputs, [n for n in names if not hard or n in ("x", "base_out", "lora_a", "lora_b")], go,
                            hard=hard)
    for name, grad in grads.items():
        if hard and not straight_through and name.startswith("gate_"):
            assert grad is None, name  # a hard gate without straight-through has no derivative
            continue
        assert grad.shape == inputs[name].shape, name
        if name in exact:
            torch.testing.assert_close(grad.double(), exact[name], rtol=1e-6, atol=1e-6)
    if not hard:  # as a graph too (create_graph=True: the gate weight was not in it, and autograd refused)
        second = torch.autograd.grad(out, list(inputs.values()), go, create_graph=True, allow_unused=True)
        assert all(g is not None and torch.equal(g, grads[n]) for n, g in zip(names, second))


def test_inplace_call_records_the_addition():
    """inplace=True on a non-leaf base output: the same tensor comes back, with the out-of-place gradients."""
    inputs = make_inputs()
    w = torch.randn(5, 7, dtype=FP64, requires_grad=True)
    results = []
    for inplace in (False, True):
        w.grad = None
        base = inputs["x"] @ w.T
        out = gated_lora(inputs["x"], base, inputs["lora_a"], inputs["lora_b"], SCALING, gate=inputs["gate"],
                         hard=False, backend="torch", inplace=inplace)
        assert (out is base) == inplace
        (out ** 2).sum().backward()
        results.append((out.detach().clone(), w.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# views [6, 5] of a [10, 6] buffer; split's outputs are views autograd does not let be modified in place
BASE_VIEWS = {"slice": lambda b: b[2:8, 1:], "transpose": lambda b: b.t()[1:, 2:8].t(),
              "split": lambda b: b[2:8].split([5, 1], 1)[0]}


# (backend, dtype, tolerance of the gradients): triton takes fp32, on CUDA tensors where there is a GPU (gpu_check
# runs this file's triton tests there) and under the interpreter elsewhere
VIEW_BACKENDS = {"torch": (FP64, 1e-13), "triton": (torch.float32, 1e-6)}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    "triton" not in available_backends(), reason="triton backend not available"))])
@pytest.mark.parametrize("view", BASE_VIEWS)
def test_inplace_on_a_view_under_autograd(view, backend):
    """inplace=True on a base_out that is a view, autograd recording: written in place (the view itself comes back,
    its base holds the sum) with the out-of-place gradients, also for what the view's base came from (K != N, so a
    gradient routed to the wrong input would not even fit). A view autograd refuses to modify in place (one of
    several outputs of ``split``) is computed out of place, as documented."""
    dtype, tolerance = VIEW_BACKENDS[backend]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    inputs = make_inputs(shape=(6,), k=7, n=5, dtype=dtype, device=device)
    source = torch.randn(10, 6, dtype=dtype, device=device, requires_grad=True)
    go = torch.randn(6, 5, dtype=dtype, device=device)
    names = ["x", "lora_a", "lora_b", "gate"]
    results = []
    for inplace in (False, True):
        buffer = source * 1.0  # not a leaf: a view of it may be written
        base = BASE_VIEWS[view](buffer)
        before = base.detach().clone()
        out = gated_lora(inputs["x"], base, inputs["lora_a"], inputs["lora_b"], SCALING, gate=inputs["gate"],
                         hard=False, backend=backend, inplace=inplace)
        written = inplace and view != "split"
        assert (out is base) == written
        assert torch.equal(base.detach(), out.detach() if written else before)
        grads = torch.autograd.grad((out * go).sum(), [source] + [inputs[n] for n in names])
        results.append((out.detach().clone(), grads))
    assert torch.equal(results[0][0], results[1][0])
    for plain, written in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(written, plain, rtol=tolerance, atol=tolerance)


def test_inplace_on_a_leaf_that_requires_grad_or_a_view_of_one_is_computed_out_of_place():
    """Autograd refuses to modify a leaf that requires grad, or a view of one, in place: such a base_out comes back as
    a new tensor, the leaf unchanged, for the one-adapter and the multi-adapter op, with the out-of-place gradients
    (the leaf itself raised autograd's unnamed in-place error)."""
    inputs = make_inputs(shape=(4,), k=7, n=5)
    leaf = torch.randn(20, dtype=FP64, requires_grad=True)
    go = torch.randn(4, 5, dtype=FP64)
    ops = {"one": lambda base: gated_lora(inputs["x"], base, inputs["lora_a"], inputs["lora_b"], SCALING,
                                          backend="torch", inplace=True),
           "multi": lambda base: gatedlora.gated_lora_multi(inputs["x"], base, [inputs["lora_a"]], [inputs["lora_b"]],
                                                            SCALING, torch.tensor([0, -1, 0, 0]), backend="torch",
                                                            inplace=True)}
    matrix = torch.randn(4, 5, dtype=FP64, requires_grad=True)
    for op in ops.values():
        for source, given in ((leaf, lambda: leaf.view(4, 5)), (matrix, lambda: matrix)):
            before = source.detach().clone()
            base_out = given()
            out = op(base_out)
            assert out is not base_out and torch.equal(source.detach(), before)
            plain = op(given() * 1.0)  # neither: written in place, the leaf's gradient through the product
            assert torch.equal(out.detach(), plain.detach())
            for written, reference in zip(torch.autograd.grad((out * go).sum(), [source, inputs["x"]]),
                                          torch.autograd.grad((plain * go).sum(), [source, inputs["x"]])):
                torch.testing.assert_close(written, reference, rtol=1e-13, atol=1e-13)


def test_inplace_into_the_input_itself_gets_the_out_of_place_gradients():
    """base_out is x (N = K) and autograd records the call: base_out is written, and the backward gets the
    out-of-place gradients (the op saved x for its backward, then wrote base_out through it: autograd's version
    check failed in the backward), for the one-adapter and the multi-adapter op."""
    inputs = make_inputs(shape=(4,), k=5, n=5)
    a, b = inputs["lora_a"], inputs["lora_b"]
    index = torch.tensor([0, -1, 0, 0])
    ops = {"one": lambda x, base, inplace: gated_lora(x, base, a, b, SCALING, backend="torch", inplace=inplace),
           "multi": lambda x, base, inplace: gatedlora.gated_lora_multi(x, base, [a], [b], SCALING, index,
                                                                        backend="torch", inplace=inplace)}
    for op in ops.values():
        source = torch.randn(4, 5, dtype=FP64, requires_grad=True)
        expected = op(source * 1.0, source * 1.0, False)
        shared = source * 1.0  # x and base_out at once
        out = op(shared, shared, True)
        assert out is shared and torch.equal(out.detach(), expected.detach())
        got = torch.autograd.grad(out.sum(), [source, a, b])
        for written, reference in zip(got, torch.autograd.grad(expected.sum(), [source, a, b])):
            torch.testing.assert_close(written, reference, rtol=1e-13, atol=1e-13)


def test_empty_rows_and_mixed_dtypes_give_gradients_of_the_input_dtypes():
    """x bf16 with fp32 LoRA weights (PEFT's autocast_adapter_dtype); bf16 error at most 2x eager PyTorch's."""
    x = torch.randn(0, 6, requires_grad=True)
    a = torch.randn(2, 6, requires_grad=True)
    out = gated_lora(x, torch.zeros(0, 4), a, torch.randn(4, 2), SCALING)
    out.sum().backward()
    assert out.shape == (0, 4) and torch.equal(a.grad, torch.zeros(2, 6))

    inputs = make_inputs(shape=(33,), k=40, n=24, r=8, dtype=torch.float32)
    x16 = inputs["x"].detach().bfloat16().requires_grad_()
    base16 = inputs["base_out"].detach().bfloat16()
    lw = {k: inputs[k] for k in ("lora_a", "lora_b", "gate_weight", "gate_bias")}
    for v in lw.values():
        v.grad = None
    out = gated_lora(x16, base16, lw["lora_a"], lw["lora_b"], SCALING, gate_weight=lw["gate_weight"],
                     gate_bias=lw["gate_bias"], hard=False, backend="torch")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    got = {"x": x16.grad, **{k: v.grad for k, v in lw.items()}}
    assert got["x"].dtype == torch.bfloat16 and got["lora_a"].dtype == torch.float32

    def ref(x, a, b, w, bias, dtype):
        y = gated_lora_reference(x, torch.zeros(x.shape[0], 24, dtype=dtype), a, b, SCALING, gate_weight=w,
                                 gate_bias=bias, hard=False, dtype=dtype)
        return y.to(x.dtype) if dtype != FP64 else y

    def ref_grads(dtype):
        leaves = [t.detach().to(dtype if dtype == FP64 or i else torch.bfloat16).requires_grad_()
                  for i, t in enumerate([x16, lw["lora_a"], lw["lora_b"], lw["gate_weight"], lw["gate_bias"]])]
        ref(*leaves, dtype).float().sum().backward()
        return dict(zip(got, [t.grad for t in leaves]))

    exact, eager = ref_grads(FP64), ref_grads(torch.float32)
    for name in got:
        ours = (got[name].double() - exact[name]).abs().max()
        theirs = (eager[name].double() - exact[name]).abs().max()
        assert ours <= 2 * theirs + 1e-6, (name, float(ours), float(theirs))


needs_triton = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend not available")
if "triton" in available_backends():
    from gatedlora.ops.triton_backend import kernel_is_interpreted

    # the interpreter (no GPU; tests/conftest.py) runs the kernel on CPU tensors, the compiled kernel on CUDA ones
    TRITON_DEVICE = "cpu" if kernel_is_interpreted() else "cuda"


@needs_triton
@pytest.mark.parametrize("kind", ["plain", "given"])
def test_gradcheck_triton_forward_fp32(kind):
    """The triton kernel takes no fp64, so gradcheck runs in fp32. Without a token gate the op is affine
    in every single input element (y = base + s*g*B A x is linear in each of x, A, B, g, base), so a
    central difference is exact up to rounding for any step: with eps=0.5 the fp32 rounding error of
    the difference is about 1e-7*|y|/0.5, and atol=1e-4 still catches a wrong gradient of any
    visible size. The gate is left out: a step of 0.5 would leave [0, 1], which the op refuses; its
    gradient through the triton forward is compared with the torch backend's in the next test. Token
    gates (sigmoid) are not affine: see the next test too."""
    inputs = make_inputs(shape=(5,), k=6, n=7, r=2, dtype=torch.float32, device=TRITON_DEVICE)
    names = [name for name in GATE_KINDS[kind] if name != "gate"]
    fn = op(inputs, kind, names, hard=False, backend="triton")
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(fn, [inputs[k] for k in names], eps=0.5, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("kind,hard,straight_through",
                         [("token", False, False), ("token", True, True), ("given", True, True),
                          ("given", False, False),
                          ("plain", True, False)])
def test_triton_forward_gradients_equal_the_torch_backend(kind, hard, straight_through):
    """The backward is the same PyTorch code on every backend and reads only the inputs (not the forward's
    output), so the gradients through the triton forward are the torch backend's, bit for bit; the
    forwards agree to fp32 rounding."""
    inputs = make_inputs(shape=(3, 5), k=24, n=20, r=4, dtype=torch.float32, device=TRITON_DEVICE)
    names = list(GATE_KINDS[kind])
    results = {}
    for backend in ("torch", "triton"):
        fn = op(inputs, kind, names, hard=hard, straight_through=straight_through, backend=backend)
        with torch.no_grad():
            forward = fn(*[inputs[k] for k in names])
        results[backend] = (forward, grads_of(fn, inputs, names))
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name in names:
        assert torch.equal(results["triton"][1][name], results["torch"][1][name]), name


@pytest.mark.parametrize("trainable", [("x",), ("lora_a",), ("lora_b",), ("gate_weight",), ("gate_bias",),
                                       ("x", "gate_weight")])
def test_only_the_inputs_that_need_a_gradient_get_one(trainable):
    """The backward skips what nobody asked for (frozen weights, activations that need no gradient) and
    still gives the asked-for gradients exactly as when every input needs one."""
    names = list(GATE_KINDS["token"])
    inputs = make_inputs()
    everything = grads_of(op(inputs, "token", names, hard=False, backend="torch"), inputs, names)
    for name in names:
        inputs[name].requires_grad_(name in trainable)
    fn = op(inputs, "token", names, hard=False, backend="torch")
    some = grads_of(fn, inputs, names)
    for name in names:
        if name in trainable:
            torch.testing.assert_close(some[name], everything[name], rtol=1e-13, atol=1e-13)
        else:
            assert some[name] is None

