"""What calling a module may run besides its class's forward (shared by the layers and the router)."""
from __future__ import annotations

from torch import nn


def global_hooks() -> bool:
    """Whether hooks are registered on every module (``torch.nn.modules.module.register_module_forward_hook`` and
    its kin)."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def own_hooks(state: dict) -> bool:
    """Whether the module whose ``__dict__`` is ``state`` has hooks of its own, a replaced forward (accelerate's
    offload hooks) or a compiled call (``module.compile()`` sets ``_compiled_call_impl`` on the module)."""
    return bool(state["_forward_hooks"] or state["_forward_pre_hooks"] or state["_backward_hooks"]
                or state["_backward_pre_hooks"] or "forward" in state or state.get("_compiled_call_impl") is not None)


def ran_before_forward(state: dict) -> bool:
    """Whether a call of the module whose ``__dict__`` is ``state`` runs code of its own before its class's forward:
    forward pre-hooks on it, or a replaced forward (accelerate's hooks run theirs first). Hooks on every module:
    ``global_hooks``."""
    return bool(state["_forward_pre_hooks"] or "forward" in state)


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` could run more than its class's forward: hooks on it or on every module
    (``Module._call_impl``'s own test), a replaced forward or a compiled call."""
    return global_hooks() or own_hooks(module.__dict__)


def plain_linear(module: nn.Module) -> bool:
    """Whether calling ``module`` runs exactly ``F.linear`` with its weight and bias: an ``nn.Linear`` (no subclass)
    that nothing hooks or replaces, so a caller may run that directly (without the three Python frames of a module
    call) and own the result."""
    return type(module) is nn.Linear and not hooked(module)
