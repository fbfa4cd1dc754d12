"""Backend registry and dispatch, decided once per configuration and cached.

Each backend says why it cannot take an input (xformers' ``not_supported_reasons``). Under
``backend="auto"`` the first backend without a reason runs, in the order ``preference.gpu_order`` gives
for CUDA tensors (measured per device class, M bucket and dtype pair where a GPU has run
tools/gpu_check.py; the byte model's order elsewhere); CPU tensors go to torch (the GPU backends take
CPU tensors only in the Triton interpreter, a test tool orders of magnitude slower). An explicit
choice that cannot run raises an error with its reasons; with ``auto`` and no backend left, the error
lists every reason. ``GATEDLORA_BACKEND`` overrides ``auto``; it is read when a configuration is first
dispatched (``clear_dispatch_cache`` after changing it in a running process).

The choice and the backend's launch function depend only on the configuration (``dispatch_key``:
device, dtypes, gate kind, N, K, rank and the power-of-two bucket of M), so they are computed once
per configuration and cached: a layer's call after the first costs one dict lookup here (the
hot-path budget is in docs/design.md, "The hot path"). Gradients never reach a backend: calls
that autograd records run the backend's forward inside ``autograd.GatedLoraFunction``.

Adding a backend: subclass ``Backend`` in a new module, register an instance, add its name to
``PREFERENCE`` and import the module in ``ops/__init__.py`` (docs/design.md, "Backends").

The multi-adapter op (``gated_lora_multi``) is dispatched the same way (``dispatch_multi``): a backend
that has a multi-adapter implementation registers its reasons and launcher with ``register_multi``;
the others say they have none, which ``auto`` honours.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from . import preference
from .args import GatedLoraArgs
from .contract import has_unit_inner_stride

Launch = Callable[[torch.Tensor, GatedLoraArgs], None]

PREFERENCE = ("cuda", "triton", "torch")  # every backend name; auto orders the GPU ones by preference.gpu_order
BACKEND_CHOICES = ("auto",) + PREFERENCE
ENV_VAR = "GATEDLORA_BACKEND"


class Backend:
    """One implementation of the op. Subclasses set ``name`` and implement ``not_supported_reasons`` and
    ``launcher``. A backend with ``fused = True`` also implements ``fused_reasons`` and ``gated_lora_fused``
    (the base linear layer and the LoRA term in one pass)."""

    name: str = ""
    fused: bool = False

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        """Why this backend cannot run ``args`` (empty list: it can). Depends only on what
        ``dispatch_key`` holds: the dispatcher caches the answer."""
        raise NotImplementedError

    def launcher(self, args: GatedLoraArgs) -> Launch:
        """The function that adds the term for this configuration: ``launch(out, args)`` does
        ``out[m] += scaling * g_m * (x[m] A^T) B^T`` in place for rows with ``g_m != 0`` and writes no
        other row (out: [M, N] holding the base output). Called once per configuration (the dispatcher
        caches the result), so it may take time: a launch heuristic, a choice of strategy."""
        raise NotImplementedError

    def fused_reasons(self, args: GatedLoraArgs, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> list[str]:
        """Why ``gated_lora_fused`` cannot run these inputs in one pass (``fused`` backends)."""
        return [f"backend {self.name!r} has no fused kernel"]

    def gated_lora_fused(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         args: GatedLoraArgs) -> torch.Tensor:
        """``x W^T + bias + scaling * g * (x A^T) B^T``: x [M, K], weight [N, K], bias [N] or None -> [M, N]."""
        raise NotImplementedError


class Dispatch(NamedTuple):
    backend: Backend
    launch: Launch


class FusedDispatch(NamedTuple):
    backend: Optional[Backend]  # None: exact mode
    reason: Optional[str]  # why exact mode (None when the backend runs)


_REGISTRY: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {}
_DISPATCH: dict[tuple, Dispatch] = {}
_FUSED: dict[tuple, FusedDispatch] = {}
_TORCH_ON_CPU: dict[str, bool] = {}
_CACHE_LIMIT = 4096  # configurations; a long-running process with ever new shapes starts over


def register_backend(backend: Backend) -> None:
    """Make ``backend`` selectable (by name and under ``auto``)."""
    if backend.name not in PREFERENCE:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {PREFERENCE}")
    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)
    clear_dispatch_cache()


def mark_unavailable(name: str, reason: str) -> None:
    """Record why backend ``name`` could not be loaded (shown when a user asks for it)."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason
    clear_dispatch_cache()


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is not registered (None when it is)."""
    return None if name in _REGISTRY else _UNAVAILABLE.get(name, "not registered")


def clear_dispatch_cache() -> None:
    """Forget every cached choice (after a backend's state changed: registered, built, patched in a test)."""
    _DISPATCH.clear()
    _FUSED.clear()
    _TORCH_ON_CPU.clear()


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


def torch_runs_on_cpu(requested: str) -> bool:
    """Whether the backend ``requested`` runs CPU tensors on the torch backend: ``torch``, and ``auto`` unless
    ``GATEDLORA_BACKEND`` names another (read once per name, as ``dispatch`` reads it)."""
    found = _TORCH_ON_CPU.get(requested)
    if found is None:
        found = _TORCH_ON_CPU[requested] = resolve_backend_name(requested) in ("auto", "torch")
    return found


def m_bucket(m: int) -> int:
    """The power of two at or above M: decode and every prefill length do not each get an entry."""
    return 1 << max(0, m - 1).bit_length()


def rows_key(m: int) -> int:
    """M's part of a dispatch key: its bucket, except M = 0 (0), whose choice (the torch backend's strategy for
    no rows, say) must not stand for M = 1, decode, in the same bucket (a review found decode run add_folded
    after one empty call)."""
    return m_bucket(m) if m else 0


def dispatch_key(name: str, args: GatedLoraArgs) -> tuple:
    """What decides the backend and its launch for ``args`` under the backend ``name``."""
    return (name, args.x.device, args.x.dtype, args.lora_a.dtype, args.gate_kind, rows_key(args.m), args.n,
            args.k, args.r)


def dispatch(requested: str, args: GatedLoraArgs) -> Dispatch:
    """The backend that runs ``args`` and its launch function; raises RuntimeError with every reason
    when none can.

    Keyed on the requested name: ``GATEDLORA_BACKEND`` is read when a configuration is first dispatched
    (reading the environment costs 1.7 us, a tenth of a decode-sized call; ``clear_dispatch_cache``
    makes it read again)."""
    key = dispatch_key(requested, args)
    found = _DISPATCH.get(key)
    if found is None:
        backend = _choose(resolve_backend_name(requested), args)
        found = _remember(_DISPATCH, key, Dispatch(backend, backend.launcher(args)))
    return found


def _remember(cache: dict, key: tuple, value):
    """Store ``value`` under ``key`` and return it; a cache that reaches ``_CACHE_LIMIT`` starts over. (The
    lookups stay inline in their callers: a call costs about 1 us on the hot path.)"""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def select_backend(requested: str, args: GatedLoraArgs) -> Backend:
    """The backend that will run ``args`` (``dispatch`` without the launch)."""
    return dispatch(requested, args).backend


def _reasons(name: str, args: GatedLoraArgs) -> list[str]:
    backend = _REGISTRY.get(name)
    return [unavailable_reason(name)] if backend is None else backend.not_supported_reasons(args)


def _choose(name: str, args, reasons_of: Callable[[str, object], list[str]] = _reasons,
            measured: dict | None = None, op: str = "gated_lora") -> Backend:
    """The backend named (or under ``auto`` the first that can run ``args``); ``reasons_of(name, args)`` says
    why a backend cannot; ``measured``: the table of measured winners ``auto`` orders by (the one-adapter
    op's, ``preference.MEASURED``, when None); ``op``: the op the errors name."""
    if name != "auto":
        why = reasons_of(name, args)
        if why:
            verb = "is not available" if name not in _REGISTRY else "cannot run these inputs"
            raise RuntimeError(f"{op}: backend {name!r} {verb}: " + "; ".join(why))
        return _REGISTRY[name]
    reasons: list[str] = []
    for candidate in _candidates(args, measured):
        why = reasons_of(candidate, args)
        if not why:
            return _REGISTRY[candidate]
        reasons.extend(f"{candidate}: {r}" for r in why)
    raise RuntimeError(f"{op}: no backend can run these inputs:\n  " + "\n  ".join(reasons))


def _candidates(args, measured: dict | None = None) -> tuple:
    # GPU backends take CPU tensors only in the Triton interpreter: auto never picks it; ask by name instead.
    if args.x.device.type == "cpu":
        return ("torch",)
    if args.x.device.type != "cuda":
        return PREFERENCE
    return preference.gpu_order(args.x.device, args.x.dtype, args.lora_dtype, m_bucket(args.m), measured)


_NOTHING_TO_FUSE = FusedDispatch(None, "the input has no rows or no output features")


def dispatch_fused(requested: str, args: GatedLoraArgs, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> FusedDispatch:
    """The backend whose ``gated_lora_fused`` runs these inputs, or None and why exact mode runs.

    Only backends with the ``fused`` capability qualify; ``requested`` must be ``auto`` or one of them.
    Cached like ``dispatch`` (plus the base weight's dtype, its inner stride and whether there is a bias).
    """
    if args.m == 0 or args.n == 0:
        resolve_backend_name(requested)  # an unknown name is an error whatever the shape
        return _NOTHING_TO_FUSE
    key = dispatch_key(requested, args) + (weight.dtype, has_unit_inner_stride(weight), bias is None or bias.dtype)
    found = _FUSED.get(key)
    if found is None:
        found = _remember(_FUSED, key, _choose_fused(resolve_backend_name(requested), args, weight, bias))
    return found


def _choose_fused(name: str, args: GatedLoraArgs, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> FusedDispatch:
    fused_names = [n for n in PREFERENCE if n in _REGISTRY and _REGISTRY[n].fused]
    if name != "auto" and name not in fused_names:
        return FusedDispatch(None, f"backend {name!r} was asked for, and only {', '.join(fused_names) or 'no backend'} "
                                   "has a fused kernel")
    reasons: list[str] = []
    for candidate in fused_names if name == "auto" else [name]:
        backend = _REGISTRY[candidate]
        why = backend.fused_reasons(args, weight, bias)
        if not why:
            return FusedDispatch(backend, None)
        reasons.extend(why)
    return FusedDispatch(None, "; ".join(reasons) or "no backend with a fused kernel is available")


# --- the multi-adapter op -------------------------------------------------------------------------

class MultiKernel(NamedTuple):
    """A backend's implementation of the multi-adapter op (``register_multi``): ``reasons(args)`` says why it
    cannot run ``MultiLoraArgs`` (depending only on ``multi_dispatch_key``), ``launcher(args)`` returns
    ``launch(out, args)``, which adds ``scaling[i] * (x[m] A_i^T) B_i^T`` into ``out[m]`` for each row whose
    ``adapter_index[m] = i`` is in [0, A) and writes no other row."""

    reasons: Callable
    launcher: Callable


_MULTI: dict[str, MultiKernel] = {}


def register_multi(name: str, reasons: Callable, launcher: Callable) -> None:
    """Give backend ``name`` (registered, or registered later) a multi-adapter implementation."""
    if name not in PREFERENCE:
        raise ValueError(f"unknown backend name {name!r}; expected one of {PREFERENCE}")
    _MULTI[name] = MultiKernel(reasons, launcher)
    clear_dispatch_cache()


def _multi_reasons(name: str, args) -> list[str]:
    if name not in _REGISTRY:
        return [unavailable_reason(name)]
    kernel = _MULTI.get(name)
    if kernel is None:
        return [f"backend {name!r} has no multi-adapter kernel (these have one: {', '.join(sorted(_MULTI))})"]
    return kernel.reasons(args)


def multi_dispatch_key(name: str, args) -> tuple:
    """What decides the backend and its launch for ``MultiLoraArgs`` under the backend ``name``."""
    return ("multi", name, args.x.device, args.x.dtype, args.lora_dtype, rows_key(args.m), args.n, args.k,
            args.r_max, args.adapters)


def dispatch_multi(requested: str, args) -> Dispatch:
    """``dispatch`` for the multi-adapter op: the backend that runs ``MultiLoraArgs`` and its launch."""
    key = multi_dispatch_key(requested, args)
    found = _DISPATCH.get(key)
    if found is None:
        name = resolve_backend_name(requested)
        if requested == "auto" and name not in _MULTI:  # GATEDLORA_BACKEND names a backend with no multi kernel
            name = "auto"
        backend = _choose(name, args, _multi_reasons, preference.MULTI_MEASURED, "gated_lora_multi")
        found = _remember(_DISPATCH, key, Dispatch(backend, _MULTI[backend.name].launcher(args)))
    return found
