"""The bench report: spread next to every median, the legend, warnings for spread and a busy machine."""
import subprocess
import pytest
import sys

from gatedlora.benchmarking.machine_load import BUSY_FRACTION, LoadMeter
from gatedlora.benchmarking.report import format_table, spread_warnings
from gatedlora.benchmarking.timing import time_side_by_side


def scenario(name, check, base, peft, peft_quartiles=None):
    times = {"base": base, "peft": peft}
    return {"name": name, "check": check, "median_ms": times, "runs": {"base": 9, "peft": 9},
            "iqr_ms": {"base": [base * 0.99, base * 1.01], "peft": list(peft_quartiles or [peft * 0.98, peft * 1.02])}}


def result(*scenarios, warnings=()):
    env = {"device": "CPU test", "versions": {"torch": "2.13"}, "commit": "abc"}
    out = {"environment": env, "providers": ["base", "peft"], "scenarios": list(scenarios), "notes": [],
           "check_tolerance": 1e-3}
    out["warnings"] = list(warnings) + spread_warnings(out)
    return out


def test_the_table_shows_spread_check_and_legend():
    table = format_table(result(scenario("prefill b=2 t=8 open 1/2", "ok", 10.0, 12.5),
                                scenario("decode b=2 t=8 open 1/2", "not checked (decode)", 2.0, 3.0)))
    lines = table.splitlines()
    assert lines[1].split() == ["scenario", "check", "base", "ms", "peft", "ms", "(x", "base)"]
    assert "ok       10.00 ±1%  12.50 ±2% (1.25x)" in lines[3]
    assert "not run" in lines[4] and "3.00 ±2% (1.50x)" in lines[4]
    assert any("lower is better" in line and "9 calls" in line for line in lines)
    assert any(line.startswith("legend: open k/B:") for line in lines)
    assert any("match PEFT within 0.001" in line and "tested before timing" in line and "'-'" in line for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)


def test_a_wide_spread_or_a_failed_check_is_called_out():
    table = format_table(result(scenario("decode b=8 t=128 open 6/8", "FAILED: torch: closed sequences differ", 3.0,
                                         5.0, peft_quartiles=[3.0, 7.0]),
                                warnings=["other processes used 40% of the CPUs during the run"]))
    assert "FAILED" in table and "check FAILED in 'decode b=8 t=128 open 6/8': torch: closed sequences differ" in table
    assert "5.00 ±40% (1.67x)" in table
    assert ("WARNING: 1 of 2 timings spread by more than ±10% (worst: peft in 'decode b=8 t=128 open 6/8', ±40%)"
            in table)
    assert "WARNING: other processes used 40% of the CPUs during the run" in table
    assert "rerun on a quiet machine" in table


def test_the_load_meter_sees_another_process_busy():
    meter = LoadMeter.start()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    busy = subprocess.Popen([sys.executable, "-c", spin])
    busy.wait()
    share = meter.others_share()
    if share is None:
        return  # no /proc/stat on this system: the report then relies on the load average and the spread
    assert share > BUSY_FRACTION
    assert any("other processes used" in w for w in meter.warnings())


def test_rounds_shuffle_which_provider_follows_which():
    """Each round runs every provider once, in a new order: over the rounds a provider follows different ones
    (in a rotated order each always follows the same one, and pays for what that one evicted)."""
    order = []
    providers = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c", "d")}
    timings = time_side_by_side(providers, device=__import__("torch").device("cpu"), warmup=0, min_rounds=12,
                                max_rounds=12, budget_s=0)
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == ["a", "b", "c", "d"] for r in rounds) and len(rounds) == 12
    predecessors = {name: {r[r.index(name) - 1] for r in rounds if r.index(name)} for name in providers}
    assert all(len(before) >= 2 for before in predecessors.values())
    assert len({tuple(r) for r in rounds}) > 1
    assert all(t.runs == 12 for t in timings.values())


def test_the_check_records_how_far_each_output_is_from_peft():
    """compare_outputs: the verdict names a failure with its size; the differences hold every non-reference
    output's largest difference from PEFT on the open sequences, closed sequences left out."""
    import torch

    from gatedlora.benchmarking.report import differences_text
    from gatedlora.benchmarking.scenarios import compare_outputs

    base, peft = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    open_mask = torch.tensor([True, False, True])
    close = peft.clone()
    close[0, 1, 3] += 0.004
    close[1] = base[1]
    far = close.clone()
    far[2, 0, 0] += 0.5
    far[1, 0, 0] += 9.0  # a closed sequence that is not the base model's: named, not a difference from PEFT
    verdict, differences = compare_outputs({"base": base, "peft": peft, "gatedlora a": close, "gatedlora b": far,
                                            "peft other": peft + 0.002}, open_mask, tolerance=0.01)
    assert differences["gatedlora a"] == pytest.approx(0.004, abs=1e-6)
    assert differences["gatedlora b"] == pytest.approx((far[2, 0, 0] - peft[2, 0, 0]).abs().item(), abs=1e-6)
    assert differences["peft other"] == pytest.approx(0.002, abs=1e-6)
    problems = verdict.removeprefix("FAILED: ").split("; ")
    assert verdict.startswith("FAILED: ") and problems[0] == "b: closed sequences differ from the base model"
    assert problems[1].startswith("b: open sequences differ from PEFT by 0.5") and len(problems) == 2
    assert differences_text({"differences": differences}).startswith("largest difference from PEFT (logits): "
                                                                      "gatedlora a 0.004")


def test_the_check_reads_closed_sequences_against_every_run_of_the_base_model():
    """compare_outputs with base_runs: a closed sequence equal to any run of the base model is bitwise its output;
    where the runs differ among themselves, one that matches none passes within twice their spread (and the
    tolerance) and the verdict says it was not bitwise, with both numbers; beyond that, or where the runs agree,
    it fails, saying by how much."""
    import torch

    from gatedlora.benchmarking.scenarios import compare_outputs

    base, peft = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    open_mask = torch.tensor([True, False, True])
    other_run = base.clone()
    other_run[1, 1, 2] += 0.0625  # the base model's own run-to-run difference on a closed sequence
    matches_other_run = peft.clone()
    matches_other_run[1] = other_run[1]
    assert compare_outputs({"base": base, "peft": peft, "gatedlora a": matches_other_run}, open_mask, 0.1,
                           [other_run, base.clone()])[0] == "ok"

    def off_by(delta):
        out = peft.clone()
        out[1] = base[1]
        out[1, 0, 0] += delta
        return {"base": base, "peft": peft, "gatedlora a": out}

    verdict, _ = compare_outputs(off_by(0.03), open_mask, 0.1, [other_run, base.clone()])
    assert verdict == ("ok, not bitwise: the base model's 3 runs differ by up to 0.0625 among themselves on the "
                       "closed sequences; nearest run: a 0.03")
    assert compare_outputs(off_by(0.03), open_mask, 0.01, [other_run])[0] == (
        "FAILED: a: closed sequences differ from the base model by 0.03 (its 2 runs differ by up to 0.0625 among "
        "themselves)")
    assert compare_outputs(off_by(0.03), open_mask, 0.1, [base.clone(), base.clone()])[0] == (
        "FAILED: a: closed sequences differ from the base model by 0.03 (its 3 runs agreed)")
    # a leak far beyond the base model's own noise fails however small that noise is
    tiny_noise = base.clone()
    tiny_noise[1, 1, 2] += 1e-3
    assert compare_outputs(off_by(0.09), open_mask, 0.1, [tiny_noise])[0].startswith(
        "FAILED: a: closed sequences differ from the base model by 0.09 (its 2 runs differ by up to 0.001")
    table = format_table(result(scenario("decode b=8 t=512 open 1/3", verdict, 1.0, 1.2))).splitlines()
    assert "ok, not bitwise" in table[3]
    assert f"check in 'decode b=8 t=512 open 1/3': {verdict}" in table and not any("FAILED" in t for t in table)


def test_the_benchs_fresh_adapters_cover_every_projection_of_other_architectures():
    """The bench's fresh adapters named Llama's seven projections: on GPT-2 PEFT found none of them, on Phi-3 two of
    its four. They now take the linear layers of the model's own blocks, after router_layer."""
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    from gatedlora.benchmarking.models import add_prism_adapter
    from gatedlora.benchmarking.multi_adapter import add_adapters

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64))

    def phi3():
        return Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256, pad_token_id=0))

    for build, prefix, names in ((gpt2, "transformer.h", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
                                 (phi3, "model.layers", ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj",
                                                         "mlp.down_proj"])):
        for peft in (add_prism_adapter(build(), router_layer=0), add_adapters(build(), router_layer=0, count=2)):
            lora = sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules()
                          if isinstance(m, LoraLayer))
            assert lora == sorted(f"{prefix}.{i}.{name}" for i in (1, 2) for name in names)
            assert all(p.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)


def test_record_results_help_is_its_own_and_writes_nothing(tmp_path):
    """``--help`` printed ``gatedlora bench``'s usage (the options it passes on), without ``--table-only``."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "record_results.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0 and "--table-only" in done.stdout and "usage: gatedlora" not in done.stdout
    assert list(tmp_path.iterdir()) == []
