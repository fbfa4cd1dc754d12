"""The op's arguments: validated and normalised once, at the op boundary, into one ``GatedLoraArgs``.

Every backend, the autograd function and the registered op receive this object; none of them checks
or converts an argument again. Normalised means: x and the gate flattened to rows, the gate kind an
enum (``contract.GateKind``), ``gate_bias`` always a 0-dim tensor (token gates) or None (other
kinds), shapes read once. Errors name the argument, what was expected and what came.
"""
from __future__ import annotations

import numbers
import sys

import torch

from .contract import GateKind

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class GatedLoraArgs:
    """The inputs of one call, flattened to rows.

    x: [M, K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] probabilities, or bool decisions (True: open),
    (``GateKind.GIVEN``) or None;
    gate_weight: [K] (``GateKind.TOKEN``) or None; gate_bias: 0-dim tensor (``GateKind.TOKEN``) or None;
    m, n, k, r: the sizes.
    """

    __slots__ = ("x", "lora_a", "lora_b", "scaling", "gate_kind", "gate", "gate_weight", "gate_bias",
                 "threshold", "hard", "m", "n", "k", "r")

    def __init__(self, x: torch.Tensor, n: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                 gate_kind: GateKind, gate: torch.Tensor | None, gate_weight: torch.Tensor | None,
                 gate_bias: torch.Tensor | None, threshold: float, hard: bool) -> None:
        self.m, self.k = x.shape
        self.n = n
        self.r = lora_a.shape[0]
        self.x = x
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scaling = scaling
        self.gate_kind = gate_kind
        self.gate = gate
        self.gate_weight = gate_weight
        self.gate_bias = gate_bias
        self.threshold = threshold
        self.hard = hard

    @property
    def lora_dtype(self) -> torch.dtype:
        """The LoRA weights' dtype (``MultiLoraArgs`` has the same property)."""
        return self.lora_a.dtype

    def tensors(self) -> tuple:
        """The input tensors a backend reads (None where the gate kind has none)."""
        return self.x, self.lora_a, self.lora_b, self.gate, self.gate_weight, self.gate_bias

    def replace(self, **changes) -> GatedLoraArgs:
        """A copy with some fields changed (tests, launch variants)."""
        fields = {name: getattr(self, name) for name in self.__slots__ if name not in ("m", "k", "r")}
        fields.update(changes)
        return GatedLoraArgs(**fields)

    def __repr__(self) -> str:
        return (f"GatedLoraArgs(m={self.m}, n={self.n}, k={self.k}, r={self.r}, gate_kind={self.gate_kind.name}, "
                f"x={self.x.dtype}, lora={self.lora_a.dtype}, device={self.x.device}, hard={self.hard})")


def make_args(x: torch.Tensor, n: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              gate: torch.Tensor | None, gate_weight: torch.Tensor | None,
              gate_bias: float | torch.Tensor | None, threshold: float, hard: bool) -> GatedLoraArgs:
    """Normalise arguments that ``check_inputs`` accepted (or that are valid by construction).

    x: [..., K] -> [M, K] (a view where the layout allows); gate: [M] or x.shape[:-1] -> [M];
    gate_bias: float, None (no bias) or a one-element tensor -> 0-dim tensor on x's device.
    """
    if x.dim() == 2:
        rows = x
    elif x.dim() > 2:
        rows = x.flatten(0, -2)  # a view where the layout allows (1.3 us against reshape's 1.7 on one core)
    else:
        rows = x.reshape(1, x.shape[-1])
    if gate_weight is not None:
        kind = GateKind.TOKEN
        gate = None
        if not isinstance(gate_bias, torch.Tensor):
            # A fill kernel where x is on a GPU: no host-to-device copy, so no sync and capturable. In the dtype
            # the gate is computed in: fp32, or fp64 for fp64 inputs (where an fp32 bias was off by 1e-9).
            gate_bias = torch.full((), 0.0 if gate_bias is None else float(gate_bias),
                                   dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                                   device=x.device)
        elif gate_bias.dim():
            gate_bias = gate_bias.reshape(())  # a view: gradients reach the caller's [1] or [1, 1] tensor
    elif gate is not None:
        kind = GateKind.GIVEN
        if gate.dim() != 1:
            gate = gate.reshape(rows.shape[0])
        gate_bias = None
    else:
        kind = GateKind.NONE
        gate_bias = None
    return GatedLoraArgs(rows, n, lora_a, lora_b, scaling, kind, gate, gate_weight, gate_bias, threshold, hard)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_x_and_base_out(x, base_out, inplace, op: str) -> None:
    """The rules every op shares for x [..., K], base_out [..., N] and ``inplace``: float tensors of one dtype
    with the same leading dims, and an in-place base_out whose elements have their own memory."""
    for name, t in (("x", x), ("base_out", base_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        check_strided(t, name, op)
    if not isinstance(inplace, bool):
        raise TypeError(f"{op}: inplace must be a bool, got {inplace!r}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., K], got a 0-dim tensor")
    if base_out.shape[:-1] != x.shape[:-1] or base_out.dim() != x.dim():
        raise ValueError(f"{op}: base_out must have the leading dims of x, shape {_shape(x)[:-1] + ['N']}, "
                         f"got {_shape(base_out)}")
    if x.dtype != base_out.dtype:
        raise TypeError(f"{op}: x and base_out must share a dtype, got {x.dtype} and {base_out.dtype}")
    check_device(x, "base_out", base_out, op)
    if inplace and may_overlap_itself(base_out):
        expanded = any(stride == 0 and size > 1 for size, stride in zip(base_out.shape, base_out.stride()))
        kind = "an expanded tensor" if expanded else "a tensor whose elements may share memory"
        raise ValueError(f"{op}: inplace=True needs a base_out whose elements have their own memory, got {kind} "
                         f"(shape {_shape(base_out)}, strides {list(base_out.stride())}); "
                         "pass inplace=False or base_out.contiguous()")


def may_overlap_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded tensor, an ``as_strided`` view whose rows
    overlap), where writing in place would add twice to one address. False when, with the dims ordered by stride,
    each stride is past the farthest offset the smaller ones reach: every view made by slicing, permuting or
    reshaping memory of its own (PyTorch's own in-place ops refuse stride 0 alone)."""
    if not t.numel():
        return False
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        return True
    if torch.compiler.is_compiling():  # (sorting symbolic strides does not trace: stride 0, PyTorch's rule, only)
        return False
    reached = 0
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1):
        if stride <= reached:
            return True
        reached += stride * (size - 1)
    return False


def is_real(value) -> bool:
    """An int or a float, or a NumPy scalar of one (``numbers.Real``), not a bool: what a number argument takes (a
    threshold swept with ``numpy.linspace`` is a ``numpy.float64`` or ``float32``, a config read through NumPy an
    ``int64``). The callers keep ``float(value)``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# Half the smallest positive fp32 subnormal: a threshold at or below it rounds to 0 in fp32, where the kernels and
# the batched comparisons compare, and a gate of 0 (closed) would open there and nowhere else.
_FP32_ROUNDS_TO_ZERO = 2.0 ** -150


def is_threshold(value) -> bool:
    """A number in (0, 1) that stays above 0 in fp32: what a hard gate's threshold must be."""
    return is_real(value) and _FP32_ROUNDS_TO_ZERO < value < 1


def is_finite(value: int | float) -> bool:
    """Whether a number is finite: False for inf, NaN and an int too large for a float. A comparison, not
    math.isfinite: under torch.compile(dynamic=True) a float read from a container is symbolic, and Dynamo guards
    on a comparison where it cannot trace math.isfinite (NaN compares False)."""
    if isinstance(value, numbers.Integral):  # (exact: float() of an int past the float range raises)
        return abs(int(value)) <= sys.float_info.max
    return abs(float(value)) <= sys.float_info.max  # (float(): a NumPy float32 would compare in float32)


def check_scaling_fits(scaling: tuple, dtype: torch.dtype, op: str) -> None:
    """Each scaling within what the LoRA weights' dtype holds: the term is scaled in that dtype, so a larger one
    gave inf, or torch's own conversion error, in every row it reached."""
    largest = torch.finfo(dtype).max
    too_large = [s for s in scaling if abs(s) > largest]
    if too_large:
        raise ValueError(f"{op}: scaling {too_large[0]!r:.40} does not fit in the LoRA weights' dtype {dtype} "
                         f"(largest {largest:g})")


def check_strided(t: torch.Tensor, name: str, op: str) -> None:
    """A dense tensor: the kernels and the torch backend's in-place matmuls read strides (a sparse base_out or
    lora_b failed inside torch with its own error, and some sparse inputs happened to work)."""
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}; pass "
                        f"{name}.to_dense()")


def check_loaded(weights, x: torch.Tensor, where: str, what: str = "LoRA weights") -> None:
    """RuntimeError where a weight is on the meta device and ``x`` (or a tensor on its device) is not: offloaded by
    accelerate (``cpu_offload``, a ``device_map`` entry "disk") or never loaded. The layers read LoRA weights
    directly, not through their modules' hooks, and torch multiplies a CPU tensor by a meta one into garbage
    without an error (torch 2.13). Everything on the meta device (shape tracing) is fine."""
    if not x.is_meta and any(w.is_meta for w in weights):
        raise RuntimeError(
            f"{where}: {what} on the meta device (offloaded, as accelerate's cpu_offload or a device_map entry "
            "'disk' leave them, or never loaded), where gatedlora reads them directly, not through their modules' "
            "offload hooks: keep them in memory (a device_map with these modules on 'cpu' or a GPU), or load them")


def check_device(x: torch.Tensor, name: str, t: torch.Tensor, op: str) -> None:
    """The rule for every tensor argument: a dense (strided) tensor on x's device."""
    check_strided(t, name, op)
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def check_inputs(x, base_out, lora_a, lora_b, scaling, gate, gate_weight, gate_bias, threshold, hard,
                 inplace: bool = False, straight_through: bool = False, op: str = "gated_lora") -> None:
    """Raise TypeError/ValueError naming the first argument that is wrong (shapes as in ``gated_lora``).

    On CPU tensors a given ``gate`` is also checked for values outside [0, 1] (NaN included): there
    the check costs no device sync. On a GPU it would, so there a NaN closes the gate and other values
    are used as they are (docs/design.md, "The operation").
    """
    check_x_and_base_out(x, base_out, inplace, op)
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    for name, value in (("hard", hard), ("straight_through", straight_through)):
        if not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {value!r}")
    k, n = x.shape[-1], base_out.shape[-1]
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"{op}: lora_a must have shape [r, K] = [r, {k}] (K from x {_shape(x)}), got "
                         f"{_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"{op}: rank r must be at least 1, lora_a has shape {_shape(lora_a)}")
    if lora_b.dim() != 2 or lora_b.shape[0] != n:
        raise ValueError(f"{op}: lora_b must have shape [N, r] = [{n}, {r}] (N from base_out {_shape(base_out)}), "
                         f"got {_shape(lora_b)}")
    if lora_b.shape[1] != r:
        raise ValueError(f"{op}: rank mismatch: lora_a has rank {r} (shape {_shape(lora_a)}) but lora_b has "
                         f"rank {lora_b.shape[1]} (shape {_shape(lora_b)}); expected lora_b of shape [{n}, {r}]")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"{op}: lora_a and lora_b must share a dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if not is_real(scaling) or not is_finite(scaling):
        raise TypeError(f"{op}: scaling must be a finite Python float, got {scaling!r}")
    check_scaling_fits((scaling,), lora_a.dtype, op)
    if not is_threshold(threshold):
        raise ValueError(f"{op}: threshold must be a float in (0, 1), above 0 in fp32, got {threshold!r}")
    if gate is not None and gate_weight is not None:
        raise ValueError(f"{op}: pass either gate (given per-row values) or gate_weight (token gate), not both")
    named = [("lora_a", lora_a), ("lora_b", lora_b)]
    if gate is not None:
        m = x.shape[:-1].numel()
        if not isinstance(gate, torch.Tensor) or (gate.dtype not in FLOAT_DTYPES and gate.dtype != torch.bool):
            raise TypeError(f"{op}: gate must be a float32, float16, bfloat16 or float64 tensor of probabilities "
                            f"or a bool tensor of decisions, got {gate!r:.80}")
        if tuple(gate.shape) not in ((m,), tuple(x.shape[:-1])):
            shapes = " or ".join(dict.fromkeys((str([m]), str(_shape(x)[:-1]))))  # one where they agree
            raise ValueError(f"{op}: gate must have one value per row of x: shape {shapes}, got {_shape(gate)}")
        named.append(("gate", gate))
    if gate_weight is not None:
        if not isinstance(gate_weight, torch.Tensor) or gate_weight.shape != (k,):
            shape = _shape(gate_weight) if isinstance(gate_weight, torch.Tensor) else type(gate_weight).__name__
            raise ValueError(f"{op}: gate_weight must have shape [K] = [{k}], got {shape}")
        if gate_weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: gate_weight must be float32, float16, bfloat16 or float64, got {gate_weight.dtype}")
        named.append(("gate_weight", gate_weight))
    if isinstance(gate_bias, torch.Tensor):
        if gate_bias.numel() != 1:
            raise ValueError(f"{op}: gate_bias must be a scalar (a float or a one-element tensor), got shape "
                             f"{_shape(gate_bias)}")
        if gate_bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: gate_bias must be float32, float16, bfloat16 or float64, got {gate_bias.dtype}")
        named.append(("gate_bias", gate_bias))
    elif gate_bias is not None and not is_real(gate_bias):
        raise TypeError(f"{op}: gate_bias must be a float, a one-element tensor or None, got {gate_bias!r:.80}")
    elif gate_bias is not None and gate_bias != gate_bias:  # (a comparison: see is_finite)
        # every token gate would be NaN and close: an adapter silently off. A tensor bias, a trained parameter
        # that may become NaN on the device, is not read (that would sync); there a NaN closes the gate.
        raise ValueError(f"{op}: gate_bias is NaN, which would close every token gate; give a number (inf and -inf "
                         "open or close every row)")
    for name, t in named:
        check_device(x, name, t, op)
    if gate is not None and gate.dtype != torch.bool and gate.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        _check_gate_values(gate, op)


# The largest value taken as a probability: 1 plus 4 units of fp32 rounding (2**-23 each), since a sum of softmax
# classes (P(any adapter) of a router with several classes) rounds above 1 (a review measured 1.0000001 in 5 of
# 819,200 fp32 rows; none in bf16 or fp16, which hold no value between 1 and 1 + their eps, 0.8% and 0.1%).
PROBABILITY_CEILING = 1.0 + 4 * 2.0 ** -23


def _check_gate_values(gate: torch.Tensor, op: str) -> None:
    """Reject probabilities outside [0, 1] (NaN and inf included; up to ``PROBABILITY_CEILING`` for rounding): a soft
    gate scales the LoRA term by the value, so 1.7 or -0.5 would silently give a different operation."""
    flat = gate.detach().reshape(-1)
    bad = ~((flat >= 0) & (flat <= PROBABILITY_CEILING))  # NaN fails both comparisons
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:8].tolist()
        values = flat[rows].tolist()
        raise ValueError(f"{op}: gate must hold probabilities in [0, 1]; rows {rows} (of {flat.numel()}) hold "
                         f"{values} (use 0.0 to close a row's gate)")


def overlaps(out: torch.Tensor, inputs: tuple) -> bool:
    """True when ``out`` shares memory with one of ``inputs`` (same storage and intersecting byte ranges)."""
    if not out.numel():
        return False
    storage = out.untyped_storage().data_ptr()
    start = out.data_ptr()
    end = start + _extent_bytes(out)
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() == storage:
            other = t.data_ptr()
            if other < end and start < other + _extent_bytes(t):
                return True
    return False


def _extent_bytes(t: torch.Tensor) -> int:
    return (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()
