"""What a PEFT model can hold that gatedlora cannot gate is refused at patch time, leaving the model as it was."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM
from tiny_models import (
    padded_batch,
    randomize_lora_b,
    tiny_causal_lm,
    tiny_peft_model,
    tiny_sequence_classifier,
    tiny_t5,
)

from gatedlora import GatedLoRALinear, GatedLoraConfig, force_gate, get_router, patch_model
from gatedlora.patching import is_patched


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_refused_and_untouched(model, config, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        patch_model(model, config)
    assert not is_patched(model) and not any(isinstance(m, GatedLoRALinear) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def classifier_with_trained_head(adapters=("default",)):
    """task_type="SEQ_CLS" puts the head (``score``) in modules_to_save; each adapter's copy gets its own values."""
    model = None
    for i, name in enumerate(adapters):
        lora = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2])
        if model is None:
            model = get_peft_model(tiny_sequence_classifier(), lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
        with torch.no_grad():  # as if the head had been trained
            model.base_model.model.score.modules_to_save[name].weight.add_(i + 1.0)
    randomize_lora_b(model)
    return model.eval()


@pytest.mark.parametrize("config", [None, GatedLoraConfig(gate="sequence", router_layer=0)], ids=["token", "sequence"])
def test_modules_to_save_are_refused_with_the_way_on(config):
    model = classifier_with_trained_head()
    assert_refused_and_untouched(model, config, r"base_model\.model\.score \(modules_to_save, adapter 'default'\)"
                                 r".*would still run those trained modules.*model\.base_model\.model\.score = "
                                 r"model\.base_model\.model\.score\.modules_to_save\['default'\]")


def test_modules_to_save_of_routed_adapters_are_refused():
    model = classifier_with_trained_head(adapters=("math", "code"))
    config = GatedLoraConfig(gate="sequence", router_layer=0, adapters=["math", "code"])
    assert_refused_and_untouched(model, config, r"score \(modules_to_save, adapter 'code', 'math'\)")


def test_the_suggested_way_on_for_modules_to_save_patches_and_keeps_the_trained_head():
    model = classifier_with_trained_head()
    ids, mask = padded_batch([5, 8], 8)
    peft = logits(model, ids, mask)
    head = model.base_model.model.score
    model.base_model.model.score = head.modules_to_save["default"]  # the refusal's suggestion
    with model.disable_adapter():
        base_with_head = logits(model, ids, mask)  # PEFT's base model, now with the trained head
    patch_model(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, mask), peft, rtol=0, atol=1e-5)
        with force_gate(model, 0.0):
            assert torch.equal(logits(model, ids, mask), base_with_head)
    assert not torch.equal(peft, base_with_head)


def test_trainable_tokens_are_refused_and_the_suggested_merge_keeps_them():
    lora = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=list(range(3, 97)))
    model = get_peft_model(tiny_causal_lm(), lora).eval()
    randomize_lora_b(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(1.0)  # as if trained
    ids, mask = padded_batch([5, 8], 8)
    peft = logits(model, ids, mask)
    assert_refused_and_untouched(model, None, r"model\.model\.embed_tokens \(trainable_token_indices, adapter "
                                              r"'default'\).*token_adapter\.merge\(\)")
    wrapper = model.base_model.model.model.embed_tokens
    wrapper.token_adapter.merge()  # the refusal's suggestion
    model.base_model.model.model.embed_tokens = wrapper.token_adapter.base_layer
    patch_model(model)
    torch.testing.assert_close(logits(model, ids, mask), peft, rtol=0, atol=1e-5)


def lora_and_loha_model():
    """A PeftMixedModel: LoRA on q_proj, LoHa on v_proj, both initialised away from the identity."""
    from peft import LoHaConfig

    model = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                           adapter_name="lora", mixed=True)
    model.add_adapter("loha", LoHaConfig(r=4, target_modules=["v_proj"], init_weights=False))
    return model.eval()


@pytest.mark.parametrize("config", [None, GatedLoraConfig(gate="sequence", router_layer=0)], ids=["token", "sequence"])
def test_active_adapters_of_other_peft_methods_are_refused(config):
    """A LoHa layer runs its adapter on every input: closed gates would not give the base model."""
    model = lora_and_loha_model()
    model.set_adapter(["lora", "loha"])
    assert_refused_and_untouched(model, config, r"layers\.0\.self_attn\.v_proj \(peft\.tuners\.loha\.layer\.Linear, "
                                                r"adapter 'loha'\).*would still run those adapters")


def test_inactive_adapters_of_other_peft_methods_are_left_alone():
    model = lora_and_loha_model()
    model.set_adapter("lora")  # PEFT runs the LoHa layers as their base layers
    ids, mask = padded_batch([5, 8], 8)
    with model.disable_adapter():
        base = logits(model, ids, mask)
    patch_model(model)
    with force_gate(model, 0.0):
        assert torch.equal(logits(model, ids, mask), base)


def test_fresh_gated_adapters_on_a_model_of_another_peft_method_are_refused():
    from peft import IA3Config

    model = get_peft_model(tiny_causal_lm(), IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                       init_ia3_weights=False)).eval()
    assert_refused_and_untouched(model, GatedLoraConfig(target_modules=["q_proj"]),
                                 r"k_proj \(peft\.tuners\.ia3\.layer\.Linear, adapter 'default'\)")


@pytest.mark.parametrize("config", [None, GatedLoraConfig(gate="sequence", router_layer=0)], ids=["token", "sequence"])
def test_adapter_layers_disabled_before_patching_are_refused_not_turned_back_on(config):
    model = tiny_peft_model("llama", layers_to_transform=[1, 2])
    model.disable_adapter_layers()
    assert_refused_and_untouched(model, config, r"layers\.1\..*its adapter is disabled \(model\.disable_adapter_"
                                                r"layers\(\)\), and patching would turn it back on\. Call model\."
                                                r"enable_adapter_layers\(\) first")
    model.enable_adapter_layers()  # the way on
    patch_model(model, config)
    assert is_patched(model)


def test_sequence_gates_refuse_lora_outside_the_blocks_where_the_routes_do_not_hold():
    """The routes are decided after block router_layer and hold inside the forward of the model that holds the
    blocks: LoRA before the blocks (T5's encoder when the decoder's blocks are routed, OPT's project_in) or outside
    that forward (lm_head) cannot be gated per sequence. Before, patch_model accepted it and the first forward
    failed with 'not decided yet'."""
    config = GatedLoraConfig(gate="sequence", router_layer=0)
    t5 = get_peft_model(tiny_t5(layers=3), LoraConfig(r=4, target_modules=["q", "v"], layers_to_transform=[1, 2]))
    assert_refused_and_untouched(t5.eval(), config, r"outside the block list base_model\.model\.decoder\.block that "
                                                    r"the routes do not reach: \['base_model\.model\.encoder\.block")
    opt_config = OPTConfig(vocab_size=97, hidden_size=40, ffn_dim=76, num_hidden_layers=3, num_attention_heads=4,
                           word_embed_proj_dim=24, pad_token_id=0, max_position_embeddings=64)  # project_in 24 -> 40
    opt = get_peft_model(OPTForCausalLM(opt_config), LoraConfig(r=4, target_modules=r".*(project_in|layers\.[12]\."
                                                                                    r"self_attn\.q_proj)"))
    assert_refused_and_untouched(opt.eval(), config, r"\['base_model\.model\.model\.decoder\.project_in'\]")
    llama = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, target_modules=r".*(layers\.[12]\.self_attn\.q_proj|"
                                                                              r"lm_head)"))
    assert_refused_and_untouched(llama.eval(), config, r"\['base_model\.model\.lm_head'\]\. The routes hold inside "
                                                       r"the forward of base_model\.model\.model \(LlamaModel\)")


def test_sequence_gates_keep_lora_after_the_blocks_inside_their_model():
    """BERT's pooler runs after the blocks, inside the forward of the model that holds them: gated per sequence,
    open as PEFT, closed the base model bitwise."""
    config = BertConfig(vocab_size=97, hidden_size=40, intermediate_size=76, num_hidden_layers=3, num_attention_heads=4,
                        pad_token_id=0, max_position_embeddings=64)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=r".*(layer\.[12]\.attention\.self\.(query|value)|pooler\.dense)")
    model = get_peft_model(BertModel(config), lora).eval()
    randomize_lora_b(model)
    ids, mask = padded_batch([5, 8], 8, side="right")
    with torch.no_grad():
        peft = model(input_ids=ids, attention_mask=mask).pooler_output
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).pooler_output
    assert (peft - base).abs().max() > 1e-3
    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0))
    assert any(n.endswith("pooler.dense") for n, m in model.named_modules() if isinstance(m, GatedLoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).pooler_output, peft, rtol=0, atol=1e-5)
        get_router(model).router.net[-1].bias.fill_(-20.0)  # every sequence to the base model
        assert torch.equal(model(input_ids=ids, attention_mask=mask).pooler_output, base)


def test_routed_adapters_of_different_dtypes_are_refused_with_the_way_on():
    """PEFT keeps adapters in fp32 on a bf16 model unless one is loaded with autocast_adapter_dtype=False: one
    router cannot choose among adapters of different dtypes (the kernels read them as one type), so patching
    refuses, naming the layer, the adapters and their dtypes, and the cast it suggests makes patching work."""
    from tiny_models import tiny_multi_adapter_model

    model = tiny_multi_adapter_model(layers_to_transform=[1, 2]).to(torch.bfloat16)
    names = list(model.peft_config)
    for module in model.modules():
        if hasattr(module, "lora_A") and names[0] in module.lora_A:
            module.lora_A[names[0]].float()
            module.lora_B[names[0]].float()
    config = GatedLoraConfig(gate="sequence", router_layer=0, adapters=names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"cannot patch .*: the adapters' weights must share one dtype, got "
                                        rf"{names[0]}: A float32, B float32, {names[1]}: A bfloat16"):
        patch_model(model, config)
    assert not is_patched(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    import peft

    for m in model.modules():  # the error's way on, as written there
        if isinstance(m, peft.tuners.lora.LoraLayer):
            m.lora_A.float()
            m.lora_B.float()
    patch_model(model, config)
    assert is_patched(model)


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga", "gaussian", True])
def test_adapters_that_rewrote_the_base_weights_are_warned_of(init):
    """PiSSA, OLoRA and LoRA-GA initialisations replace the base weights by a residual: the base route then runs
    those, not the model as loaded, and patching says so (other initialisations leave the base weights alone: no
    warning). LoRA-GA needs gradients PEFT gathers first (preprocess_loraga): its config is set after the fact."""
    import warnings

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                      init_lora_weights="gaussian" if init == "lora_ga" else init)
    model = get_peft_model(tiny_causal_lm("llama"), lora).eval()
    if init == "lora_ga":
        model.peft_config["default"].init_lora_weights = init
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model(model)
    ours = [w for w in caught if "gatedlora:" in str(w.message)]
    if init in ("pissa", "olora", "lora_ga"):
        assert len(ours) == 1 and f"init_lora_weights='{init}', which replaced the base weights" in str(ours[0].message)
        assert ours[0].filename == __file__
    else:
        assert not ours


def test_an_adapter_that_rewrote_the_base_weights_is_warned_of_though_another_is_gated():
    """The base weights are shared: a loaded PiSSA adapter that is neither active nor routed still replaced them."""
    import warnings

    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    model.add_adapter("residual", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    assert model.active_adapters == ["default"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch_model(model)
    ours = [str(w.message) for w in caught if "gatedlora:" in str(w.message)]
    assert len(ours) == 1 and "adapter 'residual' was initialised with init_lora_weights='pissa'" in ours[0]
