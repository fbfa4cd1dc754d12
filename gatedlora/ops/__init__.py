"""Functional ops and backends. Knows nothing of modules, layers or transformers.

Backends register themselves on import; triton is optional (``pip install triton``) and the cuda
backend needs nothing to import (its extension is built on first use with CUDA tensors).
"""
import importlib.util

from . import cuda_backend, torch_backend, torch_multi  # noqa: F401  (register cuda and torch, one and multi)
from .backends import available_backends, clear_dispatch_cache, mark_unavailable, register_backend, select_backend
from .contract import GateKind
from .fused import fused_fallback_reason, gated_lora_fused, warn_fused_fallback_once
from .gated_lora import add_lora_, gated_lora
from .gated_lora_multi import add_lora_multi_, gated_lora_multi
from .multi_weights import forget_kept_copies

if importlib.util.find_spec("triton") is not None:
    from . import triton_backend, triton_multi  # noqa: F401  (register triton, one and multi)
else:
    mark_unavailable("triton", "triton is not installed (pip install triton)")

__all__ = ["gated_lora", "add_lora_", "gated_lora_multi", "add_lora_multi_", "forget_kept_copies", "gated_lora_fused",
           "fused_fallback_reason", "warn_fused_fallback_once", "GateKind", "available_backends",
           "clear_dispatch_cache", "register_backend", "select_backend"]
