"""A tiny randomly initialised Llama and a PEFT LoRA adapter on it, so every example runs in seconds
on a CPU with no download. Swap in your own model: ``AutoModelForCausalLM.from_pretrained(...)``
and ``PeftModel.from_pretrained(model, "my-adapter")``."""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def tiny_peft_model(layers: int = 4, first_layer: int = 0, seed: int = 0):
    """PEFT LoRA (r=8, alpha=16) on every projection of layers ``first_layer``.., with a random B: a
    freshly initialised adapter has B = 0 and changes nothing, a trained one does."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS,
                        layers_to_transform=list(range(first_layer, layers)))
    model = get_peft_model(tiny_llama(layers, seed), config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def prompts(n: int, length: int = 12, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of random token ids (3..255) and random lengths up to ``length``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, length + 1, (n,), generator=gen)
    return [torch.randint(3, 256, (int(k),), generator=gen).tolist() for k in lengths]


def left_padded(batch: list[list[int]]) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, left padded with token 0, as generate() wants for a decoder."""
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
