"""GatedLoRALinear on its own: token gates, dropout in training, closed rows bitwise."""
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
