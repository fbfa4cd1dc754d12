"""Functional ops and backends. Knows nothing of modules, layers or transformers."""
from . import torch_backend  # noqa: F401  (registers the torch backend)
from .backends import available_backends, mark_unavailable, register_backend, select_backend

try:
    from . import triton_backend  # noqa: F401  (registers the triton backend)
except ImportError as exc:  # triton is an optional dependency
    mark_unavailable("triton", f"triton cannot be imported ({exc})")
from .gated_lora import gated_lora

__all__ = ["gated_lora", "available_backends", "register_backend", "select_backend"]
