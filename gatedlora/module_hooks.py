"""What calling a module may run besides its class's forward (shared by the layers and the router)."""
from __future__ import annotations

from torch import nn


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` could run more than its class's forward: hooks on it or on every module
    (``Module._call_impl``'s own test), a replaced forward (accelerate's offload hooks) or a compiled call."""
    hooks = nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks
                or "forward" in module.__dict__ or getattr(module, "_compiled_call_impl", None) is not None)


def plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` runs exactly ``F.linear`` with its weight and bias: an ``nn.Linear`` (no subclass)
    that nothing hooks or replaces, so a caller may run that directly (without the three Python frames of a module
    call) and own the result."""
    return type(module) is nn.Linear and not hooked(module)
