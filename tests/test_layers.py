"""GatedLoRALinear on its own: token gates, dropout in training, closed rows bitwise."""
import re

import pytest
import torch
from torch import nn

from gatedlora import GatedLoRALinear
from gatedlora.reference import gated_lora_reference


def fresh_layer(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = GatedLoRALinear.fresh(nn.Linear(24, 18), r=4, lora_alpha=8, lora_dropout=dropout, gate="token")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.gate_weight.normal_()
        layer.gate_bias.fill_(0.0)
    return layer


def test_token_gate_layer_matches_reference_and_keeps_closed_rows():
    layer = fresh_layer().eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        y = layer(x)
        base = layer.base_layer(x)
    ref = gated_lora_reference(x, base, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                               layer.scaling, gate_weight=layer.gate_weight, gate_bias=layer.gate_bias)
    assert (y.double() - ref).abs().max() < 1e-5
    closed = torch.sigmoid(x @ layer.gate_weight + layer.gate_bias) < 0.5
    assert 0 < int(closed.sum()) < 18
    assert torch.equal(y[closed], base[closed])


def test_dropout_applies_to_the_lora_input_in_training_only():
    layer = fresh_layer(dropout=0.5)
    x = torch.randn(64, 24)
    with torch.no_grad():
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(1)
        a = layer(x)
        torch.manual_seed(2)
        b = layer(x)
        base = layer.base_layer(x)
    assert not torch.equal(a, b)
    # the gate reads the clean input: closed rows stay the base output whatever dropout does
    closed = torch.sigmoid(x @ layer.gate_weight + layer.gate_bias) < 0.5
    assert torch.equal(a[closed], base[closed]) and torch.equal(b[closed], base[closed])


def test_fused_base_mode_falls_back_to_exact_on_cpu_and_says_why_once():
    import warnings

    import gatedlora.ops.fused as fused
    from gatedlora import GatedLoraConfig, patch_model
    from tiny_models import padded_batch, tiny_peft_model

    model = tiny_peft_model("llama")
    ids, mask = padded_batch([5, 7], 7)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    patch_model(model, GatedLoraConfig(base_mode="fused"))
    fused._warned.clear()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = model(input_ids=ids, attention_mask=mask).logits
        model(input_ids=ids, attention_mask=mask)
    fallback = [w for w in caught if "fell back to exact" in str(w.message) or "exact mode" in str(w.message)]
    assert len(fallback) == 1 and "CUDA" in str(fallback[0].message)  # says why, once
    assert (got - want).abs().max() < 1e-5  # exact mode: the PEFT output


def layer_recording_its_op_calls(monkeypatch, hard):
    """A token-gated layer (hard or soft gates) and the list its op calls are recorded in: the keyword names of a
    ``gated_lora`` call, ["plain"] for an ``add_lora_`` one."""
    import gatedlora.layers as layers

    layer = fresh_layer().eval()
    layer.hard = hard
    calls = []
    gated, plain = layers.gated_lora, layers.add_lora_
    monkeypatch.setattr(layers, "gated_lora", lambda *a, **k: calls.append(sorted(k)) or gated(*a, **k))
    monkeypatch.setattr(layers, "add_lora_", lambda *a, **k: calls.append(["plain"]) or plain(*a, **k))
    return layer, calls


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_one_row_token_gate_is_decided_before_the_base_layer_on_the_cpu(monkeypatch, hard):
    """On the CPU without autograd the layer decides a token gate on the host before the base layer: a closed
    row costs the base layer alone (no op call), an open one plain LoRA (hard) or LoRA scaled by the
    probability (soft); each equals the reference."""
    layer, calls = layer_recording_its_op_calls(monkeypatch, hard)
    x = torch.randn(1, 1, 24)
    for bias, expect_call in ((-200.0, False), (30.0, True), (0.3, True)):
        with torch.no_grad():
            layer.gate_weight.normal_(std=0.01)
            layer.gate_bias.fill_(bias)
            calls.clear()
            y = layer(x)
            base = layer.base_layer(x)
        ref = gated_lora_reference(x, base, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                   layer.scaling, gate_weight=layer.gate_weight, gate_bias=layer.gate_bias, hard=hard)
        assert bool(calls) == expect_call
        assert (y.double() - ref).abs().max() < 1e-5
        if not expect_call:
            assert torch.equal(y, base)
        elif hard:  # hard and open: plain LoRA, the gate is not evaluated again
            assert calls == [["plain"]]
        else:  # soft: the probability goes to the op as a given gate
            assert "gate" in calls[0] and "gate_weight" not in calls[0]


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_few_rows_token_gates_are_decided_before_the_base_layer_on_the_cpu(monkeypatch, hard):
    """Below GATHER_MIN_ROWS rows (decode batches) the layer decides token gates on the host too, not in the op
    (whose frames cost more than the arithmetic there): every row closed is the base layer alone, bitwise;
    every row open hard is plain LoRA; a mix goes to the op as given decisions (hard) or probabilities (soft),
    its closed rows bitwise the base output; a row whose gate is NaN is closed and keeps out of the others."""
    layer, calls = layer_recording_its_op_calls(monkeypatch, hard)
    x = torch.randn(2, 4, 24)
    lora = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling)
    for bias, expected in ((-200.0, []), (30.0, [["plain"]] if hard else None), (0.0, None)):
        with torch.no_grad():
            layer.gate_weight.normal_(std=0.01 if bias else 1.0)
            layer.gate_bias.fill_(bias)
            calls.clear()
            y = layer(x)
            base = layer.base_layer(x)
        ref = gated_lora_reference(x, base, *lora, gate_weight=layer.gate_weight, gate_bias=layer.gate_bias, hard=hard)
        assert (y.double() - ref).abs().max() < 1e-5
        p = torch.sigmoid(x @ layer.gate_weight + layer.gate_bias)
        closed = p < 0.5 if hard else p == 0
        assert torch.equal(y[closed], base[closed])
        if expected is not None:
            assert calls == expected
        else:  # the decisions or probabilities go to the op as a given gate, not the gate's weights
            assert len(calls) == 1 and "gate" in calls[0] and "gate_weight" not in calls[0]
            if hard:
                assert 0 < int(closed.sum()) < 8
    with torch.no_grad():  # a NaN gate (x holds inf and -inf: NaN logit) among open rows
        layer.gate_weight.fill_(0.01)
        layer.gate_bias.fill_(30.0)
        x[0, 1, :2] = torch.tensor([float("inf"), float("-inf")])
        y = layer(x)
        base = layer.base_layer(x)
    ref = gated_lora_reference(x, base, *lora, gate_weight=layer.gate_weight, gate_bias=layer.gate_bias, hard=hard)
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, 1] = False
    assert (y[others].double() - ref[others]).abs().max() < 1e-5


def test_token_gates_under_cpu_autocast_do_not_depend_on_the_row_count():
    """Under autocast the op reads the gate from x in the base output's dtype (bf16); the host decision read it
    from the fp32 x, so rows gave other outputs alone or in a decode batch than in a batch of 16 or more."""
    layer = fresh_layer().eval()
    layer.hard = False
    x = torch.randn(18, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.gate_weight.normal_(std=1.0)
        batch, decode, alone = layer(x), layer(x[:6]), layer(x[:1])
    assert batch.dtype == torch.bfloat16
    assert torch.equal(decode, batch[:6]) and torch.equal(alone, batch[:1])


@pytest.mark.parametrize("rows", [1, 8])
def test_token_gates_compile_into_one_graph_at_decode_sizes(rows):
    """torch.compile(fullgraph=True) of a token-gated model at decode sizes on the CPU: the host read of the gate
    (a data-dependent branch) failed to trace; under compile the gate goes to the op, one graph node."""
    from gatedlora import GatedLoraConfig, patch_model
    from tiny_models import randomize_lora_b, tiny_peft_model

    model = tiny_peft_model("llama")
    randomize_lora_b(model)
    patch_model(model, GatedLoraConfig(gate="token"))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, GatedLoRALinear):
                layer.gate_weight.normal_(std=0.5)
        ids = torch.randint(3, 90, (rows, 1), generator=torch.Generator().manual_seed(rows))
        eager = model(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    assert torch.equal(compiled, eager)


def test_a_token_gate_at_the_threshold_decides_alike_alone_and_in_a_batch():
    """The layer's one-row token gate (read on the host) compares p with the threshold in fp32, as a batch does:
    a row whose p is float32(0.7) with threshold 0.7 (float32(0.7) < 0.7 in fp64) opens alone and in a batch."""
    layer = fresh_layer().eval()
    layer.threshold = 0.7
    at = torch.tensor(0.7)
    bias = torch.logit(at.double()).float()  # the fp32 logit whose fp32 sigmoid is float32(0.7)
    for _ in range(64):
        if torch.sigmoid(bias) == at:
            break
        bias = bias.nextafter(torch.tensor(1.0 if torch.sigmoid(bias) < at else -1.0))
    assert torch.sigmoid(bias) == at
    with torch.no_grad():
        layer.gate_weight.zero_()  # p = sigmoid(bias) on every row
        layer.gate_bias.fill_(bias.item())
        x = torch.randn(3, 24)
        batch, alone, base = layer(x), layer(x[:1]), layer.base_layer(x)
    # every row open (p = float32(0.7) >= float32(0.7)): plain LoRA. (The fp64 reference's own sigmoid of the
    # bias is not float32(0.7), so it cannot decide a row at the threshold.)
    ref = gated_lora_reference(x, base, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling)
    assert (batch.double() - ref).abs().max() < 1e-5
    assert (alone[0].double() - ref[0]).abs().max() < 1e-5
    assert (ref - base.double()).abs().amax(dim=1).min() > 1e-3  # open rows differ from the base output


@pytest.mark.parametrize("option,value,message", [
    ("gate", "tokens", "GatedLoRALinear.gate must be one of ('sequence', 'token', 'none'), got 'tokens'"),
    ("base_mode", "weird", "GatedLoRALinear.base_mode must be one of ('exact', 'fused'), got 'weird'"),
    ("threshold", 1.5, "GatedLoRALinear.threshold must be a number in (0, 1), above 0 in fp32, got 1.5"),
    ("threshold", 1.0, "GatedLoRALinear.threshold must be a number in (0, 1), above 0 in fp32, got 1.0"),
    ("hard", "yes", "GatedLoRALinear.hard must be a bool, got 'yes'"),
    ("straight_through", 1, "GatedLoRALinear.straight_through must be a bool, got 1"),
    ("backend", "cuda-fast", "GatedLoRALinear.backend must be one of ('auto', 'torch', 'triton', 'cuda'), got "
                             "'cuda-fast'"),
    ("train_hard", "soft", "GatedLoRALinear.train_hard must be a bool or None, got 'soft'"),
])
def test_a_layer_built_directly_checks_its_options(option, value, message):
    """GatedLoRALinear without a GatedLoraConfig checks its options by the config's rules: a misspelt gate used to
    run ungated LoRA, and a threshold of 1 or more failed in math.log."""
    with pytest.raises(ValueError) as error:
        GatedLoRALinear.fresh(nn.Linear(8, 4), 2, 4, 0.0, **{"gate": "token", option: value})
    assert str(error.value) == message


@pytest.mark.parametrize("value", [1e-46, 1.0, float("nan"), "0.5"])
def test_a_threshold_set_on_a_layer_is_checked_as_at_construction(value):
    """``layer.threshold = t`` after construction: 1e-46 is 0 in fp32, where the kernels compare (every gate,
    p = 0 included, opened); the rule and message are the constructor's. The layer keeps its threshold."""
    layer = GatedLoRALinear.fresh(nn.Linear(8, 4), 2, 4, 0.0, gate="token", threshold=0.25)
    with pytest.raises(ValueError, match=rf"^GatedLoRALinear.threshold must be a number in \(0, 1\), above 0 in fp32, "
                                         rf"got {re.escape(repr(value))}$"):
        layer.threshold = value
    assert layer.threshold == 0.25
    layer.threshold = 0.75
    assert layer.threshold == 0.75 and "threshold=0.75" in repr(layer)


def test_a_layer_pickled_with_its_threshold_in_its_dict_loads():
    """Layers pickled before the threshold became a checked property kept it in ``__dict__["threshold"]``."""
    import pickle

    layer = GatedLoRALinear.fresh(nn.Linear(8, 4), 2, 4, 0.0, gate="token", threshold=0.25)
    state = layer.__getstate__()
    state["threshold"] = state.pop("_threshold")  # the earlier layout
    earlier = GatedLoRALinear.__new__(GatedLoRALinear)
    earlier.__setstate__(state)
    assert earlier.threshold == 0.25 and pickle.loads(pickle.dumps(earlier)).threshold == 0.25


def _hook_pre(layer, calls):
    return layer.base_layer.register_forward_pre_hook(lambda module, args: calls.append("pre"))


def _hook_post(layer, calls):
    return layer.base_layer.register_forward_hook(lambda module, args, output: calls.append("post"))


def _replace_forward(layer, calls):  # as accelerate's offload hooks do
    plain = layer.base_layer.forward

    def forward(x):
        calls.append("forward")
        return plain(x)

    layer.base_layer.forward = forward


@pytest.mark.parametrize("attach", [_hook_pre, _hook_post, _replace_forward])
@pytest.mark.parametrize("gate_open", [True, False], ids=["open", "closed"])
def test_a_hooked_or_replaced_base_layer_is_called_as_a_module(attach, gate_open):
    """A plain nn.Linear base layer runs as F.linear (its forward, without a module call's frames) only where
    nothing hooks or replaces it: otherwise the module is called, hooks and all, open row or closed."""
    layer = fresh_layer().eval()
    with torch.no_grad():
        layer.gate_bias.fill_(30.0 if gate_open else -30.0)
        layer.gate_weight.zero_()
    x = torch.randn(3, 24)
    with torch.no_grad():
        plain = layer(x)
        calls = []
        attach(layer, calls)
        hooked = layer(x)
    assert calls and torch.equal(hooked, plain)
    assert torch.equal(plain, layer.base_layer(x)) != gate_open


@pytest.mark.parametrize("gate", ["token", "sequence"])
def test_offloaded_lora_weights_are_refused_not_read(gate):
    """Read directly (not through the modules' offload hooks), meta weights gave garbage on the CPU: torch multiplies
    a CPU tensor by a meta one without an error. accelerate's cpu_offload leaves them so."""
    from tiny_models import tiny_peft_model

    from gatedlora import GatedLoraConfig, patch_model

    model = tiny_peft_model(layers=3, layers_to_transform=[1, 2])
    patch_model(model, GatedLoraConfig(gate=gate, router_layer=0) if gate == "sequence" else None)
    layer = next(m for m in model.modules() if isinstance(m, GatedLoRALinear))
    lora_a = layer.lora_A[layer.adapter_name]
    lora_a.weight = nn.Parameter(torch.empty_like(lora_a.weight, device="meta"), requires_grad=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="LoRA weights on the meta device .*cpu_offload"):
        model(input_ids=torch.randint(3, 90, (2, 5)))
