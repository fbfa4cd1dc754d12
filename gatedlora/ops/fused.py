"""``gated_lora_fused``: the base linear layer and the gated LoRA term together (``base_mode="fused"``).

    y = x W^T + bias + scaling * g * (x A^T) B^T

A backend with the ``fused`` capability (today: cuda's one-pass decode GEMV, up to 16 rows) runs it
in one launch that reads W and x once and writes y once. Elsewhere it is exact mode: ``F.linear``
then the gated term added in place; ``fused_fallback_reason`` says why, for a caller that wants to
warn (``warn_fused_fallback_once``). The choice is made once per configuration (``backends.dispatch_fused``).

Closed rows of a one-pass kernel equal the base layer only to the rounding of a different summation
order (docs/design.md, "Two base modes"); exact mode keeps them bitwise equal. Registered with
torch.library as ``gatedlora::gated_lora_fused`` so ``torch.compile`` keeps a call in one graph node.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations to infer the schema.
import re
import threading
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .args import GatedLoraArgs, check_inputs, make_args
from .backends import dispatch_fused, resolve_backend_name
from .gated_lora import run

OP_NAME = "gatedlora::gated_lora_fused"
GRAD_REASON = "inputs require grad and the fused kernel has no backward (exact mode runs under autograd)"


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Errors name the input: x [..., K], weight [N, K], bias [N] or None, one dtype and device."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gated_lora_fused: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("gated_lora_fused: x must have shape [..., K], got a 0-dim tensor")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"gated_lora_fused: weight must have shape [N, K] = [N, {k}], got {list(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"gated_lora_fused: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"gated_lora_fused: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            shape = list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"gated_lora_fused: bias must have shape [N] = [{weight.shape[0]}], got {shape}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"gated_lora_fused: bias must have x's dtype and device ({x.dtype}, {x.device}), "
                            f"got {bias.dtype} on {bias.device}")


def _base_like(x: torch.Tensor, n: int) -> torch.Tensor:
    """A tensor shaped like the output [..., N] with x's dtype and device, for ``check_inputs``;
    a broadcast view of x (no allocation) where K >= 1."""
    if x.shape[-1] >= 1:
        return x[..., :1].expand(*x.shape[:-1], n)
    return x.new_empty(*x.shape[:-1], n)


def _differentiable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], args: GatedLoraArgs) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, weight, bias) + args.tensors())


def fused_fallback_reason(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, gate: Optional[torch.Tensor] = None,
                          gate_weight: Optional[torch.Tensor] = None,
                          gate_bias: Union[float, torch.Tensor, None] = 0.0, backend: str = "auto") -> Optional[str]:
    """None when ``gated_lora_fused`` runs a one-pass kernel for these inputs, else why it runs exact mode.

    Shapes as in ``gated_lora_fused``. Reads no tensor value (no host sync); the CUDA extension is built
    or loaded only when every other condition holds.
    """
    args = make_args(x, weight.shape[0], lora_a, lora_b, 1.0, gate, gate_weight, gate_bias, 0.5, True)
    if _differentiable(x, weight, bias, args):
        return GRAD_REASON
    return dispatch_fused(backend, args, weight, bias).reason


_warned: set = set()
_warned_lock = threading.Lock()


def warn_fused_fallback_once(reason: str, stacklevel: int = 2) -> bool:
    """Warn that base_mode="fused" fell back to exact mode, once per kind of reason (numbers in the
    text are ignored, so another row count does not warn again). Returns True if it warned."""
    key = re.sub(r"\d+", "#", reason)
    with _warned_lock:
        if key in _warned:
            return False
        _warned.add(key)
    warnings.warn(f"gatedlora: base_mode='fused' runs exact mode here: {reason}", RuntimeWarning,
                  stacklevel=stacklevel + 1)
    return True


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], args: GatedLoraArgs, backend: str,
           straight_through: bool) -> torch.Tensor:
    return run(args, F.linear(x, weight, bias), backend, inplace=True, straight_through=straight_through)


def _fused_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], args: GatedLoraArgs,
                   backend: str, warn_fallback: bool) -> torch.Tensor:
    """The one-pass kernel where a backend can run it, exact mode elsewhere (no autograd here)."""
    chosen = dispatch_fused(backend, args, weight, bias)
    if chosen.backend is None:
        if warn_fallback:
            warn_fused_fallback_once(chosen.reason, stacklevel=4)
        return _exact(x, weight, bias, args, backend, False)
    return chosen.backend.gated_lora_fused(args.x, weight, bias, args).view(*x.shape[:-1], args.n)


@torch.library.custom_op(OP_NAME, mutates_args=())
def registered_gated_lora_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    threshold: float,
    hard: bool,
    backend: str,
) -> torch.Tensor:
    """The registered op: y [..., N], a new tensor; gate_bias 0-dim (token gates) or None."""
    args = make_args(x, weight.shape[0], lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard)
    return _fused_forward(x, weight, bias, args, backend, warn_fallback=False)


@registered_gated_lora_fused.register_fake
def _gated_lora_fused_fake(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                           backend) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def gated_lora_fused(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor] = None,
    gate_weight: Optional[torch.Tensor] = None,
    gate_bias: Union[float, torch.Tensor, None] = 0.0,
    threshold: float = 0.5,
    hard: bool = True,
    backend: str = "auto",
    straight_through: bool = False,
    *,
    validate: bool = True,
    warn_fallback: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * g * (x A^T) B^T`` with one gate value per row.

    Args:
        x: [..., K] (fp16, bf16 or fp32 for the one-pass kernel; anything ``gated_lora`` takes otherwise).
        weight: [N, K] base weight, x's dtype. bias: [N] or None.
        lora_a: [r, K]; lora_b: [N, r]; scaling, gate [M] or x.shape[:-1], gate_weight [K],
            gate_bias, threshold, hard, straight_through, validate: as in ``gated_lora``.
        backend: ``auto`` or a backend with a fused kernel allow the one-pass kernel; any backend is
            used for exact mode.
        warn_fallback: warn (once per kind of reason) when exact mode runs instead.

    Returns: y [..., N] in x's dtype. Calls that autograd records run exact mode (the one-pass kernel
    has no backward). ``fused_fallback_reason`` tells whether a call runs the one-pass kernel.
    """
    if validate:
        _check_linear(x, weight, bias)
        check_inputs(x, _base_like(x, weight.shape[0]), lora_a, lora_b, scaling, gate, gate_weight, gate_bias,
                     threshold, hard, False, straight_through, op="gated_lora_fused")
    args = make_args(x, weight.shape[0], lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard)
    if _differentiable(x, weight, bias, args):
        if warn_fallback:
            warn_fused_fallback_once(GRAD_REASON, stacklevel=3)
        return _exact(x, weight, bias, args, backend, straight_through)
    resolve_backend_name(backend)  # reject an unknown name before anything runs
    if torch.compiler.is_compiling():
        return torch.ops.gatedlora.gated_lora_fused(x, weight, bias, lora_a, lora_b, float(scaling), gate,
                                                    gate_weight, args.gate_bias, float(threshold), bool(hard),
                                                    backend)
    return _fused_forward(x, weight, bias, args, backend, warn_fallback)
