"""``gated_lora_add_``: the in-place add on normalised arguments, and its torch.library registration.

Eager calls go straight to the cached dispatch and the backend. Under ``torch.compile`` the call
goes through the registered op ``gatedlora::gated_lora_add_``: Dynamo cannot see into a Triton
launch or the torch backend's data-dependent row selection (``nonzero``) without breaking the graph,
while a custom op with a fake implementation is one graph node whose output (``out``, mutated in
place) has a known shape. Under functionalization that becomes ``auto_functionalized`` and
Inductor re-inplaces it.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations to infer the schema.
from typing import Any, Callable, Optional

import torch

from .args import GatedLoraArgs, make_args
from .backends import dispatch, resolve_backend_name

OP_NAME = "gatedlora::gated_lora_add_"


def gated_lora_add_(out: torch.Tensor, args: GatedLoraArgs, backend: str) -> None:
    """``out[m] += scaling * g_m * (x[m] A^T) B^T`` in place for the open rows; closed rows are not written.

    out: [..., N] holding the base output, M rows in all; ``args`` from ``make_args``.
    """
    if args.m == 0 or args.n == 0 or args.k == 0:  # K = 0: x A^T is 0, the term vanishes
        resolve_backend_name(backend)  # still reject a name that is not a backend
        return
    rows, copied = (out, False) if out.dim() == 2 else out_rows(out, args.m, args.n)
    if torch.compiler.is_compiling():
        torch.ops.gatedlora.gated_lora_add_(rows, args.x, args.lora_a, args.lora_b, args.scaling, args.gate,
                                            args.gate_weight, args.gate_bias, args.threshold, args.hard, backend)
    else:
        without_autocast(dispatch(backend, args).launch, rows, args)
    if copied:
        out.copy_(rows.view(out.shape))


def without_autocast(add: Callable[[torch.Tensor, Any], None], out: torch.Tensor, args: Any) -> None:
    """``add(out, args)`` (a backend's add into out [M, N]) with autocast off: the term is computed in the
    adapters' dtype (x cast to it), as the Triton and CUDA kernels and the backward compute it; under autocast
    the torch backend's matmuls returned a lower precision, which its in-place adds into an out of the weights'
    dtype refused to mix. Off the CPU and CUDA only where the device has autocast (asking about "meta" raises).
    Checking costs about 0.2 us a call; the context is entered only under autocast."""
    if out.is_cpu:
        kind = "cpu"
    elif out.is_cuda:
        kind = "cuda"
    else:
        kind = out.device.type
        if not torch.amp.is_autocast_available(kind):
            add(out, args)
            return
    if torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            add(out, args)
    else:
        add(out, args)


def out_rows(out: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, bool]:
    """out [..., N] as [M, N], and whether that is a copy (a layout that cannot be viewed as rows)."""
    try:
        return out.view(m, n), False
    except RuntimeError:
        return out.reshape(m, n).clone(), True


@torch.library.custom_op(OP_NAME, mutates_args=("out",))
def registered_gated_lora_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    gate: Optional[torch.Tensor],
    gate_weight: Optional[torch.Tensor],
    gate_bias: Optional[torch.Tensor],
    threshold: float,
    hard: bool,
    backend: str,
) -> None:
    """The registered op. out: [M, N] (mutated); x: [M, K]; lora_a: [r, K]; lora_b: [N, r];
    gate: [M] or None; gate_weight: [K] or None; gate_bias: 0-dim (token gates) or None."""
    args = make_args(x, out.shape[-1], lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard)
    without_autocast(dispatch(backend, args).launch, out, args)


@registered_gated_lora_add_.register_fake
def _gated_lora_add_fake(out, x, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                         backend) -> None:
    # In place on out: nothing new to allocate, no shape to compute.
    return None
