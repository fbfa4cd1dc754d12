"""Saves that cannot tear or rot: failures and kills at every step of an overwrite, damaged and
ill-typed tensors, file modes, and what the config records."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_io import scramble_gates
from tiny_models import tiny_peft_model

import gatedlora.io as gio
from gatedlora import load_pretrained, patch_model, save_pretrained
from gatedlora.patching import gated_layers, patch_state

TESTS = Path(__file__).resolve().parent


def gate_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "gate_" in n}


def saved_model(seed):
    model = patch_model(tiny_peft_model("llama", layers=2))
    scramble_gates(model, seed)
    return model


def loaded_gates(path):
    """The gates a fresh model gets from ``path``."""
    return gate_values(load_pretrained(tiny_peft_model("llama", layers=2), path))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(path):
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith("."))


@pytest.fixture
def old_and_new(tmp_path):
    """A directory holding the save of model ``old``, and a model ``new`` with other gates."""
    old, new = saved_model(1), saved_model(2)
    save_pretrained(old, tmp_path)
    assert not same(gate_values(old), gate_values(new))
    return tmp_path, gate_values(old), new


class Failure(OSError):
    pass


def fail_on_call(monkeypatch, target, attribute, failing_calls):
    """Make ``target.attribute`` raise Failure on the given (1-based) calls, and run it otherwise."""
    original = getattr(target, attribute)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) in failing_calls:
            raise Failure(f"simulated failure of {attribute} call {len(calls)}")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, wrapper)
    return calls


# step -> (what fails, on which calls): writing the pending weights, writing the config, the commit
# (renaming the config into place), renaming the weights into place (the commit is rolled back)
FAILURES = {
    "weights write": ("_write_new_file", {1}),
    "config write": ("_write_new_file", {2}),
    "commit": ("replace", {1}),
    "weights rename": ("replace", {2}),
}


@pytest.mark.parametrize("step", list(FAILURES))
def test_an_overwrite_that_fails_leaves_the_old_save_and_no_temp_files(old_and_new, monkeypatch, step):
    path, old, new_model = old_and_new
    attribute, calls = FAILURES[step]
    fail_on_call(monkeypatch, gio if attribute.startswith("_") else os, attribute, calls)
    with pytest.raises(Failure):
        save_pretrained(new_model, path, overwrite=True)
    monkeypatch.undo()
    assert leftovers(path) == []
    assert same(loaded_gates(path), old)


def test_a_save_that_fails_after_its_weights_are_in_place_loads_as_the_new_save(old_and_new, monkeypatch):
    """The directory's fsync fails (EIO, Ctrl-C) after both renames: the new save is whole, so it stays (the commit
    was rolled back over the new weights, and neither save loaded)."""
    path, old, new_model = old_and_new
    fail_on_call(monkeypatch, gio, "_fsync_directory", {1})
    with pytest.raises(Failure):
        save_pretrained(new_model, path, overwrite=True)
    monkeypatch.undo()
    assert leftovers(path) == []
    assert same(loaded_gates(path), gate_values(new_model))


def test_a_failed_rollback_leaves_the_new_save_loadable_and_the_next_save_tidies(old_and_new, monkeypatch):
    path, _, new_model = old_and_new
    # the weights rename fails, and so does putting the old config back: the new config is committed
    fail_on_call(monkeypatch, os, "replace", {2, 3})
    with pytest.raises(Failure):
        save_pretrained(new_model, path, overwrite=True)
    monkeypatch.undo()
    assert len(leftovers(path)) == 1  # the committed weights, under their pending name
    assert same(loaded_gates(path), gate_values(new_model))
    save_pretrained(new_model, path, overwrite=True)
    assert leftovers(path) == []
    assert same(loaded_gates(path), gate_values(new_model))


KILLED_SAVE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import gatedlora.io as gio
    from gatedlora import save_pretrained
    from test_io_safety import saved_model
    kill_at = int(sys.argv[2])
    steps = []

    def dying(original):
        def step(*args, **kwargs):
            steps.append(original.__name__)
            if len(steps) == kill_at:
                if original is gio._write_new_file:  # die half way through the write
                    with open(args[0], "wb") as handle:
                        handle.write(args[1][: len(args[1]) // 2])
                os._exit(9)
            return original(*args, **kwargs)
        return step

    gio._write_new_file = dying(gio._write_new_file)
    os.replace = dying(os.replace)
    save_pretrained(saved_model(2), sys.argv[1], overwrite=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_save_killed_at_any_step_loads_as_old_or_new(old_and_new, kill_at):
    path, old, new_model = old_and_new
    script = KILLED_SAVE.format(tests=str(TESTS))
    done = subprocess.run([sys.executable, "-c", script, str(path), str(kill_at)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    gates = loaded_gates(path)
    # killed before the commit (steps 1-3): the old save; after it (step 4): the new one
    assert same(gates, old if kill_at <= 3 else gate_values(new_model))
    save_pretrained(new_model, path, overwrite=True)  # the next save removes what the killed one left
    assert leftovers(path) == []
    assert same(loaded_gates(path), gate_values(new_model))


def rewrite_weights(path, mutate):
    """Change the saved tensors and record the new file's checksum, as a consistent but bad save would."""
    weights = path / gio.WEIGHTS_NAME
    tensors = load_file(str(weights))
    mutate(tensors)
    save_file(tensors, str(weights))
    meta = json.loads((path / gio.CONFIG_NAME).read_text())
    meta["weights_sha256"] = gio._sha256_of(weights.read_bytes())
    (path / gio.CONFIG_NAME).write_text(json.dumps(meta))


def first_key(tensors, part):
    return next(k for k in tensors if part in k)


BAD_TENSORS = {
    "NaN": (lambda t: t[first_key(t, "gate_weight")].__setitem__(0, float("nan")), "holds NaN or infinite"),
    "inf": (lambda t: t[first_key(t, "gate_bias")].fill_(float("inf")), "holds NaN or infinite"),
    "int64": (lambda t: t.__setitem__(first_key(t, "gate_bias"), torch.tensor(3)), "has dtype torch.int64"),
    "bool": (lambda t: t.__setitem__(first_key(t, "gate_weight"),
                                     torch.ones_like(t[first_key(t, "gate_weight")], dtype=torch.bool)),
             "has dtype torch.bool"),
}


@pytest.mark.parametrize("kind", list(BAD_TENSORS))
def test_ill_typed_or_non_finite_tensors_are_refused_and_change_nothing(old_and_new, kind):
    path, _, target = old_and_new
    mutate, message = BAD_TENSORS[kind]
    rewrite_weights(path, mutate)
    before = gate_values(target)
    with pytest.raises(ValueError, match=message):
        load_pretrained(target, path)
    assert same(gate_values(target), before)


def test_non_finite_router_weights_are_refused(tmp_path):
    from gatedlora import GatedLoraConfig

    model = patch_model(tiny_peft_model("llama", layers=3, layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence"))
    save_pretrained(model, tmp_path)
    rewrite_weights(tmp_path, lambda t: t[first_key(t, "gate_router")].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=r"gate_router\..* holds NaN"):
        load_pretrained(tiny_peft_model("llama", layers=3, layers_to_transform=[1, 2]), tmp_path)


class BatchNormRouter(torch.nn.Module):
    """A router with an integer buffer (BatchNorm1d's num_batches_tracked) beside its running statistics."""

    def __init__(self, hidden=40):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 1))

    def forward(self, hidden):
        return torch.sigmoid(self.net(hidden)).squeeze(-1)


def test_a_router_with_integer_buffers_round_trips(tmp_path):
    from gatedlora import GatedLoraConfig, get_router

    def model(router):
        return patch_model(tiny_peft_model("llama", layers=3, layers_to_transform=[1, 2]),
                           GatedLoraConfig(gate="sequence", router=router))

    saved = model(BatchNormRouter())
    router = get_router(saved).router
    router.train()
    with torch.no_grad():
        for seed in range(3):  # running statistics and num_batches_tracked move, as in training
            router(torch.randn(6, 40, generator=torch.Generator().manual_seed(seed)))
    router.eval()
    save_pretrained(saved, tmp_path)
    assert load_file(str(tmp_path / gio.WEIGHTS_NAME))["gate_router.net.1.num_batches_tracked"].dtype == torch.int64

    loaded = load_pretrained(model(BatchNormRouter()), tmp_path)
    state, want = get_router(loaded).router.state_dict(), router.state_dict()
    assert state["net.1.num_batches_tracked"].item() == 3
    assert all(torch.equal(state[k], want[k]) and state[k].dtype == want[k].dtype for k in want)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, saved(input_ids=ids).logits)

    # an integer tensor loads only into an integer buffer, never into a parameter
    rewrite_weights(tmp_path, lambda t: t.__setitem__("gate_router.net.0.bias", torch.zeros(8, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"gate_router\.net\.0\.bias has dtype torch\.int64 .* an integer tensor "
                                         r"loads only into an integer buffer"):
        load_pretrained(model(BatchNormRouter()), tmp_path)


def test_a_flipped_byte_in_the_payload_is_refused(old_and_new):
    path, _, target = old_and_new
    weights = path / gio.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes: still a valid safetensors file
    weights.write_bytes(bytes(data))
    before = gate_values(target)
    with pytest.raises(ValueError, match="is corrupt: its SHA-256"):
        load_pretrained(target, path)
    assert same(gate_values(target), before)


REMOVED = object()  # a field taken out of the config


@pytest.mark.parametrize("field,value,message", [
    ("weights_sha256", 5, "'weights_sha256' must be a string or null, got 5"),
    # every format-2 save records it: without it the weights loaded unchecked (review50); format 1 had none and
    # still loads (test_a_format_1_save_loads_with_the_backend_chosen_here)
    ("weights_sha256", None, "'weights_sha256' is missing, which every save of format_version 2 records"),
    ("weights_sha256", REMOVED, "'weights_sha256' is missing, which every save of format_version 2 records"),
    ("adapter", "x", "'adapter' must be an object or null, got \"x\""),
    ("config", None, "'config' must be an object, got null"),
    ("layers", {"a": 1}, "'layers' must be a list or null"),
    ("layers", [["a"]], "'layers' must be a list of layer names, got [[\"a\"]]"),  # (TypeError: unhashable)
    ("adapter", {"adapters": {"a": 5}}, "'adapter.adapters' must be null or an object of one object per adapter"),
])
def test_a_config_with_fields_of_the_wrong_json_type_is_refused_by_name(old_and_new, field, value, message):
    """Valid JSON whose fields have other types raised TypeError/AttributeError from inside the loader, or
    'unknown format_version' for a null config: now the file's corrupt-config error, naming the field."""
    path, _, target = old_and_new
    meta = json.loads((path / gio.CONFIG_NAME).read_text())
    assert meta["format_version"] == 2
    if value is REMOVED:
        del meta[field]
    else:
        meta[field] = value
    (path / gio.CONFIG_NAME).write_text(json.dumps(meta))
    before = gate_values(target)
    with pytest.raises(ValueError, match=rf"{gio.CONFIG_NAME} is corrupt or not a gatedlora config: .*"
                                         rf"{re.escape(message)}"):
        load_pretrained(target, path)
    assert same(gate_values(target), before)
    (path / gio.CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="corrupt or not a gatedlora config: expected a JSON object, got list"):
        load_pretrained(target, path)


def test_a_newer_save_and_a_bad_config_field_are_named_with_the_file(old_and_new):
    """A save of a later format was called corrupt; a config field of the wrong type, or unknown here, was named
    without the file ("GatedLoraConfig.router_layer must be ...")."""
    path, _, target = old_and_new
    config_path = path / gio.CONFIG_NAME
    meta = json.loads(config_path.read_text())
    before = gate_values(target)
    config_path.write_text(json.dumps({**meta, "format_version": gio.FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=rf"{gio.CONFIG_NAME} was written by a newer gatedlora \(format_version "
                                         rf"{gio.FORMAT_VERSION + 1}; this one reads 1, 2\): upgrade gatedlora"):
        load_pretrained(target, path)
    for change, message in (({"router_layer": "0"}, r"GatedLoraConfig.router_layer must be an int >= 0, got '0'"),
                            ({"rank": 3}, r"GatedLoraConfig: unknown fields \['rank'\]")):
        config_path.write_text(json.dumps({**meta, "config": {**meta["config"], **change}}))
        with pytest.raises(ValueError, match=rf"load_pretrained: .*{gio.CONFIG_NAME}: {message}"):
            load_pretrained(target, path)
    assert same(gate_values(target), before)


def test_a_load_while_a_save_commits_into_the_directory_gets_one_whole_save(old_and_new, monkeypatch):
    """A save that commits between the loader's reading the config and its reading the weights: the loader read
    the old config, found the new weights, and called the intact files corrupt. It now reads again and gets
    the new save, whole."""
    path, _, new = old_and_new
    read_meta = gio._read_meta
    calls = []

    def meta_then_a_save(directory):
        meta = read_meta(directory)
        calls.append(directory)
        if len(calls) == 1:
            save_pretrained(new, path, overwrite=True)  # commits between the two reads (it reads the config too)
        return meta

    monkeypatch.setattr(gio, "_read_meta", meta_then_a_save)
    assert same(loaded_gates(path), gate_values(new))


def test_files_are_written_0644_as_peft_writes_its_config(tmp_path):
    previous = os.umask(0o022)
    try:
        model = saved_model(1)
        model.save_pretrained(tmp_path)  # PEFT's own adapter beside ours
        save_pretrained(model, tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.is_file()}
    assert modes[gio.CONFIG_NAME] == modes[gio.WEIGHTS_NAME] == modes["adapter_config.json"] == 0o644


def test_the_config_records_the_adapter_it_was_saved_with(tmp_path):
    model = patch_model(tiny_peft_model("llama", layers=2, r=8, lora_alpha=16))
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / gio.CONFIG_NAME).read_text())
    assert meta["adapter"] == {"fresh": False, "name": "default", "r": 8, "lora_alpha": 16.0}
    # fields for fresh adapters (r=16, alpha=32 by default) and run-time choices are not the adapter's
    assert not {"r", "lora_alpha", "lora_dropout", "backend", "base_mode"} & set(meta["config"])
    assert meta["config"]["target_modules"] is None  # which LoRA layers are gated: all of them
    assert meta["weights_sha256"] == gio._sha256_of((tmp_path / gio.WEIGHTS_NAME).read_bytes())
    assert len(meta["layers"]) == len(list(gated_layers(model)))


def test_a_save_removes_only_the_temporary_files_saves_write(old_and_new):
    """The cleanup of interrupted saves removed every '.gatedlora-*' entry: the user's files so named too, and a
    directory so named made the save fail (IsADirectoryError)."""
    path, _, new = old_and_new
    (path / ".gatedlora-notes.txt").write_text("the user's notes")
    (path / ".gatedlora-backup").mkdir()
    (path / ".gatedlora-0123456789abcdef.json").write_text("{}")  # as an interrupted save leaves its config
    save_pretrained(new, path, overwrite=True)
    assert leftovers(path) == [".gatedlora-backup", ".gatedlora-notes.txt"]
    assert (path / ".gatedlora-notes.txt").read_text() == "the user's notes"
    assert same(loaded_gates(path), gate_values(new))


def test_a_format_1_save_loads_with_the_backend_chosen_here(old_and_new):
    """Format 1 recorded every config field, backend and base_mode included: a save made on a GPU with
    backend="cuda" failed at the first forward of the model it loaded into here. Those are chosen at load."""
    path, saved_gates, _ = old_and_new
    meta = json.loads((path / gio.CONFIG_NAME).read_text())
    config = {**meta["config"], "backend": "cuda", "base_mode": "fused"}
    v1 = {"format_version": 1, "config": config, "fresh_adapter": False, "layers": meta["layers"]}
    (path / gio.CONFIG_NAME).write_text(json.dumps(v1))
    model = load_pretrained(tiny_peft_model("llama", layers=2), path)
    assert same(gate_values(model), saved_gates)
    assert (patch_state(model).config.backend, patch_state(model).config.base_mode) == ("auto", "exact")
    model(input_ids=torch.tensor([[1, 2, 3]]))  # the cuda backend raised here


def test_a_save_into_a_file_says_so(tmp_path):
    """A save into a path that is a file, or below one, raised a bare errno (FileExistsError: File exists)."""
    model = saved_model(1)
    (tmp_path / "file").write_text("the user's")
    with pytest.raises(NotADirectoryError, match=r"save_pretrained: .*file is a file; a save is a directory"):
        save_pretrained(model, tmp_path / "file")
    below_a_file = r"save_pretrained: cannot create the directory .*file/save: .*file is a file; nothing was written"
    with pytest.raises(NotADirectoryError, match=below_a_file):
        save_pretrained(model, tmp_path / "file" / "save")
    assert (tmp_path / "file").read_text() == "the user's"


def test_a_peft_only_directory_gets_a_hint(tmp_path):
    model = tiny_peft_model("llama", layers=2)
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds a PEFT adapter \(adapter_config.json\) but no gatedlora save"):
        load_pretrained(model, tmp_path)
