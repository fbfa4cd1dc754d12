"""``gated_lora_multi_add_``: the multi-adapter in-place add on normalised arguments, and its torch.library
registration (``gatedlora::gated_lora_multi_add_``), as ``custom_op.py`` does for one adapter: eager calls go
straight to the cached dispatch; under ``torch.compile`` the call is one graph node with a fake implementation.
"""
# No ``from __future__ import annotations``: torch.library reads the annotations to infer the schema.
import torch

from .backends import dispatch_multi, resolve_backend_name
from .custom_op import out_rows, without_autocast
from .multi_args import MultiLoraArgs, make_multi_args

OP_NAME = "gatedlora::gated_lora_multi_add_"


def gated_lora_multi_add_(out: torch.Tensor, args: MultiLoraArgs, backend: str) -> None:
    """``out[m] += scaling[i] * (x[m] A_i^T) B_i^T`` in place, ``i = adapter_index[m]``, for the rows whose index
    is in [0, A); other rows are not written. out: [..., N] holding the base output, M rows in all."""
    if args.m == 0 or args.n == 0 or args.k == 0 or args.adapters == 0:  # nothing to add
        resolve_backend_name(backend)  # still reject a name that is not a backend
        return
    rows, copied = (out, False) if out.dim() == 2 else out_rows(out, args.m, args.n)
    if torch.compiler.is_compiling():
        torch.ops.gatedlora.gated_lora_multi_add_(rows, args.x, list(args.lora_a), list(args.lora_b),
                                                  list(args.scaling), args.adapter_index, backend)
    else:
        without_autocast(dispatch_multi(backend, args).launch, rows, args)
    if copied:
        out.copy_(rows.view(out.shape))


@torch.library.custom_op(OP_NAME, mutates_args=("out",))
def registered_gated_lora_multi_add_(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scaling: list[float],
    adapter_index: torch.Tensor,
    backend: str,
) -> None:
    """The registered op. out: [M, N] (mutated); x: [M, K]; lora_a[i]: [r_i, K]; lora_b[i]: [N, r_i];
    scaling: one float per adapter; adapter_index: [M] (-1: base)."""
    args = make_multi_args(x, out.shape[-1], lora_a, lora_b, scaling, adapter_index)
    without_autocast(dispatch_multi(backend, args).launch, out, args)


@registered_gated_lora_multi_add_.register_fake
def _gated_lora_multi_add_fake(out, x, lora_a, lora_b, scaling, adapter_index, backend) -> None:
    # In place on out: nothing new to allocate, no shape to compute.
    return None
