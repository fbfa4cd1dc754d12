"""The order in which ``backend="auto"`` tries the GPU backends (gatedlora/ops/preference.py)."""
from __future__ import annotations

import pytest
import torch

from gatedlora.ops import preference

TABLE = {"sm_90": {("bfloat16", "float32"): {1: "cuda", 64: "triton", 4096: "torch"}}}


def test_byte_model_order_never_puts_the_cuda_adapter_kernel_at_prefill_sizes():
    assert preference.byte_model_order(1) == ("triton", "cuda", "torch")
    assert preference.byte_model_order(16) == ("triton", "cuda", "torch")
    for m_bucket in (32, 512, 4096):
        assert "cuda" not in preference.byte_model_order(m_bucket)


def test_a_measured_winner_goes_first_and_the_rest_follow_the_byte_model(monkeypatch):
    monkeypatch.setattr(preference, "device_class", lambda device: "sm_90")
    order = lambda m: preference.gpu_order(torch.device("cuda"), torch.bfloat16, torch.float32, m, TABLE)  # noqa: E731
    assert order(1) == ("cuda", "triton", "torch")
    assert order(8) == ("cuda", "triton", "torch")  # the nearest measured bucket below
    assert order(64) == ("triton", "torch")
    assert order(512) == ("triton", "torch")
    assert order(4096) == ("torch", "triton")  # measured fastest there: measurement wins over the byte model


def test_unmeasured_classes_and_dtype_pairs_take_the_byte_model(monkeypatch):
    monkeypatch.setattr(preference, "device_class", lambda device: "sm_80")
    assert preference.gpu_order(torch.device("cuda"), torch.bfloat16, torch.float32, 1, TABLE) == \
        preference.byte_model_order(1)
    monkeypatch.setattr(preference, "device_class", lambda device: "sm_90")
    assert preference.gpu_order(torch.device("cuda"), torch.float16, torch.float16, 4096, TABLE) == \
        preference.byte_model_order(4096)


def test_the_multi_adapter_op_orders_by_its_own_table(monkeypatch):
    """gated_lora_multi's auto reads MULTI_MEASURED (the H100's model-level four-adapter run), not the one-adapter
    table: torch first at decode sizes, triton at prefill sizes."""
    from types import SimpleNamespace

    from gatedlora.ops import backends

    monkeypatch.setattr(preference, "device_class", lambda device: "sm_90")
    args = SimpleNamespace(x=SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16),
                           lora_dtype=torch.float32, m=8)
    assert backends._candidates(args, preference.MULTI_MEASURED)[0] == "torch"
    assert backends._candidates(args)[0] == preference.MEASURED["sm_90"][("bfloat16", "float32")][8]
    args.m = 4096
    assert backends._candidates(args, preference.MULTI_MEASURED)[0] == "triton"


@pytest.mark.parametrize("table", [preference.MEASURED, preference.MULTI_MEASURED], ids=["one", "multi"])
def test_the_shipped_table_names_known_backends_only(table):
    for arch, by_dtype in table.items():
        assert arch.startswith("sm_")
        for (x_dtype, lora_dtype), by_m in by_dtype.items():
            assert hasattr(torch, x_dtype) and hasattr(torch, lora_dtype)
            assert set(by_m.values()) <= {"triton", "cuda", "torch"}, by_m
