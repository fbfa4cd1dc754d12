"""gatedlora: fused kernels for gated LoRA, and a drop-in layer for PEFT models."""
from .ops import gated_lora

__version__ = "0.1.0"
__all__ = ["gated_lora"]
