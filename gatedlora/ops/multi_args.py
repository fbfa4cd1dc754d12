"""The multi-adapter op's arguments: validated and normalised once, at the op boundary, into one ``MultiLoraArgs``.

As ``args.py`` does for one adapter: every backend, the autograd function and the registered op receive
this object and none of them checks an argument again. Normalised means: x and the adapter index
flattened to rows, the weights and scalings as tuples, the ranks read once.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .args import FLOAT_DTYPES, _shape, check_device, check_x_and_base_out, is_finite, is_real

INDEX_DTYPES = (torch.int32, torch.int64)


class MultiLoraArgs:
    """The inputs of one multi-adapter call, flattened to rows.

    x: [M, K]; lora_a: A tensors [r_i, K]; lora_b: A tensors [N, r_i]; scaling: A floats; adapter_index:
    [M] int32 or int64, the adapter of each row (-1: the base output alone); m, n, k: the sizes; ranks:
    (r_0, ..., r_{A-1}); r_max: the largest rank (0 without adapters); adapters: A.
    """

    __slots__ = ("x", "lora_a", "lora_b", "scaling", "adapter_index", "m", "n", "k", "ranks", "r_max", "adapters")

    def __init__(self, x: torch.Tensor, n: int, lora_a: tuple, lora_b: tuple, scaling: tuple,
                 adapter_index: torch.Tensor) -> None:
        self.m, self.k = x.shape
        self.n = n
        self.x = x
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scaling = scaling
        self.adapter_index = adapter_index
        self.ranks = tuple(a.shape[0] for a in lora_a)
        self.r_max = max(self.ranks) if self.ranks else 0  # (no default=: torch.compile traces no such keyword)
        self.adapters = len(lora_a)

    @property
    def lora_dtype(self) -> torch.dtype:
        """The adapters' dtype (x's when there is no adapter)."""
        return self.lora_a[0].dtype if self.lora_a else self.x.dtype

    def tensors(self) -> tuple:
        """The input tensors a backend reads."""
        return (self.x, self.adapter_index) + self.lora_a + self.lora_b

    def __repr__(self) -> str:
        return (f"MultiLoraArgs(m={self.m}, n={self.n}, k={self.k}, ranks={self.ranks}, x={self.x.dtype}, "
                f"lora={self.lora_dtype}, device={self.x.device})")


def make_multi_args(x: torch.Tensor, n: int, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                    scaling: Sequence[float], adapter_index: torch.Tensor) -> MultiLoraArgs:
    """Normalise arguments that ``check_multi_inputs`` accepted (or that are valid by construction).

    x: [..., K] -> [M, K] (a view where the layout allows); adapter_index: [M] or x.shape[:-1] -> [M].
    """
    rows = x if x.dim() == 2 else x.reshape(x.shape[:-1].numel(), x.shape[-1])
    if adapter_index.dim() != 1:
        adapter_index = adapter_index.reshape(rows.shape[0])
    return MultiLoraArgs(rows, n, lora_a if type(lora_a) is tuple else tuple(lora_a),
                         lora_b if type(lora_b) is tuple else tuple(lora_b),
                         scaling if type(scaling) is tuple else tuple(scaling), adapter_index)


def normalise_scaling(scaling, adapters: int, op: str = "gated_lora_multi") -> tuple[float, ...]:
    """One finite float per adapter from a float (every adapter), a sequence of floats, or a 1-D CPU tensor."""
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 1 or scaling.device.type != "cpu":
            raise TypeError(f"{op}: a scaling tensor must be 1-D on the CPU (one value per adapter), got shape "
                            f"{_shape(scaling)} on {scaling.device}")
        if scaling.requires_grad:  # its values are read as floats: a gradient would be dropped without a word
            raise TypeError(f"{op}: scaling is read as plain numbers and gets no gradient, got a tensor that "
                            "requires grad; pass scaling.detach() (or floats)")
        scaling = scaling.tolist()
    if is_real(scaling):
        scaling = [scaling] * adapters
    if not isinstance(scaling, (list, tuple)) or any(not is_real(s) or not is_finite(s) for s in scaling):
        raise TypeError(f"{op}: scaling must be a finite float or one finite float per adapter, got {scaling!r:.80}")
    if len(scaling) != adapters:
        raise ValueError(f"{op}: scaling must have one value per adapter ({adapters}), got {len(scaling)}")
    return tuple(float(s) for s in scaling)


def check_one_dtype(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], op: str,
                    names: Sequence[str] | None = None) -> None:
    """Every adapter's A and B in one dtype: the kernels read every adapter with one element type (the Triton
    kernel takes it from its first pointer), and the torch backend multiplies them in one matmul. ``names``:
    the adapters' names, for the message (else their positions)."""
    dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_a, lora_b)]
    if len({d for pair in dtypes for d in pair}) > 1:
        labels = list(names) if names is not None else [f"adapter {i}" for i in range(len(dtypes))]
        found = ", ".join(f"{label}: A {str(a)[6:]}, B {str(b)[6:]}" for label, (a, b) in zip(labels, dtypes))
        raise TypeError(f"{op}: the adapters' weights must share one dtype, got {found}")


def check_multi_inputs(x, base_out, lora_a, lora_b, adapter_index, inplace: bool = False,
                       op: str = "gated_lora_multi") -> None:
    """Raise TypeError/ValueError naming the first argument that is wrong (shapes as in ``gated_lora_multi``).

    On CPU tensors the adapter index is also checked for values outside [-1, A): there the check costs
    no device sync. On a GPU it would, so there a row whose index is outside [0, A) gets the base output, as
    under ``torch.compile``, which cannot raise on a value.
    """
    check_x_and_base_out(x, base_out, inplace, op)
    k, n = x.shape[-1], base_out.shape[-1]
    for name, seq in (("lora_a", lora_a), ("lora_b", lora_b)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list of tensors, one per adapter, got {type(seq).__name__}")
    if len(lora_a) != len(lora_b):
        raise ValueError(f"{op}: lora_a and lora_b must list the same adapters, got {len(lora_a)} and {len(lora_b)}")
    # where every adapter agrees on K (or N) and x (or base_out) does not, x is the one to name
    for name, tensor, size, letter, weights, seq, dim in (("x", x, k, "K", "lora_a", lora_a, 1),
                                                          ("base_out", base_out, n, "N", "lora_b", lora_b, 0)):
        sizes = {t.shape[dim] for t in seq if isinstance(t, torch.Tensor) and t.dim() == 2}
        if len(seq) > 1 and len(sizes) == 1 and size not in sizes:
            raise ValueError(f"{op}: {name} must have shape [..., {letter}] with {letter} = {sizes.pop()}, as every "
                             f"adapter's {weights} has, got {_shape(tensor)}")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        for name, t in ((f"lora_a[{i}]", a), (f"lora_b[{i}]", b)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: {name} must be a float32, float16, bfloat16 or float64 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            check_device(x, name, t, op)
        if a.dim() != 2 or a.shape[1] != k or a.shape[0] < 1:
            raise ValueError(f"{op}: lora_a[{i}] must have shape [r, K] = [r, {k}] with r >= 1, got {_shape(a)}")
        if b.dim() != 2 or b.shape != (n, a.shape[0]):
            raise ValueError(f"{op}: lora_b[{i}] must have shape [N, r] = [{n}, {a.shape[0]}] (r from lora_a[{i}]), "
                             f"got {_shape(b)}")
    check_one_dtype(lora_a, lora_b, op)
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: adapter_index must be an int32 or int64 tensor (one adapter per row, -1 for the "
                        f"base output), got {getattr(adapter_index, 'dtype', type(adapter_index).__name__)}")
    m = x.shape[:-1].numel()
    if tuple(adapter_index.shape) not in ((m,), tuple(x.shape[:-1])):
        shapes = " or ".join(dict.fromkeys((str([m]), str(_shape(x)[:-1]))))  # one where they agree
        raise ValueError(f"{op}: adapter_index must have one value per row of x: shape {shapes}, "
                         f"got {_shape(adapter_index)}")
    check_device(x, "adapter_index", adapter_index, op)
    if adapter_index.device.type == "cpu" and not torch.compiler.is_compiling():
        flat = adapter_index.reshape(-1)
        bad = (flat < -1) | (flat >= len(lora_a))
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:8].tolist()
            raise ValueError(f"{op}: adapter_index must hold -1 (base) or an adapter in [0, {len(lora_a)}); rows "
                             f"{rows} (of {flat.numel()}) hold {flat[rows].tolist()}")
