"""``gated_lora_fused``: the base linear layer and the gated LoRA term together (``base_mode="fused"``).

    y = x W^T + bias + scaling * g * (x A^T) B^T

Where it applies (CUDA tensors, at most 16 rows, fp16/bf16/fp32, rank <= 128, no grad, the CUDA
extension loaded) one launch of the one-pass decode GEMV in csrc/ reads W and x once and writes y
once. Elsewhere it is exact mode: ``F.linear`` then ``gated_lora(..., inplace=True)``;
``fused_fallback_reason`` says why, for a caller that wants to warn (``warn_fused_fallback_once``).

Closed rows of the GEMV equal the base layer only to the rounding of a different summation order
(DESIGN.md section 2); exact mode keeps them bitwise equal. Registered with torch.library as
``gatedlora::gated_lora_fused`` so ``torch.compile`` keeps a call in one graph node; the choice
between the GEMV and exact mode is made inside the op, at run time.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations to infer the schema.
import re
import threading
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import cuda_backend
from .backends import resolve_backend_name
from .checks import GatedLoraArgs, check_inputs
from .gated_lora import gated_lora

OP_NAME = "gatedlora::gated_lora_fused"


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


def fused_fallback_reason(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                          lora_b: torch.Tensor, gate: Optional[torch.Tensor] = None,
                          gate_weight: Optional[torch.Tensor] = None,
                          gate_bias: Union[float, torch.Tensor] = 0.0, backend: str = "auto") -> Optional[str]:
    """None when ``gated_lora_fused`` runs the one-pass GEMV for these inputs, else why it runs exact mode.

    Shapes as in ``gated_lora_fused``. Cheap checks come first; the CUDA extension is built or
    loaded only when every other condition holds. Reads no tensor value (no host sync).
    """
    name = resolve_backend_name(backend)
    if name not in ("auto", "cuda"):
        return f"backend {name!r} was asked for (the fused GEMV is the cuda backend's)"
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m == 0 or weight.shape[0] == 0:
        return "the input has no rows or no output features"
    tensors = (x, weight, bias, lora_a, lora_b, gate, gate_weight, gate_bias)
    reasons = cuda_backend.input_reasons(x, lora_a, gate, tensors)
    if m > cuda_backend.MAX_FUSED_ROWS:
        reasons.append(f"more than {cuda_backend.MAX_FUSED_ROWS} rows (the one-pass GEMV serves decode; "
                       f"got {m})")
    if weight.shape[-1] > 1 and weight.stride(-1) != 1:
        reasons.append(f"weight has stride {weight.stride(-1)} along K (the GEMV streams rows of W)")
    if reasons:
        return "; ".join(reasons)
    return cuda_backend.extension_problem(x.device)


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


def _exact(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard, backend,
           straight_through=False) -> torch.Tensor:
    base = F.linear(x, weight, bias)
    return gated_lora(x, base, lora_a, lora_b, scaling, gate=gate, gate_weight=gate_weight, gate_bias=gate_bias,
                      threshold=threshold, hard=hard, backend=backend, inplace=True, straight_through=straight_through)


def _fused_forward(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                   backend) -> torch.Tensor:
    """The GEMV where it applies, exact mode elsewhere (no autograd here)."""
    if fused_fallback_reason(x, weight, bias, lora_a, lora_b, gate, gate_weight, gate_bias, backend) is not None:
        return _exact(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard, backend)
    k, n = x.shape[-1], weight.shape[0]
    rows = x.reshape(-1, k)
    args = GatedLoraArgs(rows, lora_a, lora_b, float(scaling), None if gate is None else gate.reshape(-1),
                         gate_weight, gate_bias, float(threshold), bool(hard))
    return cuda_backend.fused_gemv(rows, weight, bias, args).view(*x.shape[:-1], n)


@torch.library.custom_op(OP_NAME, mutates_args=())
def gated_lora_fused_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias_tensor: Optional[torch.Tensor],
    gate_bias_value: float,
    threshold: float,
    hard: bool,
    backend: str,
) -> torch.Tensor:
    """The registered op: y [..., N] (a new tensor); gate_bias as a tensor or a float (no union in a schema)."""
    bias_arg = gate_bias_tensor if gate_bias_tensor is not None else gate_bias_value
    return _fused_forward(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, bias_arg, threshold, hard,
                          backend)


@gated_lora_fused_op.register_fake
def _gated_lora_fused_fake(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias_tensor,
                           gate_bias_value, threshold, hard, backend) -> torch.Tensor:
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
    gate_bias: Union[float, torch.Tensor] = 0.0,
    threshold: float = 0.5,
    hard: bool = True,
    backend: str = "auto",
    straight_through: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scaling * g * (x A^T) B^T`` with one gate value per row.

    Args:
        x: [..., K] (fp16, bf16 or fp32 for the GEMV; anything ``gated_lora`` takes otherwise).
        weight: [N, K] base weight, x's dtype. bias: [N] or None.
        lora_a: [r, K]; lora_b: [N, r]; scaling, gate [M] or x.shape[:-1], gate_weight [K],
            gate_bias, threshold, hard, straight_through: as in ``gated_lora``.
        backend: ``auto`` or ``cuda`` allow the GEMV; any backend is used for exact mode.

    Returns: y [..., N] in x's dtype. Calls that autograd records run exact mode (the GEMV has no
    backward). ``fused_fallback_reason`` tells whether a call runs the GEMV.
    """
    _check_linear(x, weight, bias)
    check_inputs(x, _base_like(x, weight.shape[0]), lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold)
    differentiable = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (x, weight, bias, lora_a, lora_b, gate, gate_weight, gate_bias))
    if differentiable:
        return _exact(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                      backend, straight_through)
    resolve_backend_name(backend)  # reject an unknown name before anything runs
    if torch.compiler.is_compiling():
        bias_tensor = gate_bias if isinstance(gate_bias, torch.Tensor) else None
        bias_value = 0.0 if bias_tensor is not None else float(gate_bias)
        return torch.ops.gatedlora.gated_lora_fused(x, weight, bias, lora_a, lora_b, float(scaling), gate, gate_weight,
                                                    bias_tensor, bias_value, float(threshold), bool(hard), backend)
    return _fused_forward(x, weight, bias, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                          backend)
