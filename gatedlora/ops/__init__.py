"""Functional ops and backends. Knows nothing of modules, layers or transformers."""
from . import torch_backend  # noqa: F401  (registers the torch backend)
from .backends import available_backends, mark_unavailable, register_backend, select_backend

try:
    from . import triton_backend  # noqa: F401  (registers the triton backend)
except ImportError as exc:  # triton is an optional dependency
    mark_unavailable("triton", f"triton cannot be imported ({exc})")
try:
    # Registers the cuda backend; its extension is built or loaded on first use with CUDA tensors.
    from . import cuda_backend  # noqa: F401
except ImportError as exc:
    mark_unavailable("cuda", f"the cuda backend cannot be imported ({exc})")
from .fused import fused_fallback_reason, gated_lora_fused, warn_fused_fallback_once
from .gated_lora import gated_lora

__all__ = ["gated_lora", "gated_lora_fused", "fused_fallback_reason", "warn_fused_fallback_once",
           "available_backends", "register_backend", "select_backend"]
