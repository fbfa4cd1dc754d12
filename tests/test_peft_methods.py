"""PEFT's own methods and mixed batch on a patched model, freezing on a plain model, the config argument's type."""
import copy

import pytest
import torch
from peft import LoraConfig
from tiny_models import padded_batch, randomize_lora_b, tiny_causal_lm, tiny_multi_adapter_model, tiny_peft_model

from gatedlora import (
    GatedLoraConfig,
    GatedLoRALinear,
    force_gate,
    load_pretrained,
    patch_model,
    unpatch_model,
)


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_disable_adapter_gives_the_base_model_bitwise_and_restores_the_gates():
    model = tiny_peft_model("llama")
    ids, mask = padded_batch([5, 8], 8)
    with model.disable_adapter():
        base = logits(model, ids, mask)
    lora = logits(model, ids, mask)
    patch_model(model)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), base)
    torch.testing.assert_close(logits(model, ids, mask), lora)  # gates open again afterwards
    with force_gate(model, 1.0), model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), base)  # the inner context wins, as force_gate nests
    assert not torch.equal(base, lora)


@pytest.mark.parametrize("gate", ["token", "sequence"])
def test_disable_adapter_after_a_partial_patch_also_turns_off_the_layers_left_to_peft(gate):
    model = tiny_peft_model("llama", target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2])
    ids, mask = padded_batch([5, 8], 8)
    base = logits(tiny_causal_lm("llama"), ids, mask)
    patch_model(model, GatedLoraConfig(gate=gate, target_modules=["q_proj"]))  # v_proj stays PEFT's
    left = [m for n, m in model.named_modules() if n.endswith("v_proj") and hasattr(m, "disable_adapters")]
    assert left and not any(m.disable_adapters for m in left)
    patched = logits(model, ids, mask)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), base)
    assert not any(m.disable_adapters for m in left)  # PEFT's flag back as it was
    assert torch.equal(logits(model, ids, mask), patched)
    assert not torch.equal(patched, base)


def test_disable_adapter_blocks_that_end_out_of_order_give_peft_its_layers_back():
    """PEFT's switch is one flag per layer: two blocks open at once (two threads, two generators) must leave it as
    it was once both end, whichever ends first, and keep the base model while either is open."""
    model = tiny_peft_model("llama", target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2])
    ids, mask = padded_batch([5, 8], 8)
    base = logits(tiny_causal_lm("llama"), ids, mask)
    patch_model(model, GatedLoraConfig(target_modules=["q_proj"]))
    left = [m for n, m in model.named_modules() if n.endswith("v_proj") and hasattr(m, "disable_adapters")]
    patched = logits(model, ids, mask)
    outer, inner = model.disable_adapter(), model.disable_adapter()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert all(m.disable_adapters for m in left)  # the inner block is still open
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, mask), base)
    inner.__exit__(None, None, None)
    assert not any(m.disable_adapters for m in left)
    assert torch.equal(logits(model, ids, mask), patched)


@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter", "unload", "disable_adapter_layers",
                                    "enable_adapter_layers"])
def test_peft_methods_that_cannot_see_gated_layers_refuse_and_say_how(method):
    model = patch_model(tiny_peft_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for owner in (model, model.base_model):  # PeftModel and its LoraModel
        refusal = rf"{method}\(\) on a gatedlora-patched model: .*(unpatch_model|force_gate)"
        with pytest.raises(RuntimeError, match=refusal):
            getattr(owner, method)()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unpatch_gives_peft_its_methods_back():
    model = tiny_peft_model("llama")
    ids, mask = padded_batch([5, 8], 8)
    lora = logits(model, ids, mask)
    patch_model(model)
    unpatch_model(model)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids, mask), lora, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_disables_its_own_adapter():
    model = tiny_peft_model("llama")
    ids, mask = padded_batch([5, 8], 8)
    with model.disable_adapter():
        base = logits(model, ids, mask)
    patch_model(model)
    lora = logits(model, ids, mask)
    clone = copy.deepcopy(model)
    with clone.disable_adapter():
        assert torch.equal(logits(clone, ids, mask), base)
        assert torch.equal(logits(model, ids, mask), lora)


def test_a_deep_copy_saves_its_own_weights_and_pickling_is_refused_with_the_way_on(tmp_path):
    """A deep copy's PEFT save_pretrained writes the copy's LoRA weights, not the original's (the stand-in is
    bound to the copy), and leaves the original's files alone. Pickling a patched model (torch.save(model))
    says how to save it instead of failing inside pickle."""
    import pickle

    from safetensors.torch import load_file

    model = tiny_peft_model("llama")
    patch_model(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    model.save_pretrained(tmp_path / "original")
    clone.save_pretrained(tmp_path / "clone")
    original, copied = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("original", "clone"))
    clone_b = {n: p for n, p in clone.named_parameters() if "lora_B" in n}
    assert original.keys() == copied.keys() and any("lora_B" in k for k in copied)
    for key in copied:
        if "lora_B" in key:
            assert torch.equal(copied[key], original[key] + 1.0)
            assert any(torch.equal(copied[key], p) for p in clone_b.values())
    with pytest.raises(TypeError, match=r"patched model cannot be pickled .*gatedlora.save_pretrained"):
        pickle.dumps(model)
    unpatch_model(model)
    assert pickle.loads(pickle.dumps(model)) is not None


def test_fresh_adapters_freeze_the_base_as_get_peft_model_does():
    model = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["q_proj", "v_proj"]))
    trainable = sorted({n.rsplit(".", 2)[-2] if "lora_" in n else n.rsplit(".", 1)[-1]
                        for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["default", "gate_bias", "gate_weight"]
    sequence = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(gate="sequence", target_modules=["q_proj"]))
    assert all(p.requires_grad for p in sequence.gate_router.parameters())
    kept = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["q_proj"]), freeze_base=False)
    assert kept.model.embed_tokens.weight.requires_grad and kept.lm_head.weight.requires_grad
    # unpatching gives back the model as it was, trainable where it was (one parameter was frozen before)
    plain = tiny_causal_lm("llama")
    plain.lm_head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in plain.named_parameters()}
    unpatch_model(patch_model(plain, GatedLoraConfig(target_modules=["q_proj"])))
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == before


def test_a_refused_patch_leaves_a_plain_model_trainable():
    """patch_model freezes a plain model's parameters before it builds the router: a config refused after that (a
    router_layer past the last block) must not leave them frozen."""
    plain = tiny_causal_lm("llama")
    before = {n: p.requires_grad for n, p in plain.named_parameters()}
    with pytest.raises(ValueError, match="leaves no block for the adapter"):
        patch_model(plain, GatedLoraConfig(gate="sequence", router_layer=7, target_modules=["q_proj"]))
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == before and all(before.values())


def test_pefts_requires_grad_and_status_methods_run_on_the_view():
    """set_requires_grad, get_model_status and get_layer_status visit PEFT's layers: on the patched model they
    found none (set_requires_grad did nothing, the readers raised); they now act on the weights the gated layers
    share, as on the unpatched model."""
    model = patch_model(tiny_multi_adapter_model(layers_to_transform=[1, 2]),
                        GatedLoraConfig(gate="sequence", adapters=["math", "code"]))
    trainable = lambda name: {p.requires_grad for n, p in model.named_parameters() if f".{name}." in n}  # noqa: E731
    assert trainable("code") == {False}
    for owner in (model, model.base_model):
        owner.set_requires_grad(["code"], requires_grad=True)
        assert trainable("code") == {True}
        owner.set_requires_grad("code", requires_grad=False)
        assert trainable("code") == {False}
    assert sorted(model.get_model_status().available_adapters) == ["chat", "code", "math"]
    assert {status.module_type for status in model.get_layer_status()} == {"lora.Linear"}
    assert isinstance(model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj"), GatedLoRALinear)


def test_config_and_model_arguments_are_type_checked():
    with pytest.raises(TypeError, match=r"config must be a gatedlora.GatedLoraConfig or None, got dict; write "
                                        r"GatedLoraConfig\(\*\*\{'gate': 'sequence'\}\)"):
        patch_model(tiny_causal_lm("llama"), {"gate": "sequence"})
    with pytest.raises(TypeError, match="model must be a torch nn.Module .* got str"):
        patch_model("meta-llama/Llama-3-8B")
    with pytest.raises(TypeError, match="router must be an nn.Module or None, got dict"):
        load_pretrained(tiny_causal_lm("llama"), ".", router={})


def test_set_adapter_to_another_adapter_is_refused_and_to_the_active_one_runs_pefts():
    model = patch_model(tiny_multi_adapter_model())  # "math" active: the one patched
    ids, mask = padded_batch([5, 8], 8)
    before = logits(model, ids, mask)
    for owner in (model, model.base_model):
        with pytest.raises(RuntimeError, match=r"set_adapter\(\) on a gatedlora-patched model: the gated layers run "
                                               r"the adapters they were patched with \(\['math'\]\).*unpatch_model"):
            owner.set_adapter("code")
    assert model.active_adapters == ["math"] and torch.equal(logits(model, ids, mask), before)
    model.set_adapter("math", inference_mode=True)  # PEFT's own: it sets which weights train
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".math." in n)
    assert torch.equal(logits(model, ids, mask), before)


def test_delete_adapter_refuses_a_running_adapter_and_deletes_another_from_every_layer():
    model = patch_model(tiny_multi_adapter_model())
    ids, mask = padded_batch([5, 8], 8)
    before = logits(model, ids, mask)
    with pytest.raises(RuntimeError, match=r"delete_adapter\(\) on a gatedlora-patched model: the patched model runs "
                                           r"\['math'\].*unpatch_model"):
        model.delete_adapter("math")
    model.delete_adapter("code")  # runs nowhere: PEFT deletes it, from the layers the gated ones share too
    assert "code" not in model.peft_config and not any(".code." in k for k in model.state_dict())
    assert torch.equal(logits(model, ids, mask), before)
    unpatch_model(model)
    assert not any(".code." in k for k in model.state_dict())


def test_load_adapter_reloads_a_held_adapter_and_refuses_a_new_one(tmp_path):
    trained = tiny_peft_model("llama")
    randomize_lora_b(trained, seed=7)
    trained.save_pretrained(tmp_path)
    ids, mask = padded_batch([5, 8], 8)
    want = logits(trained, ids, mask)
    model = patch_model(tiny_peft_model("llama"))
    assert (logits(model, ids, mask) - want).abs().max() > 1e-3
    model.load_adapter(tmp_path, adapter_name="default")  # as the Trainer loads its best checkpoint
    torch.testing.assert_close(logits(model, ids, mask), want, rtol=0, atol=1e-5)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match=r"load_adapter\(\) on a gatedlora-patched model: \['other'\] would be a "
                                           r"new adapter.*unpatch_model.*works"):
        model.load_adapter(tmp_path, adapter_name="other")
    with pytest.raises(RuntimeError, match=r"add_adapter\(\) on a gatedlora-patched model: PEFT would wrap layers"):
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    assert list(model.state_dict()) == keys and list(model.peft_config) == ["default"]


@pytest.mark.parametrize("multi", [False, True], ids=["one adapter", "several adapters"])
def test_pefts_mixed_batch_is_refused_on_a_patched_model(multi):
    model = tiny_multi_adapter_model(layers_to_transform=[1, 2])
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, adapters=["math", "code"]) if multi else None)
    ids, mask = padded_batch([5, 8], 8)
    refusal = r"forward\(adapter_names=...\) \(PEFT's mixed batch\) on a gatedlora-patched model: .*unpatch_model"
    with pytest.raises(RuntimeError, match=refusal):
        model(input_ids=ids, attention_mask=mask, adapter_names=["math", "__base__"])
    with pytest.raises(RuntimeError, match=refusal):
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=["math", "__base__"], max_new_tokens=2)
    assert logits(model, ids, mask).isfinite().all()  # a forward without adapter_names still runs


@pytest.mark.parametrize("method", ["save_pretrained", "set_adapter", "load_adapter", "delete_adapter"])
def test_pefts_methods_leave_the_gated_layers_to_forwards_in_other_threads(method, tmp_path, monkeypatch):
    """PEFT's methods run on a view of the model with PEFT's layers in it; the model keeps its gated layers, so a
    forward that another thread runs while one is in progress computes its own gates (before, PEFT's layers were
    put back into the model for the call, and such a forward ran the adapter where its gate was closed)."""
    import threading

    from peft import PeftModel

    model = patch_model(tiny_multi_adapter_model())  # "math" patched; "code" and "chat" run nowhere
    model.save_pretrained(tmp_path)
    ids, mask = padded_batch([5, 8], 8)
    with model.disable_adapter():
        base = logits(model, ids, mask)
    out = {}

    def forward():
        with force_gate(model, 0.0):  # in this thread only: the base model
            out["logits"] = logits(model, ids, mask)

    pefts = getattr(PeftModel, method)

    def with_a_forward_meanwhile(self, *args, **kwargs):  # PEFT's method, a whole forward run in its midst
        thread = threading.Thread(target=forward)
        thread.start()
        thread.join()
        return pefts(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, method, with_a_forward_meanwhile)
    {"save_pretrained": lambda: model.save_pretrained(tmp_path / "again"),
     "set_adapter": lambda: model.set_adapter("math"),
     "load_adapter": lambda: model.load_adapter(tmp_path / "math", adapter_name="math"),
     "delete_adapter": lambda: model.delete_adapter("code")}[method]()
    assert torch.equal(out["logits"], base)
    if method == "delete_adapter":
        assert "code" not in model.peft_config and not any(".code." in k for k in model.state_dict())


def test_attributes_a_peft_method_sets_on_the_view_reach_the_model():
    from gatedlora.patching import gated_layers, peft_view

    model = patch_model(tiny_peft_model("llama"))
    layers = dict(gated_layers(model))
    with peft_view(model) as view:
        assert view is not model and not any(True for _ in gated_layers(view))
        assert dict(gated_layers(model)) == layers  # the model itself keeps its layers meanwhile
        view.base_model.active_adapter = "renamed"
        view.base_model.model.model.note = "set on a copy"
        view.base_model.model.model.extra = torch.nn.Linear(2, 2)
    assert model.base_model.active_adapter == "renamed" and model.base_model.model.model.note == "set on a copy"
    assert isinstance(model.base_model.model.model.extra, torch.nn.Linear)
    assert dict(gated_layers(model)) == layers


def test_load_adapter_leaves_the_gated_layers_in_eval_mode_as_peft_leaves_its_own(tmp_path):
    """PEFT's load_adapter(is_trainable=False) ends in model.eval(); run on the view, that flag has to reach the
    gated layers too (it reached PEFT's layers only, and soft training gates stayed on)."""
    model = tiny_peft_model("llama")
    model.save_pretrained(tmp_path)
    patch_model(model, GatedLoraConfig(train_gate="soft"))
    model.train()
    model.load_adapter(tmp_path, adapter_name="default")
    assert not model.training and not any(m.training for m in model.modules())


def test_load_adapter_in_eval_mode_also_turns_off_a_gated_layer_set_to_train_on_its_own(tmp_path):
    """PEFT's eval() at the end of load_adapter reaches every module, whatever the model's flag was: the view's
    eval() is made again on the model (a changed flag alone was carried back, and the model's had not changed)."""
    from gatedlora.patching import gated_layers

    model = tiny_peft_model("llama")
    model.save_pretrained(tmp_path)
    patch_model(model, GatedLoraConfig(train_gate="soft")).eval()
    _, layer = next(iter(gated_layers(model)))
    layer.train()
    model.load_adapter(tmp_path, adapter_name="default")
    assert not any(m.training for m in model.modules())


def test_pefts_save_of_a_sequence_gated_model_with_bias_all_holds_no_router(tmp_path):
    """LoraConfig(bias="all") saves every bias PEFT's model has; the router is not PEFT's, so the file is the
    unpatched model's, byte for byte (the view showed PEFT the router too), and the router stays in the model."""
    from peft import LoraConfig, get_peft_model

    from gatedlora import get_router

    def model_with_bias_all():
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2], bias="all")
        peft = get_peft_model(tiny_causal_lm("llama"), lora).eval()
        randomize_lora_b(peft)
        return peft

    model_with_bias_all().save_pretrained(tmp_path / "unpatched")
    model = model_with_bias_all()
    patch_model(model, GatedLoraConfig(gate="sequence"))
    router = get_router(model)
    model.save_pretrained(tmp_path / "patched")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "unpatched" / name).read_bytes(), name
    assert get_router(model) is router
    # a state dict passed in, as the Trainer passes one under DeepSpeed or FSDP, holds the router too
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "given" / name).read_bytes() == (tmp_path / "unpatched" / name).read_bytes(), name


def test_transformers_peft_integration_methods_run_on_the_view(tmp_path, monkeypatch):
    """A transformers model with adapters loaded by its own PEFT integration: its readers and switches find
    PEFT's layers by visiting the model, so on a patched model they run on the view (they raised before)."""
    import transformers.integrations.peft as integration

    # (this environment pairs transformers 5.24 with peft 0.21, below the version its integration asks for; what
    # is tested here is gatedlora's stand-ins, which behave as the unpatched model does with the same check off)
    monkeypatch.setattr(integration, "check_peft_version", lambda *args, **kwargs: None)
    tiny_peft_model(layers_to_transform=[1, 2]).save_pretrained(tmp_path / "one")
    tiny_peft_model(layers_to_transform=[1, 2], seed=7).save_pretrained(tmp_path / "two")

    def with_adapters(patched):
        model = tiny_causal_lm()
        model.load_adapter(tmp_path / "one", adapter_name="one")
        model.load_adapter(tmp_path / "two", adapter_name="two")
        model.set_adapter("one")
        return patch_model(model.eval()) if patched else model.eval()

    plain, patched = with_adapters(False), with_adapters(True)
    assert patched.active_adapters() == plain.active_adapters() == ["one"]
    want, got = plain.get_adapter_state_dict("one"), patched.get_adapter_state_dict("one")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    patched.set_adapter("one")
    patched.delete_adapter("two")
    assert list(patched.peft_config) == ["one"] and not any(".two." in k for k in patched.state_dict())
    with pytest.raises(RuntimeError, match=r"disable_adapters\(\) on a gatedlora-patched model: PEFT's switch does "
                                           r"not reach gatedlora's layers"):
        patched.disable_adapters()  # (it did nothing: the adapter kept running)
    # a PeftModel has no adapters of transformers' own: nothing of that integration is stood in there
    peft = patch_model(tiny_peft_model())
    assert "get_adapter_state_dict" not in peft.__dict__ and "disable_adapters" not in peft.__dict__


def test_the_tuner_inside_a_peft_model_is_refused_before_anything_changes():
    """patch_model(peft_model.base_model) failed after swapping the layers (the LoraModel reaches save_pretrained
    through __getattr__): half patched, and the PeftModel's save_pretrained then wrote an empty adapter."""
    model = tiny_peft_model(layers=3)
    with pytest.raises(TypeError, match=r"LoraModel is the tuner inside a PeftModel .* pass the PeftModel itself"):
        patch_model(model.base_model)
    assert not any(isinstance(m, GatedLoRALinear) for m in model.modules())
    patch_model(model)
    assert any(isinstance(m, GatedLoRALinear) for m in model.modules())


def test_peft_state_dict_functions_work_on_the_peft_view():
    """PEFT's module-level state-dict functions visit PEFT's layer types: on a patched model they return {} and
    load nothing; on gatedlora.peft_view(model) they read and write the gated layers' weights."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    import gatedlora

    model = tiny_peft_model(layers=3)
    before = get_peft_model_state_dict(model)
    patch_model(model)
    with gatedlora.peft_view(model) as view:
        read = get_peft_model_state_dict(view)
    assert read.keys() == before.keys() and all(torch.equal(read[k], before[k]) for k in before)
    new = {k: torch.randn_like(v) for k, v in before.items()}
    with gatedlora.peft_view(model) as view:
        assert not set_peft_model_state_dict(view, new).unexpected_keys
    layer = next(m for m in model.modules() if isinstance(m, GatedLoRALinear))
    key = next(k for k in new if k.startswith(layer_name(model, layer)) and "lora_A" in k)
    assert torch.equal(layer.lora_A[layer.adapter_name].weight, new[key])


def layer_name(model, layer):
    return next(name for name, m in model.named_modules() if m is layer)


def test_force_gate_takes_a_numpy_value():
    import numpy as np

    model = patch_model(tiny_peft_model("llama"))
    ids, mask = padded_batch([5, 8], 8)
    with force_gate(model, 1.0):
        want = logits(model, ids, mask)
    with force_gate(model, np.float32(1.0)):
        assert torch.equal(logits(model, ids, mask), want)
    with pytest.raises(ValueError, match=r"value must be a number in \[0, 1\], got np.True_"):
        with force_gate(model, np.bool_(True)):
            pass
