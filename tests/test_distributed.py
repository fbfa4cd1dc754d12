"""Training under torch.distributed: DDP and FSDP2 (fully_shard) on 2 CPU processes (gloo) equal one process.

Runs tools/distributed_check.py under torchrun (``--standalone`` binds its rendezvous to a free loopback
port). The check trains, saves from rank 0, loads back and compares with single-process training; this
test reads its report and checks the saves it left on its own.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ["token", "sequence-soft", "sequence-straight-through", "sequence-frozen-router"]


@pytest.mark.slow
def test_ddp_and_fsdp2_training_equals_one_process(tmp_path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tools" / "distributed_check.py"), "--out", str(tmp_path), "--json", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = json.loads(report.read_text())["results"]
    assert [(r["strategy"], r["setup"]) for r in results] == [(s, g) for s in ("ddp", "fsdp2") for g in SETUPS]
    for r in results:
        where = (r["strategy"], r["setup"])
        assert r["world_size"] == 2 and r["steps"] >= 3 and r["tensors"] >= 20, where
        assert r["max_relative_difference"] <= 1e-5, where
        assert r["max_update_error"] <= 1e-2 and r["min_relative_move"] > 1e-5, where
        assert r["reloaded_in_place_bitwise"] and r["ok"], where
    frozen = [r for r in results if r["setup"] == "sequence-frozen-router"]
    assert all(not any(r["rank0_rows_routed_to_adapter"]) for r in frozen)  # rank 0 had nothing to route

    # the saves themselves: the same keys and (to fp32 rounding) values from DDP and from FSDP2, the
    # token-gate bias 0-dim in the file as format 1 has it
    for setup in SETUPS:
        ddp = load_file(str(tmp_path / f"ddp-{setup}" / "gatedlora_model.safetensors"))
        fsdp = load_file(str(tmp_path / f"fsdp2-{setup}" / "gatedlora_model.safetensors"))
        assert ddp.keys() == fsdp.keys() and any("lora_A" in k for k in ddp), setup
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-5, atol=1e-6, msg=f"{setup} {key}")
            if key.endswith(".gate_bias"):
                assert ddp[key].shape == torch.Size([]) and fsdp[key].shape == torch.Size([])
        assert any(k.startswith("gate_router.") for k in ddp) == setup.startswith("sequence"), setup
