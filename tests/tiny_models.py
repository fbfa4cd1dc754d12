"""Tiny Hugging Face models built from configs (no downloads) and PEFT adapters on them."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from gatedlora.benchmarking import models

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_causal_lm(arch: str = "llama", layers: int = 3, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM with odd sizes (hidden 40, MLP 76), fp32, eval mode."""
    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=40, intermediate_size=76, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "minicpm3":  # scales each residual branch by scale_depth / sqrt(num_hidden_layers)
        from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

        model = MiniCPM3ForCausalLM(MiniCPM3Config(**{**common, "num_key_value_heads": 4}, q_lora_rank=16,
                                                   kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                                   v_head_dim=8, scale_depth=1.4))
    elif arch == "lfm2":  # a hybrid whose first two blocks are convolutions, the last two attention
        from transformers import Lfm2Config, Lfm2ForCausalLM

        model = Lfm2ForCausalLM(Lfm2Config(**common, layer_types=["conv"] * 2 + ["full_attention"] * (layers - 2)))
    elif arch == "zamba2":  # Mamba and hybrid blocks; the hybrid ones share one attention block
        from transformers import Zamba2Config, Zamba2ForCausalLM

        model = Zamba2ForCausalLM(Zamba2Config(
            **{**common, "num_key_value_heads": 4}, mamba_d_state=8, mamba_ngroups=1, mamba_headdim=8, n_mamba_heads=10,
            hybrid_layer_ids=[1, 3], layer_types=["mamba", "hybrid", "mamba", "hybrid"], attention_head_dim=10,
            use_mem_eff_path=False, num_mem_blocks=1, chunk_size=16))
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_sequence_classifier(layers: int = 3, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    """A randomly initialised Llama sequence classifier (its head is ``score``), sized as ``tiny_causal_lm``."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=76, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=num_labels)
    return LlamaForSequenceClassification(config).eval()


def tiny_t5(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised T5 encoder-decoder (``layers`` blocks each), fp32, eval mode."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=97, d_model=40, d_kv=10, d_ff=76, num_layers=layers, num_decoder_layers=layers,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def randomize_lora_b(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """PEFT initialises lora_B to zeros (LoRA then changes nothing); give it random values (the tests' defaults)."""
    models.randomize_lora_b(model, seed, scale)


def tiny_peft_model(arch: str = "llama", layers: int = 3, layers_to_transform=None, seed: int = 0,
                    target_modules=ALL_PROJECTIONS, r: int = 4, lora_alpha: int = 8):
    """A tiny causal LM with a PEFT LoRA adapter whose B is random (so the adapter matters)."""
    model = tiny_causal_lm(arch, layers, seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        layers_to_transform=layers_to_transform)
    peft_model = get_peft_model(model, config).eval()
    randomize_lora_b(peft_model, seed + 1)
    return peft_model


def padded_batch(lengths: list[int], total: int, side: str = "left", vocab: int = 97, seed: int = 3):
    """input_ids and attention_mask [B, total] for prompts of the given lengths, padded on ``side``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens = torch.randint(3, vocab, (n,), generator=gen)
        span = slice(total - n, total) if side == "left" else slice(0, n)
        ids[i, span] = tokens
        mask[i, span] = 1
    return ids, mask


# Three adapters of different ranks on different projections: "code" lacks k_proj and o_proj, "chat" lacks
# v_proj and the MLP's down_proj, so each is absent somewhere another is present. (PEFT warns about adapter
# names contained in "lora_", such as "a".)
MULTI_ADAPTERS = {"math": (4, ALL_PROJECTIONS), "code": (2, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]),
                  "chat": (8, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])}


def tiny_multi_adapter_model(arch: str = "llama", layers: int = 3, layers_to_transform=None, seed: int = 0,
                             adapters: dict = MULTI_ADAPTERS):
    """A tiny causal LM with several PEFT LoRA adapters (``adapters``: name -> (rank, target modules)), loaded as
    a user would (``get_peft_model`` with the first, ``add_adapter`` for the others), B random; the first
    adapter is active."""
    model = tiny_causal_lm(arch, layers, seed)
    peft_model = None
    for name, (r, targets) in adapters.items():
        config = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=list(targets), lora_dropout=0.0,
                            layers_to_transform=layers_to_transform)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    randomize_lora_b(peft_model, seed + 1)
    peft_model.set_adapter(next(iter(adapters)))
    return peft_model.eval()
