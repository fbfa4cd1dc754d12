"""GatedLoraConfig validation: every bad field is named with what was expected."""
import pytest
from torch import nn

from gatedlora import GatedLoraConfig


def test_defaults_keep_the_drop_in_promise():
    cfg = GatedLoraConfig()
    assert (cfg.gate, cfg.threshold, cfg.hard, cfg.router_layer, cfg.backend, cfg.base_mode) == (
        "token", 0.5, True, 0, "auto", "exact")


@pytest.mark.parametrize("field,value,message", [
    ("gate", "layer", r"gate must be one of \('sequence', 'token', 'none'\), got 'layer'"),
    ("threshold", 1.0, r"threshold must be a number in \(0, 1\), above 0 in fp32, got 1.0"),
    ("threshold", True, r"threshold must be a number in \(0, 1\), above 0 in fp32, got True"),
    ("threshold", float("nan"), r"threshold must be a number in \(0, 1\), above 0 in fp32, got nan"),
    # (it rounds to 0 in fp32, where gates are compared: a closed gate of 0 would open, on some paths only)
    ("threshold", 1e-46, r"threshold must be a number in \(0, 1\), above 0 in fp32, got 1e-46"),
    ("router_layer", 1.0, r"router_layer must be an int >= 0, got 1.0"),
    ("hard", 1, r"hard must be a bool, got 1"),
    ("router_layer", -1, r"router_layer must be an int >= 0, got -1"),
    ("r", 0, r"r must be an int >= 1, got 0"),
    ("lora_alpha", True, r"lora_alpha must be a finite number, got True"),
    ("lora_dropout", 1.0, r"lora_dropout must be a number in \[0, 1\), got 1.0"),
    ("backend", "tpu", r"backend must be one of .*got 'tpu'"),
    ("base_mode", "one-pass", r"base_mode must be one of \('exact', 'fused'\), got 'one-pass'"),
    ("target_modules", [], r"target_modules must be a non-empty list"),
    ("router", "mlp", r"router must be an nn.Module"),
])
def test_bad_fields_are_named(field, value, message):
    kwargs = {field: value}
    if field == "router":
        kwargs["gate"] = "sequence"
    with pytest.raises(ValueError, match=message):
        GatedLoraConfig(**kwargs)


def test_numpy_scalars_are_numbers_and_are_kept_as_python_ones():
    """A threshold swept with numpy.linspace, or sizes read through NumPy: taken, and kept as Python numbers (the
    config is saved as JSON, which has no NumPy types)."""
    import json

    import numpy as np

    cfg = GatedLoraConfig(gate="sequence", threshold=np.float32(0.25), router_layer=np.int64(1), r=np.int32(4),
                          lora_alpha=np.int64(8), lora_dropout=np.float64(0.1))
    assert [(type(v), v) for v in (cfg.threshold, cfg.router_layer, cfg.r, cfg.lora_alpha, cfg.lora_dropout)] == [
        (float, 0.25), (int, 1), (int, 4), (int, 8), (float, 0.1)]
    assert json.loads(json.dumps(cfg.to_dict()))["threshold"] == 0.25
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got np.float32\(4.0\)"):
        GatedLoraConfig(r=np.float32(4))


def test_router_needs_sequence_gates_and_dict_round_trip():
    with pytest.raises(ValueError, match="router is used only with gate='sequence'"):
        GatedLoraConfig(router=nn.Linear(4, 1))
    for gate in ("token", "none"):
        with pytest.raises(ValueError, match=f"router_layer is used only with gate='sequence'.*got router_layer=1 "
                                             f"with gate='{gate}'"):
            GatedLoraConfig(gate=gate, router_layer=1)
    cfg = GatedLoraConfig(gate="sequence", router_layer=2, target_modules=("q_proj",), r=8)
    data = cfg.to_dict()
    assert data["target_modules"] == ["q_proj"] and data["router"] is None
    assert GatedLoraConfig.from_dict(data).same_behaviour(cfg)
    # fields that never had an effect where they were saved (now refused there) are dropped when read back
    older = GatedLoraConfig.from_dict({"gate": "token", "router_layer": 2})
    assert older.router_layer == 0
    older = GatedLoraConfig.from_dict({"gate": "sequence", "adapters": ["a", "b"], "threshold": 0.9})
    assert older.threshold == 0.5 and older.adapters == ["a", "b"]
    with pytest.raises(ValueError, match=r"router_layer must be an int >= 0, got 'x'"):
        GatedLoraConfig.from_dict({"gate": "token", "router_layer": "x"})
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\), above 0 in fp32, got 'x'"):
        GatedLoraConfig.from_dict({"gate": "sequence", "adapters": ["a", "b"], "threshold": "x"})
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        GatedLoraConfig.from_dict({**data, "rank": 3})
