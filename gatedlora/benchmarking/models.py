"""Models for the model-level comparison: a Llama-architecture model built from a config (no
download) or a local model, with a PRISM-style adapter, and its copies that share the weights."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

from ..patching import block_linear_names


def randomize_parameters(model: nn.Module, seed: int, scale: float, selected: Callable[[str], bool]) -> None:
    """Every parameter whose name ``selected`` accepts random, normal with standard deviation ``scale``, drawn in
    parameter order from one generator seeded with ``seed`` (on the CPU: the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if selected(name):
                param.copy_((torch.randn(param.shape, generator=gen) * scale).to(param.dtype))


def randomize_lora_b(peft_model: nn.Module, seed: int, scale: float = 0.02) -> None:
    """Every lora_B weight random (PEFT starts them at 0, where an adapter changes nothing)."""
    randomize_parameters(peft_model, seed, scale, lambda name: "lora_B" in name)


@dataclass(frozen=True)
class LlamaSpec:
    """The shape of a Llama-architecture model built from a config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int


# Sized so the default CPU run finishes in about a minute on 2 cores.
CPU_DEFAULT = LlamaSpec(256, 688, 4, 8, 4, 2048)
# Llama-3-8B projection shapes (K=N=4096, MLP 14336, GQA 32/8), 4 blocks, a smaller vocabulary.
GPU_DEFAULT = LlamaSpec(4096, 14336, 4, 32, 8, 32000)


def at_width(spec: LlamaSpec, hidden_size: int) -> LlamaSpec:
    """``spec`` at another hidden size, its proportions kept (MLP width, head size, query heads per KV head)."""
    scale = hidden_size / spec.hidden_size
    return replace(spec, hidden_size=hidden_size, intermediate_size=round(spec.intermediate_size * scale),
                   num_attention_heads=max(1, round(spec.num_attention_heads * scale)),
                   num_key_value_heads=max(1, round(spec.num_key_value_heads * scale)))


def build_llama(spec: LlamaSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM of shape ``spec`` in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**asdict(spec), max_position_embeddings=4096, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def load_local_model(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A causal LM from a local directory (no download)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()


def add_prism_adapter(model: nn.Module, router_layer: int = 0, r: int = 16, lora_alpha: int = 32,
                      adapter_path: str | None = None, seed: int = 1) -> nn.Module:
    """A PEFT LoRA model: the adapter at ``adapter_path``, or a fresh one as PRISM trains it (every projection of
    the layers after ``router_layer``: ``block_linear_names``) with random B so it changes the output."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        try:
            return PeftModel.from_pretrained(model, adapter_path, local_files_only=True).eval()
        except RuntimeError as err:  # PEFT's "size mismatch": an adapter trained on another model
            raise ValueError(f"the adapter in {adapter_path} does not fit the model: {err}") from None
    layers = model.config.num_hidden_layers
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=block_linear_names(model),
                        layers_to_transform=list(range(router_layer + 1, layers)))
    peft_model = get_peft_model(model, config).eval()
    randomize_lora_b(peft_model, seed)
    return peft_model


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose parameters and buffers are the originals (no extra memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)
