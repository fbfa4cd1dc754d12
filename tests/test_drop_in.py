"""patch_model on PEFT models: force_gate(1) is PEFT LoRA, force_gate(0) is the base model bitwise."""
import copy

import pytest
import torch

from gatedlora import GatedLoRALinear, GatedLoraConfig, force_gate, patch_model, unpatch_model
from peft import LoraConfig, get_peft_model
from tiny_models import padded_batch, randomize_lora_b, tiny_peft_model, tiny_t5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patched_peft_model_matches_peft_and_base(arch):
    model = tiny_peft_model(arch)
    ids, mask = padded_batch([5, 9, 3], 9, side="left")
    with torch.no_grad():
        peft_logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids, attention_mask=mask).logits
        assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapter really changes the output
        patch_model(model)
        assert sum(isinstance(m, GatedLoRALinear) for m in model.modules()) == 7 * 3
        # fresh token gates start open: the drop-in promise
        assert (model(input_ids=ids, attention_mask=mask).logits - peft_logits).abs().max() < 1e-5
        with force_gate(model, 1.0):
            assert (model(input_ids=ids, attention_mask=mask).logits - peft_logits).abs().max() < 1e-5
        with force_gate(model, 0.0):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_logits)


def test_patch_shares_weights_and_unpatch_restores_exactly():
    model = tiny_peft_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    lora_a = model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight
    patch_model(model)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, GatedLoRALinear)
    assert layer.lora_A["default"].weight is lora_a  # shared, not copied
    assert patch_model(model) is model  # patching twice is harmless
    assert sum(isinstance(m, GatedLoRALinear) for m in model.modules()) == 21
    patched_keys = set(model.state_dict())
    assert set(before) <= patched_keys  # PEFT's keys unchanged, gate parameters added
    assert all(k.endswith(("gate_weight", "gate_bias")) for k in patched_keys - set(before))
    unpatch_model(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_patch_with_a_different_config_needs_unpatch():
    model = tiny_peft_model("llama")
    patch_model(model)
    with pytest.raises(ValueError, match="already patched with a different GatedLoraConfig"):
        patch_model(model, GatedLoraConfig(gate="none"))


def test_gate_none_is_plain_lora_and_soft_force_gate_scales():
    model = tiny_peft_model("llama")
    ids, mask = padded_batch([4, 6], 6)
    with torch.no_grad():
        peft_logits = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, GatedLoraConfig(gate="none"))
        assert (model(input_ids=ids, attention_mask=mask).logits - peft_logits).abs().max() < 1e-5
        with force_gate(model, 0.5):
            half = model(input_ids=ids, attention_mask=mask).logits
        assert (half - peft_logits).abs().max() > 1e-4


def test_fresh_adapter_on_plain_model_starts_as_the_base_model():
    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm("qwen2")
    ids, mask = padded_batch([4, 6], 6)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, GatedLoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16))
        layer = model.model.layers[0].self_attn.q_proj
        assert isinstance(layer, GatedLoRALinear) and layer.rank == 8 and layer.scaling == 2.0
        assert torch.all(layer.lora_B["default"].weight == 0) and layer.lora_A["default"].weight.abs().sum() > 0
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_block_linear_names_reads_every_block():
    """The default target_modules of fresh adapters (``gatedlora train-router``, the bench): the linear layers of
    every block, so a block unlike the first (a hybrid model's) is covered too. Only block 0 was read."""
    from tiny_models import tiny_causal_lm

    from gatedlora.patching import block_linear_names

    model = tiny_causal_lm("llama")
    projections = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert block_linear_names(model) == projections
    model.model.layers[0].mlp = torch.nn.Identity()  # block 0 without its MLP's three layers
    assert block_linear_names(model) == projections

    class Router(torch.nn.Linear):  # as Llama 4's MoE router: a forward of its own, returning a tuple
        def forward(self, x):
            return super().forward(x), x

    class Renamed(torch.nn.Linear):  # a subclass that computes what nn.Linear does
        pass

    block = model.model.layers[1]
    block.router, block.adapters, block.kept = Router(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)), Renamed(4, 4)
    # ("0", the Sequential's child, matched every block's index "model.layers.0" in target_modules)
    assert block_linear_names(model) == sorted(projections + ["kept"])


def test_unsupported_layers_get_a_clear_error():
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_causal_lm

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(TypeError, match=r"cannot patch .*embed_tokens.*supported: peft\.tuners\.lora\.Linear"):
        patch_model(model)
    plain = tiny_causal_lm("llama")
    with pytest.raises(TypeError, match=r"cannot add an adapter to .*embed_tokens \(Embedding\); supported"):
        patch_model(plain, GatedLoraConfig(target_modules=["embed_tokens"]))
    # a second adapter, not active, on a layer of a kind gatedlora does not patch: PEFT runs the base layer there,
    # and so does the patched model (it was refused)
    two = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    two.add_adapter("other", LoraConfig(r=4, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False))
    randomize_lora_b(two)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = two(input_ids=ids).logits
        patch_model(two)
        assert torch.equal(two(input_ids=ids).logits, want)
    assert type(two.base_model.model.model.embed_tokens).__name__ == "Embedding"
    dora = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(TypeError, match="DoRA are not supported \\(adapter 'default' uses Dora"):
        patch_model(dora)
    if "alora_invocation_tokens" not in LoraConfig.__dataclass_fields__:  # (PEFT >= 0.18 has aLoRA)
        return
    alora = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                               alora_invocation_tokens=[5, 6]))
    with pytest.raises(TypeError, match="adapter 'default' uses ALoraLinearVariant"):  # the variant found is named
        patch_model(alora)


def test_a_base_layer_that_returns_no_tensor_gets_a_clear_error():
    """A Linear subclass whose forward returns a tuple (an MoE router), named in target_modules on purpose: the
    base-only path passes its output on as the base model does; the adapter's path says why it cannot add."""
    class Router(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            return y, y.softmax(-1)

    model = torch.nn.Sequential(Router(8, 4))
    patch_model(model, GatedLoraConfig(target_modules=["0"], gate="none"))
    x = torch.randn(3, 8)
    with pytest.raises(TypeError, match=r"base layer \(Router\) returned a tuple, not a tensor.*target_modules"):
        model(x)
    with force_gate(model, 0.0):
        logits, probabilities = model(x)
    assert torch.equal(logits, torch.nn.functional.linear(x, model[0].weight, model[0].bias))


def test_nothing_to_patch_errors():
    from tiny_models import tiny_causal_lm

    with pytest.raises(ValueError, match="nothing to patch in LlamaForCausalLM: it has no PEFT LoRA layers"):
        patch_model(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['nope'\]"):
        patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["nope"]))


def test_merged_adapter_is_refused():
    model = tiny_peft_model("llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight; call model.unmerge_adapter"):
        patch_model(model)


def test_gpt2_conv1d_fan_in_fan_out_works():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from tiny_models import randomize_lora_b

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)).eval()
    randomize_lora_b(model)
    ids = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        patch_model(model)
        with force_gate(model, 1.0):
            assert (model(input_ids=ids).logits - want).abs().max() < 1e-5


def test_force_gate_validates():
    model = tiny_peft_model("llama")
    with pytest.raises(ValueError, match="no GatedLoRALinear layers; call patch_model first"):
        with force_gate(model, 1.0):
            pass
    patch_model(model)
    with pytest.raises(ValueError, match=r"value must be a number in \[0, 1\], got 2"):
        with force_gate(model, 2):
            pass


def test_gpt2_conv1d_training_gradients_match_peft():
    """Conv1D returns a view: the in-place add must not let autograd misroute gradients (K != N here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from tiny_models import randomize_lora_b

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True))
    randomize_lora_b(model)
    ids = torch.randint(0, 61, (2, 7))

    def lora_grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    want = lora_grads()
    patch_model(model, GatedLoraConfig(gate="none"))
    got = lora_grads()
    assert set(got) == set(want) and len(got) == 2 * 4 * 2  # c_attn, c_fc, attn.c_proj, mlp.c_proj; A and B
    assert all((got[n] - want[n]).abs().max() <= 1e-5 * (1 + want[n].abs().max()) for n in want)


def test_t5_reads_the_weight_of_a_patched_layer_and_matches_peft():
    """T5's feed-forward reads ``wo.weight.dtype``: a patched layer gives its base layer's weight and bias, as PEFT's
    lora.Linear does, read-only and outside the state_dict."""
    model = get_peft_model(tiny_t5(), LoraConfig(r=4, target_modules=["q", "v", "wo"])).eval()
    randomize_lora_b(model)
    ids, _ = padded_batch([6, 6], 6)
    args = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        peft_logits = model(**args).logits
        with model.disable_adapter():
            base_logits = model(**args).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model)
    wo = model.base_model.model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, GatedLoRALinear)
    assert wo.weight is wo.base_layer.weight and wo.bias is wo.base_layer.bias is None
    with pytest.raises((AttributeError, KeyError)):
        wo.weight = torch.nn.Parameter(torch.zeros_like(wo.weight))
    assert set(model.state_dict()) - set(before) == {k for k in model.state_dict() if k.endswith(("gate_weight",
                                                                                                   "gate_bias"))}
    with torch.no_grad():
        assert (model(**args).logits - peft_logits).abs().max() < 1e-5
        with force_gate(model, 0.0):
            assert torch.equal(model(**args).logits, base_logits)
    unpatch_model(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("training", [False, True])
def test_patched_layers_take_the_mode_of_the_layers_they_replace(training):
    """A module is built in training mode: patching a model in eval mode must not turn on a fresh adapter's LoRA
    dropout or soft training gates (train_gate="soft") until the next model.eval()."""
    from tiny_models import tiny_causal_lm

    ids, mask = padded_batch([4, 6], 6)
    fresh = tiny_causal_lm("llama").train(training)
    patch_model(fresh, GatedLoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_dropout=0.5))
    peft = tiny_peft_model("llama")
    peft.train(training)
    patch_model(peft, GatedLoraConfig(train_gate="soft"))
    for model in (fresh, peft):
        layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
        assert layers and {m.training for layer in layers for m in layer.modules()} == {training}
    if not training:
        with torch.no_grad():
            for layer in (m for m in fresh.modules() if isinstance(m, GatedLoRALinear)):
                torch.nn.init.normal_(layer.lora_B["default"].weight)  # so that dropout would show
            assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits,
                               fresh(input_ids=ids, attention_mask=mask).logits)
            soft = peft(input_ids=ids, attention_mask=mask).logits
            with force_gate(peft, 1.0):  # eval gates are hard: the fresh token gates start open
                assert torch.equal(soft, peft(input_ids=ids, attention_mask=mask).logits)


def test_token_gates_of_an_adapter_loaded_after_patching_are_not_left_on_meta(tmp_path):
    """PEFT's low_cpu_mem_usage leaves the LoRA weights on meta until load_adapter: the token gates made at patch
    time sit on the base layer's device, initialised (they were made on meta, and the forward failed inside torch
    after the adapter loaded); with every gate open the model is then the saved adapter's."""
    from tiny_models import ALL_PROJECTIONS, tiny_causal_lm

    saved = tiny_peft_model()
    saved.save_pretrained(str(tmp_path))
    ids, mask = padded_batch([5, 7], 7)
    with torch.no_grad():
        expected = saved(input_ids=ids, attention_mask=mask).logits
    model = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL_PROJECTIONS)),
                           low_cpu_mem_usage=True).eval()
    patch_model(model, GatedLoraConfig(gate="token"))
    gates = [p for n, p in model.named_parameters() if n.endswith(("gate_weight", "gate_bias"))]
    assert gates and not any(p.is_meta for p in gates)
    model.load_adapter(str(tmp_path), adapter_name="default", low_cpu_mem_usage=True)
    model.eval()
    with torch.no_grad(), force_gate(model, 1.0):
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["token", "sequence", "several adapters", "fresh sequence"])
def test_a_dropped_patched_model_is_freed_by_reference_counting(kind, tmp_path):
    """The stand-ins for PEFT's methods and the routed forward/generate wrappers sit in the model's own dicts and
    held the model strongly: a dropped patched model, every weight of it, stayed alive until Python's cyclic
    collector ran (a review saw none run over 2,000 requests). A method kept past its model says so."""
    import gc
    import weakref

    from tiny_models import MULTI_ADAPTERS, tiny_causal_lm, tiny_multi_adapter_model

    if kind == "several adapters":
        model = tiny_multi_adapter_model(layers_to_transform=[1, 2])
        config = GatedLoraConfig(gate="sequence", adapters=list(MULTI_ADAPTERS))
    elif kind == "fresh sequence":
        model = tiny_causal_lm()
        config = GatedLoraConfig(gate="sequence", target_modules=["q_proj", "v_proj"])
    else:
        model = tiny_peft_model(layers_to_transform=[1, 2] if kind == "sequence" else None)
        config = GatedLoraConfig(gate=kind)
    patch_model(model, config)
    ids, mask = padded_batch([3, 6], 6)
    gc.collect()
    gc.disable()  # only reference counting frees
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        weight = weakref.ref(next(p for n, p in model.named_parameters() if "embed_tokens" in n))
        # (a plain model's save_pretrained is transformers' own, not stood in: a bound method, which holds it)
        kept = model.save_pretrained if kind != "fresh sequence" else None
        del model
        assert weight() is None
    finally:
        gc.enable()
    if kept is not None:
        with pytest.raises(ReferenceError, match=r"save_pretrained\(\) belongs to a patched model that has been "
                                                 r"freed"):
            kept(tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()


def test_a_patched_plain_model_pickles_with_its_routed_forward_bound_to_the_copy():
    """The routed forward holds its module weakly (above); inside the model's pickle it is bound to the unpickled
    module, as it was when it held the module strongly."""
    import pickle

    from tiny_models import tiny_causal_lm

    model = tiny_causal_lm()
    patch_model(model, GatedLoraConfig(gate="sequence", target_modules=["q_proj", "v_proj"]))
    ids, mask = padded_batch([3, 6], 6)
    loaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    assert loaded.model.__dict__["forward"].inner.__self__ is loaded.model


@pytest.mark.parametrize("existing", ["bound method", "method of a partial"])
def test_a_forward_already_on_the_instance_is_wrapped_and_put_back_as_it_was(existing):
    """An instance forward set before patching (accelerate's hooks set one; here the user's own) is held as it is:
    re-binding its function failed for a MethodType over a functools.partial (no __get__), and put back an equal
    method that was not the same object."""
    import functools
    import types

    model = tiny_peft_model(layers_to_transform=[1, 2])
    backbone = model.base_model.model.model
    ids, mask = padded_batch([3, 6], 6)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    forward = (backbone.forward if existing == "bound method"
               else types.MethodType(functools.partial(type(backbone).forward), backbone))
    backbone.forward = forward
    patch_model(model, GatedLoraConfig(gate="sequence"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=0, atol=1e-5)
    unpatch_model(model)
    assert backbone.__dict__["forward"] is forward


def test_a_deep_copy_of_the_peft_tuner_alone_keeps_its_own_model():
    """The stand-ins on ``model.base_model`` hold the PeftModel weakly; a deep copy of the tuner on its own makes a
    copy of the PeftModel that nothing else holds, so its stand-ins hold that one."""
    model = tiny_peft_model()
    patch_model(model, GatedLoraConfig(gate="token"))
    tuner = copy.deepcopy(model.base_model)
    tuner.set_adapter("default")  # (a ReferenceError: the PeftModel's copy was already freed)
    assert tuner.__dict__["set_adapter"].model.base_model is tuner
