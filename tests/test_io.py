"""save_pretrained / load_pretrained round trips, next to PEFT's own adapter files; bad files."""
import json

import pytest
import torch

from gatedlora import (
    GatedLoraConfig,
    get_router,
    load_pretrained,
    patch_model,
    save_pretrained,
    unpatch_model,
)
from gatedlora.io import read_saved
from gatedlora.patching import gated_layers, is_patched
from tiny_models import padded_batch, randomize_lora_b, tiny_causal_lm, tiny_peft_model


def scramble_gates(model, seed=0):
    """Random gate and router parameters, so a round trip has something to reproduce."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate_weight" in name or "gate_bias" in name or "gate_router" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_token_gate_round_trip_beside_peft_adapter(tmp_path):
    model = tiny_peft_model("llama")
    model.save_pretrained(tmp_path)  # PEFT's own files first
    peft_files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    patch_model(model)
    scramble_gates(model)
    ids, mask = padded_batch([5, 8], 8)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    save_pretrained(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in peft_files} == peft_files
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert len(keys) == 2 * 7 * 3
    model.save_pretrained(tmp_path)  # PEFT's own save on the patched model writes the same adapter
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == keys

    from peft import PeftModel
    fresh = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path).eval()
    load_pretrained(fresh, tmp_path)
    assert is_patched(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)


def test_sequence_router_and_fresh_adapter_round_trip(tmp_path):
    model = tiny_causal_lm("qwen2", layers=3)
    cfg = GatedLoraConfig(gate="sequence", router_layer=0, target_modules=["q_proj", "down_proj"], r=4)
    patch_model(model, cfg)
    scramble_gates(model, 1)
    with torch.no_grad():
        for _, layer in gated_layers(model):
            layer.lora_B["default"].weight.normal_()
    ids, mask = padded_batch([3, 7, 5, 6], 7)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    decisions = get_router(model).last_decisions.clone()
    save_pretrained(model, tmp_path)
    meta = json.loads((tmp_path / "gatedlora_config.json").read_text())
    assert meta["config"]["gate"] == "sequence" and meta["fresh_adapter"] is True

    other = tiny_causal_lm("qwen2", layers=3)
    load_pretrained(other, tmp_path)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, want)
    assert torch.equal(get_router(other).last_decisions, decisions)


def test_a_threshold_set_on_token_gated_layers_is_named_when_the_save_cannot_record_it(tmp_path):
    """A save records the config's threshold and hardness, which a load gives every layer: one set on layers after
    patching would load as the config's with no word. Saving warns, naming the layers; a model whose layers agree
    with the config saves without it."""
    import warnings

    model = tiny_peft_model("llama")
    patch_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_pretrained(model, tmp_path / "agreeing")
    name, layer = next(iter(gated_layers(model)))
    layer.threshold = 0.9
    with pytest.warns(UserWarning, match=rf"1 token-gated layers were set to a threshold or hardness other than "
                                         rf"the config's \(threshold=0.5, hard=True\).*{name} \(threshold=0.9, "
                                         rf"hard=True\)"):
        save_pretrained(model, tmp_path / "differing")


def test_save_never_overwrites_without_asking(tmp_path):
    model = patch_model(tiny_peft_model("llama"))
    save_pretrained(model, tmp_path)
    before = (tmp_path / "gatedlora_model.safetensors").read_bytes()
    scramble_gates(model)
    with pytest.raises(FileExistsError, match="already exist; pass overwrite=True"):
        save_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):  # ("no" replaced the save)
        save_pretrained(model, tmp_path, overwrite="no")
    assert (tmp_path / "gatedlora_model.safetensors").read_bytes() == before
    save_pretrained(model, tmp_path, overwrite=True)
    assert (tmp_path / "gatedlora_model.safetensors").read_bytes() != before


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_mismatched_and_corrupt_files_change_nothing(tmp_path):
    small = patch_model(tiny_peft_model("llama", layers=2))
    save_pretrained(small, tmp_path / "two_layers")
    target = patch_model(tiny_peft_model("llama", layers=3))
    scramble_gates(target, 5)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"does not match the model: missing \[.*layers\.2"):
        load_pretrained(target, tmp_path / "two_layers")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    corrupt = tmp_path / "corrupt"
    save_pretrained(target, corrupt)
    data = (corrupt / "gatedlora_model.safetensors").read_bytes()
    (corrupt / "gatedlora_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is corrupt: its SHA-256 is not the"):
        load_pretrained(target, corrupt)
    (corrupt / "gatedlora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="gatedlora_config.json is corrupt"):
        load_pretrained(target, corrupt)
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        load_pretrained(target, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not found: not a gatedlora save directory"):
        load_pretrained(target, tmp_path / "empty")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    unpatched = tiny_peft_model("llama", layers=3)
    with pytest.raises(ValueError, match="does not match the model"):
        load_pretrained(unpatched, tmp_path / "two_layers")
    assert not is_patched(unpatched)  # a failed load leaves an unpatched model unpatched


def test_loading_into_a_differently_patched_model_is_refused(tmp_path):
    model = patch_model(tiny_peft_model("llama"))
    save_pretrained(model, tmp_path)
    other = patch_model(tiny_peft_model("llama"), GatedLoraConfig(gate="none"))
    with pytest.raises(ValueError, match=r"patched with a different config .*'gate': \('none', 'token'\)"):
        load_pretrained(other, tmp_path)
    # a sequence save into a token-gated model, which holds no router to compare (it raised AttributeError)
    routed = patch_model(tiny_peft_model("llama", layers_to_transform=[1, 2]),
                         GatedLoraConfig(gate="sequence", router_layer=0))
    save_pretrained(routed, tmp_path / "routed")
    with pytest.raises(ValueError, match=r"patched with a different config .*'gate': \('token', 'sequence'\)"):
        load_pretrained(model, tmp_path / "routed")


def test_a_router_of_another_class_with_the_same_parameters_is_refused(tmp_path):
    """The router's class was not compared: a save made with a subclass of PrismRouter (the same parameters, another
    function) loaded silently into a model patched with the default router, and router= was ignored on a patched
    model. Routes then differed from the saved model's without a word."""
    from gatedlora.routing import PrismRouter

    class SharpRouter(PrismRouter):
        def forward(self, hidden):
            return torch.sigmoid(10 * torch.logit(super().forward(hidden).float().clamp(1e-6, 1 - 1e-6)))

    def peft():
        return tiny_peft_model("llama", layers_to_transform=[1, 2])

    hidden = peft().config.hidden_size
    model = patch_model(peft(), GatedLoraConfig(gate="sequence", router=SharpRouter(hidden)))
    scramble_gates(model, 4)
    save_pretrained(model, tmp_path)
    default = patch_model(peft(), GatedLoraConfig(gate="sequence"))
    with pytest.raises(ValueError, match=r"different config .*'router': \('PrismRouter', 'SharpRouter'\)"):
        load_pretrained(default, tmp_path)
    with pytest.raises(ValueError, match="router= builds the router of an unpatched model, but the model is patched"):
        load_pretrained(default, tmp_path, router=SharpRouter(hidden))
    token_gated = patch_model(peft(), GatedLoraConfig(gate="token"))  # (no router at all: AttributeError before)
    with pytest.raises(ValueError, match="router= builds the router of an unpatched model, but the model is patched"):
        load_pretrained(token_gated, tmp_path, router=SharpRouter(hidden))
    unpatched = peft()
    with pytest.raises(ValueError, match="the save's router is a SharpRouter, router= a PrismRouter"):
        load_pretrained(unpatched, tmp_path, router=PrismRouter(hidden))
    assert not is_patched(unpatched)
    load_pretrained(unpatched, tmp_path, router=SharpRouter(hidden))
    ids, mask = padded_batch([5, 8, 3], 8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        unpatched(input_ids=ids, attention_mask=mask)
    assert torch.equal(get_router(unpatched).last_probabilities, get_router(model).last_probabilities)
    sharp = patch_model(peft(), GatedLoraConfig(gate="sequence", router=SharpRouter(hidden)))
    load_pretrained(sharp, tmp_path)  # the model's own router, of the saved class
    # a router set after patching is the one a save names (it named the class patched with)
    swapped = patch_model(peft(), GatedLoraConfig(gate="sequence"))
    get_router(swapped).router = SharpRouter(hidden)
    save_pretrained(swapped, tmp_path / "swapped")
    assert read_saved(tmp_path / "swapped")[0]["config"]["router"] == "SharpRouter"
    with pytest.raises(ValueError, match=r"different config .*'router': \('PrismRouter', 'SharpRouter'\)"):
        load_pretrained(patch_model(peft(), GatedLoraConfig(gate="sequence")), tmp_path / "swapped")
    load_pretrained(patch_model(peft(), GatedLoraConfig(gate="sequence", router=SharpRouter(hidden))),
                    tmp_path / "swapped")


def test_a_save_from_a_model_of_another_type_is_refused(tmp_path):
    """A router trained on a Llama's hidden states loaded silently onto a Qwen2 of the same width (router-only
    saves compare no layer names). The save records the model type; saves from before it load as before."""
    from gatedlora.route_only import RouteOnlyModel

    plain = tiny_causal_lm("llama")
    patch_model(plain, GatedLoraConfig(gate="sequence", r=4, target_modules=["q_proj", "v_proj"]))
    scramble_gates(plain)
    save_pretrained(plain, tmp_path / "router")
    path = tmp_path / "router" / "gatedlora_config.json"
    assert json.loads(path.read_text())["model_type"] == "llama"
    qwen2 = tiny_peft_model("qwen2", layers_to_transform=[1, 2])
    assert qwen2.config.hidden_size == plain.config.hidden_size
    with pytest.raises(ValueError, match=r"saved from a 'llama' model, this is a 'qwen2' model"):
        load_pretrained(qwen2, tmp_path / "router")
    assert not is_patched(qwen2)
    tiny_causal_lm("qwen2").save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match=r"RouteOnlyModel: .* saved from a 'llama' model, this is a 'qwen2' model"):
        RouteOnlyModel.from_pretrained(tmp_path / "qwen2", tmp_path / "router")
    load_pretrained(tiny_peft_model("llama", layers_to_transform=[1, 2]), tmp_path / "router")
    meta = json.loads(path.read_text())
    del meta["model_type"]  # as saves before it was recorded
    path.write_text(json.dumps(meta))
    load_pretrained(qwen2, tmp_path / "router")


def test_unpatch_after_load_restores_peft_state_dict(tmp_path):
    model = tiny_peft_model("llama")
    before = _snapshot(model)
    patch_model(model)
    save_pretrained(model, tmp_path)
    load_pretrained(model, tmp_path)
    unpatch_model(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_token_gate_bias_is_one_element_in_the_model_and_0_dim_in_the_file(tmp_path):
    """FSDP2's fully_shard refuses 0-dim parameters, so the bias is [1]; the file keeps format 1's 0-dim."""
    from safetensors.torch import load_file

    model = patch_model(tiny_peft_model("llama"))
    scramble_gates(model)
    biases = {name: layer.gate_bias for name, layer in gated_layers(model)}
    assert biases and all(b.shape == torch.Size([1]) for b in biases.values())
    save_pretrained(model, tmp_path)
    saved = load_file(str(tmp_path / "gatedlora_model.safetensors"))
    for name, bias in biases.items():
        assert saved[f"{name}.gate_bias"].shape == torch.Size([])
        assert saved[f"{name}.gate_bias"].item() == bias.item()
    other = patch_model(tiny_peft_model("llama"))
    load_pretrained(other, tmp_path)
    assert all(torch.equal(layer.gate_bias, biases[name]) for name, layer in gated_layers(other))


def test_only_the_main_process_writes(tmp_path):
    model = patch_model(tiny_peft_model("llama"))
    save_pretrained(model, tmp_path / "out", is_main_process=False)
    assert not (tmp_path / "out").exists()
    save_pretrained(model, tmp_path / "out", is_main_process=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gatedlora_config.json",
                                                                   "gatedlora_model.safetensors"]


@pytest.mark.parametrize("gate", ["token", "sequence"])
def test_a_partial_patch_loads_as_saved(tmp_path, gate):
    """GatedLoraConfig(target_modules=...) on a PEFT model gates some LoRA layers and leaves the others to PEFT;
    a load gates the same ones (before the fix it gated all: a token save failed, a sequence save ran wrong)."""
    from peft import PeftModel

    model = tiny_peft_model("llama", target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2])
    model.save_pretrained(tmp_path)
    patch_model(model, GatedLoraConfig(gate=gate, router_layer=0, target_modules=["q_proj"]))
    scramble_gates(model)
    if gate == "sequence":  # every sequence to the base model: the gated q_proj closed, PEFT's v_proj still on
        with torch.no_grad():
            get_router(model).router.net[-1].bias.fill_(-20.0)
    ids, mask = padded_batch([5, 8], 8)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        base = tiny_causal_lm("llama")(input_ids=ids, attention_mask=mask).logits
    assert (want - base).abs().max() > 1e-3  # the layers left to PEFT run (gating them would give the base)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "gatedlora_config.json").read_text())["config"]["target_modules"] == ["q_proj"]

    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path).eval()
    load_pretrained(loaded, tmp_path)
    assert sorted(n for n, _ in gated_layers(loaded)) == sorted(n for n, _ in gated_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)

    every_layer = patch_model(PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path).eval(),
                              GatedLoraConfig(gate=gate, router_layer=0))
    with pytest.raises(ValueError, match=r"does not match the model: missing \[.*v_proj.*gated layers: the save "
                                         r"gated 2, the model 4\); patch with the save's GatedLoraConfig"):
        load_pretrained(every_layer, tmp_path)


def test_an_older_token_gate_save_with_a_router_layer_still_loads(tmp_path):
    """router_layer never did anything with token gates and is now refused there; a save that recorded one loads,
    into an unpatched model and into one patched with the same gates."""
    from peft import PeftModel

    model = tiny_peft_model("llama")
    model.save_pretrained(tmp_path)
    patch_model(model)
    scramble_gates(model)
    save_pretrained(model, tmp_path)
    path = tmp_path / "gatedlora_config.json"
    meta = json.loads(path.read_text())
    meta["config"]["router_layer"] = 1  # as such a save wrote it
    path.write_text(json.dumps(meta))
    ids, mask = padded_batch([5, 8], 8)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    for patched_first in (False, True):
        fresh = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path).eval()
        if patched_first:
            patch_model(fresh)
        load_pretrained(fresh, tmp_path)
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, want)


def test_an_older_save_without_target_modules_gates_the_layers_it_lists(tmp_path):
    """Saves of PEFT models made before target_modules was recorded list their gated layers: a load gates those."""
    from peft import PeftModel

    model = tiny_peft_model("llama", target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path)
    patch_model(model, GatedLoraConfig(target_modules=["v_proj"]))
    scramble_gates(model)
    save_pretrained(model, tmp_path)
    path = tmp_path / "gatedlora_config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["target_modules"]  # as those saves wrote it
    path.write_text(json.dumps(meta))
    loaded = load_pretrained(PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path).eval(), tmp_path)
    assert sorted(n for n, _ in gated_layers(loaded)) == meta["layers"]
    ids, mask = padded_batch([5, 8], 8)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("change", ["name", "r", "lora_alpha"])
def test_a_save_for_another_adapter_is_refused(tmp_path, change):
    """Gates and a router are trained for one adapter: its name, rank and alpha must be the model's."""
    from peft import LoraConfig, get_peft_model

    def peft_model(name="math", r=4, lora_alpha=8):
        lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"])
        return get_peft_model(tiny_causal_lm("llama"), lora, adapter_name=name).eval()

    save_pretrained(patch_model(peft_model()), tmp_path)
    other = peft_model(**{"name": {"name": "code"}, "r": {"r": 16}, "lora_alpha": {"lora_alpha": 64}}[change])
    want = {"name": r"name: 'code' in the model, 'math' saved", "r": r"r: 16 in the model, 4 saved",
            "lora_alpha": r"lora_alpha: 64\.0 in the model, 8\.0 saved"}
    with pytest.raises(ValueError, match=r"saved with another adapter: " + want[change] + r"\. Gates"):
        load_pretrained(other, tmp_path)
    assert not is_patched(other)
    load_pretrained(peft_model(), tmp_path)  # the adapter it was saved with


def test_a_save_for_other_ranks_per_layer_names_the_layer(tmp_path):
    """A rank per layer (PEFT's rank_pattern) that differs: the message names a layer and both ranks."""
    from peft import LoraConfig, get_peft_model

    def peft_model(pattern):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern=pattern)
        return get_peft_model(tiny_causal_lm("llama"), lora).eval()

    save_pretrained(patch_model(peft_model({"layers.1.self_attn.q_proj": 2})), tmp_path)
    with pytest.raises(ValueError, match=r"another adapter: r differs on 1 layer, base_model\.model\.model\.layers\.1\."
                                         r"self_attn\.q_proj: 3 in the model, 2 saved\. Gates"):
        load_pretrained(peft_model({"layers.1.self_attn.q_proj": 3}), tmp_path)
    with pytest.raises(ValueError, match=r"another adapter: r: 4 in the model, one per layer \(\['2', '4'\]\) saved"):
        load_pretrained(peft_model({}), tmp_path)


def test_several_adapters_swapped_under_each_others_names_are_refused(tmp_path):
    """Two adapters of one rank and alpha on different layers, loaded under each other's names: the router's
    routes would send every sequence to the other adapter, so the load refuses (the save records the layers
    that hold each adapter). Loaded under their own names, in another order, they load and route as saved; a
    save from before the layers were recorded still loads."""
    from peft import LoraConfig, PeftModel, get_peft_model

    configs = {"alpha": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]),
               "beta": LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], layers_to_transform=[2])}
    model = get_peft_model(tiny_causal_lm("llama"), configs["alpha"], adapter_name="alpha")
    model.add_adapter("beta", configs["beta"])
    model.save_pretrained(tmp_path / "peft")
    patch_model(model.eval(), GatedLoraConfig(gate="sequence", router_layer=0, adapters=["alpha", "beta"]))
    save_pretrained(model, tmp_path / "router")

    def fresh(loads):
        (name, folder), *others = loads
        peft = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "peft" / folder, adapter_name=name)
        for name, folder in others:
            peft.load_adapter(tmp_path / "peft" / folder, adapter_name=name)
        return peft.eval()

    swapped = fresh([("alpha", "beta"), ("beta", "alpha")])
    # each adapter named with what differs (the message held both whole records: 89,543 characters for 4 adapters
    # on 32 blocks, with nothing saying which field of which adapter differed)
    with pytest.raises(ValueError, match=r"saved with another adapter: adapter 'alpha': layers: 4 saved layers not in "
                                         r"the model \[.*\], 2 in the model not saved \[.*\]; adapter 'beta': layers: "
                                         r"2 saved layers not in the model"):
        load_pretrained(swapped, tmp_path / "router")
    assert not is_patched(swapped)
    other_rank = fresh([("alpha", "alpha")])
    other_rank.add_adapter("beta", LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                                              layers_to_transform=[2]))
    with pytest.raises(ValueError, match=r"another adapter: adapter 'beta': r: 2 in the model, 4 saved\. Gates") \
            as refused:
        load_pretrained(other_rank.eval(), tmp_path / "router")
    assert len(str(refused.value)) < 500
    load_pretrained(fresh([("beta", "beta"), ("alpha", "alpha")]), tmp_path / "router")
    path = tmp_path / "router" / "gatedlora_config.json"
    meta = json.loads(path.read_text())
    assert meta["adapter"]["adapters"]["beta"]["layers"] == sorted(
        n for n, m in gated_layers(model) if "beta" in m.adapter_names)
    for record in meta["adapter"]["adapters"].values():
        del record["layers"]  # as saves before it wrote them
    path.write_text(json.dumps(meta))
    load_pretrained(fresh([("alpha", "alpha"), ("beta", "beta")]), tmp_path / "router")


def test_a_router_trained_before_its_lora_loads_onto_the_peft_model_trained_after(tmp_path):
    """PRISM's recipe: the router first, on the plain model (a fresh adapter, never trained: every lora_B zero,
    as `gatedlora train-router` without --adapter saves it), then the LoRA with PEFT, then load_pretrained onto
    that PEFT model. The router reads the blocks before any adapter, so it loads there and gates the PEFT
    model's own LoRA layers; its routes are the saved model's. A save whose fresh adapter was trained holds an
    adapter that such a load would drop: it is refused, as before."""
    from peft import LoraConfig, get_peft_model

    plain = tiny_causal_lm("llama")
    patch_model(plain, GatedLoraConfig(gate="sequence", router_layer=0, r=4, target_modules=["q_proj", "v_proj"]))
    scramble_gates(plain)
    ids, mask = padded_batch([5, 8, 3, 7], 8)
    with torch.no_grad():  # half the batch to each route
        plain(input_ids=ids, attention_mask=mask)
        last = [m for m in get_router(plain).router.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias -= torch.logit(get_router(plain).last_probabilities.double()).median().float()
        plain(input_ids=ids, attention_mask=mask)
    save_pretrained(plain, tmp_path / "router")
    routes = get_router(plain).last_decisions
    assert 0 < int(routes.sum()) < len(routes)

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                      layers_to_transform=[1, 2])
    peft = get_peft_model(tiny_causal_lm("llama"), lora, adapter_name="prism").eval()
    randomize_lora_b(peft)
    with torch.no_grad():
        with_adapter = peft(input_ids=ids, attention_mask=mask).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids, attention_mask=mask).logits
    load_pretrained(peft, tmp_path / "router")
    with torch.no_grad():
        got = peft(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(get_router(peft).last_decisions, routes)
    assert torch.equal(got[~routes], base[~routes])
    torch.testing.assert_close(got[routes], with_adapter[routes], rtol=0, atol=1e-5)

    # the README's order: patch_model first, then load the router into the patched model
    unpatch_model(peft)
    patch_model(peft, GatedLoraConfig(gate="sequence", router_layer=0))
    load_pretrained(peft, tmp_path / "router")
    with torch.no_grad():
        assert torch.equal(peft(input_ids=ids, attention_mask=mask).logits, got)
    assert torch.equal(get_router(peft).last_decisions, routes)

    trained = tiny_causal_lm("llama")
    patch_model(trained, GatedLoraConfig(gate="sequence", router_layer=0, r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(trained)
    save_pretrained(trained, tmp_path / "trained")
    other = get_peft_model(tiny_causal_lm("llama"), lora, adapter_name="prism").eval()
    with pytest.raises(ValueError, match="gated layers"):
        load_pretrained(other, tmp_path / "trained")
    assert not is_patched(other)


def test_holds_save_compares_values_and_says_no_for_other_shapes(tmp_path):
    """io.holds_save (the Trainer callback's resume check, which only warns): True for the saved model, False for
    other values and for other shapes, where a reshape raised before."""
    from gatedlora.io import holds_save

    def fresh(r):
        return patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["q_proj"], r=r))

    saved = fresh(8)
    randomize_lora_b(saved, seed=3)
    save_pretrained(saved, tmp_path)
    assert holds_save(saved, tmp_path)
    assert not holds_save(fresh(8), tmp_path) and not holds_save(fresh(4), tmp_path)
