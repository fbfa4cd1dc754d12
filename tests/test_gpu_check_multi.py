"""tools/gpu_check.py's multi-adapter model scenarios, dry run on the CPU (a GPU runs them from the model stage)."""
import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_multi_adapter_model_dry_run():
    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.multi_adapter_model(deadline_s=120, dry_run=True)
    assert [s["check"] for s in result["scenarios"]] == ["ok", "ok"]
    assert {"peft mixed", "peft per group", "gatedlora torch"} <= set(result["scenarios"][0]["median_ms"])
