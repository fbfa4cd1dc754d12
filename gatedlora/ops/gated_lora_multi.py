"""``gated_lora_multi``, the functional op for several adapters, one per row: arguments checked and normalised
once, then the backend's in-place add (``multi_custom_op.gated_lora_multi_add_``), through autograd when the
call is recorded."""
from __future__ import annotations

from typing import Sequence

import torch

from .args import check_scaling_fits, overlaps
from .autograd import Options, apart_from, records_gradients, writable_in_place, written_through_a_copy
from .backends import resolve_backend_name, torch_runs_on_cpu
from .multi_args import MultiLoraArgs, check_multi_inputs, make_multi_args, normalise_scaling
from .multi_autograd import GatedLoraMultiFunction
from .multi_custom_op import gated_lora_multi_add_
from .torch_multi import CONCATENATED_MAX_ROWS, add_concatenated_rows


def gated_lora_multi(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scaling: float | Sequence[float],
    adapter_index: torch.Tensor,
    backend: str = "auto",
    inplace: bool = False,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """``base_out`` plus, on each row, the LoRA term of the adapter that row names.

    Per row m with ``i = adapter_index[m]``: ``y[m] = base_out[m] + scaling[i] * (x[m] @ lora_a[i].T) @
    lora_b[i].T``; a row with ``i = -1`` is bitwise ``base_out[m]``. The adapters may have different ranks.
    Each adapter's weights are read where they are (no copy per call; docs/design.md, "Several adapters").
    Registered with torch.library as ``gatedlora::gated_lora_multi_add_``, so ``torch.compile`` keeps a
    call in one graph node. Calls that autograd records run the same backend forward and a PyTorch backward
    (``multi_autograd.py``): every adapter's weights, x and base_out get gradients.

    Args:
        x: [..., K] LoRA input (fp32, fp16 or bf16; fp64 on the torch backend).
        base_out: [..., N] base layer output, same leading dims and dtype as ``x``.
        lora_a: A tensors [r_i, K] (PEFT ``lora_A[name].weight``), all of one dtype; ``x`` is cast to it.
        lora_b: A tensors [N, r_i] (PEFT ``lora_B[name].weight``).
        scaling: one float per adapter (PEFT's ``scaling[name]``), or one float for all.
        adapter_index: [M] or ``x.shape[:-1]`` int32/int64: each row's adapter in [0, A), or -1 for none.
            On the CPU other values are an error; on a GPU (where checking would sync) and under
            ``torch.compile`` (whose graphs cannot raise on a value) a row with an index outside [0, A) gets
            the base output.
        backend: ``auto``, ``torch`` or ``triton`` (``cuda`` has no multi-adapter kernel: ``auto`` skips it).
        inplace: write into ``base_out`` and return it (one that shares memory with an input is computed
            through a copy, then written; under autograd, as in ``gated_lora``: a view autograd refuses to modify
            in place is left as it was and a new tensor comes back).
        validate: check every argument (the default); ``False`` for callers whose arguments are valid by
            construction (the patched layers).

    Returns: [..., N] in the dtype of ``base_out``.
    """
    if validate:
        check_multi_inputs(x, base_out, lora_a, lora_b, adapter_index, inplace)
        scaling = normalise_scaling(scaling, len(lora_a))
        if lora_a:
            check_scaling_fits(scaling, lora_a[0].dtype, "gated_lora_multi")
    overlapping = compiling = False
    if validate and inplace:  # (the layers' calls, validate=False, pay none of this)
        inputs = (x, adapter_index, *lora_a, *lora_b)
        compiling = torch.compiler.is_compiling()
        overlapping = not compiling and overlaps(base_out, inputs)
        if overlapping and records_gradients((base_out,) + inputs):
            x, adapter_index, *weights = apart_from(base_out, inputs)
            lora_a, lora_b = tuple(weights[:len(lora_a)]), tuple(weights[len(lora_a):])
    args = make_multi_args(x, base_out.shape[-1], lora_a, lora_b, scaling, adapter_index)
    if overlapping or compiling:
        # a kernel would read x (or a weight) while writing base_out: compute into a copy first. Under torch.compile,
        # whose tracing cannot read storage addresses, always: right whatever overlaps (the layers pass no check)
        result = run_multi(args, base_out, backend, inplace=False)
        return written_through_a_copy(base_out, result, (base_out, args.x, *args.lora_a, *args.lora_b))
    return run_multi(args, base_out, backend, inplace)


def add_lora_multi_(out: torch.Tensor, x: torch.Tensor, lora_a: tuple, lora_b: tuple, scaling: tuple,
                    adapter_index: torch.Tensor, backend: str = "auto", index_fixed: bool = False) -> torch.Tensor:
    """Several adapters, one per row, added in place outside autograd; returns out.

    ``gated_lora_multi(x, out, ..., inplace=True, validate=False)`` for callers whose arguments are valid by
    construction (the layers: weight tuples, one float per adapter, ``adapter_index`` [M] int64).
    ``index_fixed``: this index tensor's values never change (the routing decision's), so what is derived
    from it may be kept per tensor (``multi_weights.concatenated``).

    Where the torch backend runs a CPU call of at most ``CONCATENATED_MAX_ROWS`` rows and the dtypes are the
    same, its concatenated strategy runs here directly, without the op's arguments object and dispatch: at
    decode with 8 sequences on 4 adapters (one CPU core, the bench model) the step cost 1.58-1.64x base
    through the op and 1.43-1.46x this way (docs/design.md, "Several adapters, one router").

    out: [..., N] (contiguous for the direct path); x: [..., K], the same leading dims.
    """
    # (an index of one dim is passed as it is: the strategy keeps its column mask per index tensor)
    index = adapter_index if adapter_index.dim() == 1 else adapter_index.reshape(-1)
    rows = index.shape[0]
    # (not while torch.compile traces: the kept concatenation is Python state that a graph cannot hold, so there
    # the call goes through the op, one graph node; nor under autocast, which the op turns off)
    if rows <= CONCATENATED_MAX_ROWS and lora_a and x.is_cpu and out.dtype == x.dtype == lora_a[0].dtype and rows \
            and x.shape[-1] and out.shape[-1] and out.is_contiguous() and torch_runs_on_cpu(backend) \
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"):
        add_concatenated_rows(out.view(rows, -1), x.reshape(rows, -1), lora_a, lora_b, scaling, index, index_fixed)
        return out
    return gated_lora_multi(x, out, lora_a, lora_b, scaling, adapter_index, backend, inplace=True, validate=False)


def run_multi(args: MultiLoraArgs, base_out: torch.Tensor, backend: str, inplace: bool) -> torch.Tensor:
    """``gated_lora_multi`` on normalised arguments: through autograd when an input requires grad."""
    if torch.is_grad_enabled() and records_gradients((base_out, args.x, *args.lora_a, *args.lora_b)):
        inplace = inplace and writable_in_place(base_out)
        resolve_backend_name(backend)  # reject an unknown backend name even when there is no row
        return GatedLoraMultiFunction.apply(args, Options(False, backend, inplace), base_out, args.x,
                                            args.adapter_index, *args.lora_a, *args.lora_b)
    out = base_out if inplace else base_out.clone()
    gated_lora_multi_add_(out, args, backend)
    return out
