"""Backend registry and dispatch (xformers style: each backend says why it cannot take an input).

Order of preference under ``backend="auto"``: cuda, triton, torch. ``auto`` takes the first
backend that supports the inputs and falls back quietly; an explicit choice that cannot run
raises an error with its reasons. ``GATEDLORA_BACKEND`` overrides ``auto``.
"""
from __future__ import annotations

import os

import torch

from .checks import GatedLoraArgs

PREFERENCE = ("cuda", "triton", "torch")
BACKEND_CHOICES = ("auto",) + PREFERENCE
ENV_VAR = "GATEDLORA_BACKEND"


class Backend:
    """One implementation of the op. Subclasses set ``name`` and implement both methods."""

    name: str = ""

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        """Why this backend cannot run ``args`` (empty list: it can)."""
        raise NotImplementedError

    def add_into(self, out: torch.Tensor, args: GatedLoraArgs) -> None:
        """Add ``scaling * g * (x A^T) B^T`` into ``out`` [M, N] (holding the base output) in place.

        Rows whose gate is 0 must not be written.
        """
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {
    "triton": "the triton backend is not part of this build yet",
    "cuda": "the cuda backend is not part of this build yet",
}


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable (by name and under ``auto``)."""
    if backend.name not in PREFERENCE:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {PREFERENCE}")
    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why backend ``name`` could not be loaded (shown when a user asks for it)."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is not registered (None when it is)."""
    return None if name in _REGISTRY else _UNAVAILABLE.get(name, "not registered")


def available_backends() -> list[str]:
    """Names of the registered backends, in order of preference."""
    return [name for name in PREFERENCE if name in _REGISTRY]


def resolve_backend_name(requested: str) -> str:
    """Apply ``GATEDLORA_BACKEND`` to ``auto`` and validate the name."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {requested!r}")
    if requested == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override:
            if override not in BACKEND_CHOICES:
                raise ValueError(f"{ENV_VAR}={override!r} is not a backend; expected one of {BACKEND_CHOICES}")
            return override
    return requested


def select_backend(requested: str, args: GatedLoraArgs) -> Backend:
    """The backend that will run ``args``; raises RuntimeError with every reason when none can."""
    name = resolve_backend_name(requested)
    if name == "auto":
        reasons: list[str] = []
        for candidate in PREFERENCE:
            if args.x.device.type == "cpu" and candidate != "torch":
                # GPU backends take CPU tensors only in the Triton interpreter, a test tool that is
                # orders of magnitude slower than torch: auto never picks it; ask by name instead.
                continue
            backend = _REGISTRY.get(candidate)
            why = [_UNAVAILABLE.get(candidate, "not registered")] if backend is None else backend.not_supported_reasons(args)
            if not why:
                return backend
            reasons.extend(f"{candidate}: {r}" for r in why)
        raise RuntimeError("gated_lora: no backend can run these inputs:\n  " + "\n  ".join(reasons))
    backend = _REGISTRY.get(name)
    if backend is None:
        raise RuntimeError(f"gated_lora: backend {name!r} is not available: {_UNAVAILABLE.get(name, 'not registered')}")
    why = backend.not_supported_reasons(args)
    if why:
        raise RuntimeError(f"gated_lora: backend {name!r} cannot run these inputs: " + "; ".join(why))
    return backend
