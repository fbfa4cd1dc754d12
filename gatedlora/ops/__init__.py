"""Functional ops and backends. Knows nothing of modules, layers or transformers."""
from . import torch_backend  # noqa: F401  (registers the torch backend)
from .backends import available_backends, register_backend, select_backend
from .gated_lora import gated_lora

__all__ = ["gated_lora", "available_backends", "register_backend", "select_backend"]
