"""PEFT's own methods on a patched model, freezing on a plain model, and the config argument's type."""
import copy

import pytest
import torch
from tiny_models import padded_batch, tiny_causal_lm, tiny_peft_model

from gatedlora import (
    GatedLoraConfig,
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


def test_fresh_adapters_freeze_the_base_as_get_peft_model_does():
    model = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["q_proj", "v_proj"]))
    trainable = sorted({n.rsplit(".", 2)[-2] if "lora_" in n else n.rsplit(".", 1)[-1]
                        for n, p in model.named_parameters() if p.requires_grad})
    assert trainable == ["default", "gate_bias", "gate_weight"]
    sequence = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(gate="sequence", target_modules=["q_proj"]))
    assert all(p.requires_grad for p in sequence.gate_router.parameters())
    kept = patch_model(tiny_causal_lm("llama"), GatedLoraConfig(target_modules=["q_proj"]), freeze_base=False)
    assert kept.model.embed_tokens.weight.requires_grad and kept.lm_head.weight.requires_grad


def test_config_and_model_arguments_are_type_checked():
    with pytest.raises(TypeError, match=r"config must be a gatedlora.GatedLoraConfig or None, got dict; write "
                                        r"GatedLoraConfig\(\*\*\{'gate': 'sequence'\}\)"):
        patch_model(tiny_causal_lm("llama"), {"gate": "sequence"})
    with pytest.raises(TypeError, match="model must be a torch nn.Module .* got str"):
        patch_model("meta-llama/Llama-3-8B")
    with pytest.raises(TypeError, match="router must be an nn.Module or None, got dict"):
        load_pretrained(tiny_causal_lm("llama"), ".", router={})
