"""gatedlora: fused kernels for gated LoRA, and a drop-in layer for PEFT models."""
from .config import GatedLoraConfig
from .io import load_pretrained, save_pretrained
from .layers import GatedLoRALinear
from .ops import available_backends, gated_lora, gated_lora_multi
from .patching import force_gate, get_router, patch_model, peft_view, unpatch_model
from .router_training import RouterTrainingResult, extract_router_features, train_router
from .routing import PrismRouter, PrismTwoClassRouter, TwoClassRouter, prism_two_class_router
from .trainer_callback import SaveGatedLoraCallback

__version__ = "0.1.0"
__all__ = [
    "GatedLoraConfig", "GatedLoRALinear", "PrismRouter", "PrismTwoClassRouter", "TwoClassRouter", "available_backends",
    "force_gate", "gated_lora", "gated_lora_multi", "get_router", "load_pretrained", "patch_model",
    "prism_two_class_router", "save_pretrained", "unpatch_model", "train_router", "extract_router_features",
    "RouterTrainingResult", "SaveGatedLoraCallback", "peft_view",
]
