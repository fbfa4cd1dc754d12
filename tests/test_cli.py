"""The `gatedlora bench` command: argument errors, and a quick run that writes JSON and a plot."""
import json
import subprocess
import sys

import pytest
import torch

from gatedlora.cli import main


@pytest.mark.parametrize("argv,message", [
    (["bench", "--adapter", "."], "--adapter needs --model"),
    (["bench", "--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["bench", "--budget", "0"], "--budget must be a positive number of seconds, got 0.0"),
    (["bench", "--budget", "inf"], "--budget must be a positive number of seconds, got inf"),
    (["bench", "--budget", "nan"], "--budget must be a positive number of seconds, got nan"),
    (["bench", "--router-layer", "99"],
     "--router-layer: router_layer=99 leaves no block for the adapter: the model has 4 blocks, so router_layer must"),
    (["bench", "--backends", "tpu"], "--backends 'tpu': expected names from"),
    (["bench", "--json", "/no/such/dir/r.json"], "the directory /no/such/dir does not exist"),
    (["bench", "--plot", "r.pdf"], "expected a .png file name"),
    (["bench", "--device", "cuda"], "no CUDA device is available"),
    (["bench", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["bench", "--adapters", "0"], "--adapters must be >= 1, got 0"),
    (["bench", "--adapters", "2", "--model", ".", "--adapter", "."], "--adapters makes its own fresh adapters"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_exit_non_zero_with_a_message(argv, message, capsys):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("keep me")
    with pytest.raises(SystemExit):
        main(["bench", "--json", str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.slow
def test_quick_bench_writes_table_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", "--quick", "--budget", "0.01", "--no-progress", "--json", str(json_path),
                 "--plot", str(plot_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "prefill b=4 t=32 open 1/4" in table and "gatedlora torch ms (x base)" in table
    result = json.loads(json_path.read_text())
    assert result["environment"]["versions"]["torch"] and result["environment"]["device"].startswith("CPU")
    for scenario in result["scenarios"]:
        times = scenario["median_ms"]
        assert set(times) >= {"base", "peft", "peft mixed", "gatedlora torch"}
        assert scenario["ratio_to_base"]["peft"] == pytest.approx(times["peft"] / times["base"])
        assert scenario["check"] in ("ok", "not checked (decode)")
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_bench_with_several_adapters(tmp_path, capsys):
    """gatedlora bench --adapters: PEFT's mixed batch, one PEFT forward per route group and (decode) PEFT with one
    adapter on every sequence against gatedlora, outputs checked (base sequences bitwise) before timing."""
    json_path = tmp_path / "r.json"
    code = main(["bench", "--quick", "--adapters", "3", "--budget", "0.01", "--no-progress", "--json", str(json_path)])
    assert code == 0
    assert "decode b=4 t=32 3 adapters, 1/4 base" in capsys.readouterr().out
    result = json.loads(json_path.read_text())
    for scenario in result["scenarios"]:
        assert scenario["check"] == "ok" and scenario["adapters"] == 3 and scenario["routes"].count(0) == 1
        assert set(scenario["median_ms"]) >= {"base", "peft mixed", "peft per group", "gatedlora torch"}
        # the check's measured differences from PEFT's mixed batch, both PEFT plans' spread among them (fp32)
        assert set(scenario["differences"]) == {"peft per group", "gatedlora torch"}
        assert all(0.0 <= d <= result["check_tolerance"] for d in scenario["differences"].values())
    assert "peft one adapter" in result["scenarios"][1]["median_ms"]


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gatedlora", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--adapter PATH" in out.stdout


def test_a_bare_call_prints_help_and_version_is_known(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: gatedlora" in out and "bench" in out and "train-router" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    from gatedlora import __version__

    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"gatedlora {__version__}"


def test_an_error_is_one_line_with_a_hint_and_no_usage_block(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--budget", "0"])
    err = capsys.readouterr().err
    assert err.splitlines() == ["gatedlora bench: error: --budget must be a positive number of seconds, got 0.0 "
                                "(see `gatedlora bench --help`)"]


def test_plot_without_matplotlib_fails_before_any_timing(monkeypatch, capsys, tmp_path):
    import gatedlora.benchmarking.runner as runner

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setattr(runner, "run_model_benchmark", lambda **kw: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--plot", str(tmp_path / "r.png")])
    assert exit_info.value.code == 2
    assert "--plot needs matplotlib, which is not installed" in capsys.readouterr().err


def test_a_backend_that_cannot_run_here_fails_before_any_timing(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit):
        main(["bench", "--backends", "triton"])
    expected = "no gatedlora backend can run here: gatedlora triton: skipped, needs a CUDA device"
    assert expected in capsys.readouterr().err


def test_outputs_of_the_wrong_kind_and_non_models_fail_before_any_work(tmp_path, capsys):
    """A --model directory that holds no model, a routes file that is a directory, a router save that is a file:
    one-line errors before a model is built or trained (before, a traceback after the work)."""
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "file").write_text("")
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "label": 0}\n')
    cases = [(["bench", "--quick", "--model", str(tmp_path)], f"--model {tmp_path}: not a Transformers model"),
             (["train-router", "--model", str(tmp_path), "--data", str(tmp_path / "data.jsonl"), "--out",
               str(tmp_path / "file")], "is a file: expected a directory for the router's save")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_bench_refuses_a_bad_adapter_or_a_directory_for_a_file_before_any_timing(tmp_path, capsys):
    """--adapter that is no PEFT adapter, or one that covers block 0 (router_layer 0): one line, exit 2 (a
    traceback before). --json naming a directory: refused before the run (it failed writing, after it). The help
    gives the rounds the timing really takes."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_causal_lm

    from gatedlora.benchmarking.timing import MIN_ROUNDS

    tiny_causal_lm(layers=3).save_pretrained(tmp_path / "model")
    get_peft_model(tiny_causal_lm(layers=3), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    (tmp_path / "not-an-adapter").mkdir()
    model = ["bench", "--quick", "--model", str(tmp_path / "model")]
    cases = [(model + ["--adapter", str(tmp_path / "not-an-adapter")], "not a PEFT adapter directory"),
             (model + ["--adapter", str(tmp_path / "adapter")], "LoRA covers layers at or before block 0"),
             (["bench", "--quick", "--json", str(tmp_path), "--overwrite"], "is a directory: expected a file name")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert f"at least {MIN_ROUNDS}" in " ".join(capsys.readouterr().out.split())


def test_train_router_and_route_load_the_model_in_one_dtype_by_default():
    """train-router trains on the numbers that route computes with: both load the checkpoint as from_pretrained
    does by default ("auto", its own dtype) unless --dtype says otherwise, and --dtype means the same in both."""
    import argparse

    from gatedlora.cli import _route_parser, _train_router_parser, load_dtype

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _train_router_parser(sub)
    _route_parser(sub)
    trained = parser.parse_args(["train-router", "--model", "m", "--data", "d.jsonl"])
    routed = parser.parse_args(["route", "--model", "m", "--router", "r", "--data", "d.jsonl", "--out", "o"])
    assert trained.dtype == routed.dtype == "auto" and load_dtype("auto") == "auto"
    for name in ("float32", "bfloat16", "float16"):
        assert parser.parse_args(["train-router", "--model", "m", "--data", "d", "--dtype", name]).dtype == name
        assert load_dtype(name) is getattr(torch, name)


def test_models_and_adapters_that_do_not_load_are_one_line_errors(tmp_path, capsys):
    """A --model directory with a config and no weights (Transformers' OSError) and an --adapter trained on a model
    of another width (PEFT's RuntimeError, a line per tensor) gave tracebacks: now one line, exit 2."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_causal_lm
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny_causal_lm(layers=3).save_pretrained(tmp_path / "model")
    tiny_causal_lm(layers=3).config.save_pretrained(tmp_path / "no-weights")
    width = tiny_causal_lm(layers=3).config.hidden_size
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=2 * width, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(wider, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1, 2])).save_pretrained(
        tmp_path / "other-adapter")
    capsys.readouterr()  # the progress bars of the saves
    bench = ["bench", "--quick", "--budget", "0.01", "--no-progress"]
    cases = [(bench + ["--model", str(tmp_path / "no-weights")], "no file named model.safetensors"),
             (bench + ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "other-adapter")],
              "size mismatch for base_model.model.model.layers.1.self_attn.q_proj.lora_A")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
        assert len(err.splitlines()) == 1
    assert "(an adapter trained on another model?)" in err


@pytest.mark.parametrize("command", ["bench", "train-router", "route"])
def test_an_output_place_that_cannot_be_written_is_refused_before_any_work(command, tmp_path, monkeypatch, capsys):
    """--json, --out: a directory the user cannot write into was found after the whole run (a PermissionError
    traceback, the work lost). The check makes a temporary file there first; here that fails as it does without
    write permission (the tests may run as root, which permissions do not stop)."""
    import gatedlora.cli as cli

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", denied)
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "label": 0}\n{"prompt": "b", "label": 1}\n')
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "gatedlora_config.json").write_text("{}")
    argv, flag = {
        "bench": (["bench", "--quick", "--json", str(tmp_path / "ro" / "r.json")], "--json"),
        "train-router": (["train-router", "--model", str(tmp_path), "--data", str(tmp_path / "data.jsonl"),
                          "--out", str(tmp_path / "ro" / "router")], "--out"),
        "route": (["route", "--model", str(tmp_path), "--router", str(tmp_path / "router"), "--data",
                   str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "ro" / "routes.jsonl")], "--out"),
    }[command]
    (tmp_path / "ro").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"{flag} {argv[-1]}: cannot write in {tmp_path / 'ro'} (Permission denied)" in err


def test_routing_commands_load_a_causal_lm_whose_class_is_not_named_for_causal_lm(tmp_path):
    """GPT-2's causal LM is GPT2LMHeadModel: train-router and route loaded it as the bare GPT2Model, whose module
    names lack the 'transformer.' prefix, so an adapter of the causal LM did not load (or loaded none of its
    weights) and the save fitted no model users generate with."""
    import argparse

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from gatedlora.cli import _load_for_routing, _train_router_parser
    from gatedlora.patching import gated_layers

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "model")
    peft = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "model"),
                          LoraConfig(r=4, target_modules=["c_attn"], layers_to_transform=[1, 2],
                                     init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    parser = argparse.ArgumentParser()
    _train_router_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-router", "--model", str(tmp_path / "model"), "--data", "d.jsonl",
                              "--adapter", str(tmp_path / "adapter"), "--device", "cpu"])
    args.adapters = None  # (what the argument check sets for one unnamed --adapter)
    model = _load_for_routing(args)
    assert type(model.get_base_model()).__name__ == "GPT2LMHeadModel"
    names = [name for name, _ in gated_layers(model)]
    assert names == [f"base_model.model.transformer.h.{i}.attn.c_attn" for i in (1, 2)]
    for name, layer in gated_layers(model):
        saved = peft.get_submodule(name).lora_B["default"].weight
        assert torch.equal(layer.lora_B["default"].weight, saved)


def test_train_router_fresh_adapter_covers_the_models_own_linear_layers_by_default(tmp_path):
    """Without --target-modules the fresh adapter goes on every linear layer of the blocks after --router-layer.
    The default was Llama's projection names, which GPT-2 has none of: it was refused ("choose some with
    --target-modules")."""
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel

    from gatedlora.cli import _load_for_routing, _train_router_parser
    from gatedlora.patching import gated_layers

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "model")
    parser = argparse.ArgumentParser()
    _train_router_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-router", "--model", str(tmp_path / "model"), "--data", "d.jsonl",
                              "--device", "cpu"])
    args.adapters = None  # (what the argument check sets without --adapter)
    names = [name for name, _ in gated_layers(_load_for_routing(args))]
    assert names == [f"transformer.h.{i}.{layer}" for i in (1, 2)
                     for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
