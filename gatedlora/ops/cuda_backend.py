"""The cuda backend: tensor checks, then one launch of a csrc/ kernel through the pybind11 module.

The module (``cuda_build.load_extension``) takes integers: data pointers, sizes, row strides, dtype
codes, the device index and ``torch.cuda.current_stream().cuda_stream``. Everything the kernels
assume about a tensor is checked here first (``validate_adapter``, ``validate_fused``), with errors
that name the tensor, what was expected and what came; the C++ side checks the device and every
CUDA call and raises RuntimeError with its own message.

Nothing here reads a tensor value (no host sync): the gate is decided in the kernel, and a
``gate_bias`` tensor travels as a device pointer. A call can be captured in a CUDA graph.

The extension is built or loaded the first time this backend sees CUDA tensors, never at
``import gatedlora``; on a machine without a GPU the backend says "no CUDA device" and builds
nothing. Compiled, not run: no GPU has executed these kernels yet.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cuda_build
from .backends import Backend, register_backend
from .checks import GatedLoraArgs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_RANK = 128          # csrc/gated_lora.h kMaxRank
MAX_FUSED_ROWS = 16     # csrc/gated_lora.h kMaxFusedRows
WORKSPACE_BYTES = 8464  # csrc/gated_lora.h kWorkspaceBytes (checked against the module when it loads)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
GATE_NONE, GATE_GIVEN, GATE_TOKEN = 0, 1, 2


def dtype_pair_supported(x_dtype: torch.dtype, lora_dtype: torch.dtype) -> bool:
    """x and LoRA weights of one dtype, or 16-bit x with fp32 LoRA weights (PEFT's default adapter
    dtype on a bf16/fp16 model): the pairs compiled in csrc/, as in the triton backend."""
    if x_dtype not in SUPPORTED_DTYPES or lora_dtype not in SUPPORTED_DTYPES:
        return False
    return x_dtype == lora_dtype or lora_dtype == torch.float32


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, device: torch.device, dtypes=None, shape=None, unit_inner_stride: bool = True) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a tensor on ``device`` with one of
    ``dtypes``, the given ``shape`` and (if asked) unit stride along its last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gatedlora cuda: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"gatedlora cuda: {name} must be on {device}, got a tensor on {t.device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"gatedlora cuda: {name} must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"gatedlora cuda: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if unit_inner_stride and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"gatedlora cuda: {name} must have unit stride along its last dim, got strides {t.stride()}")


def _check_gate(args: GatedLoraArgs, device: torch.device, m: int, k: int) -> None:
    if args.gate is not None:
        check_tensor("gate", args.gate, device, GATE_DTYPES, (m,), unit_inner_stride=False)
    if args.gate_weight is not None:
        check_tensor("gate_weight", args.gate_weight, device, GATE_DTYPES, (k,))
    if isinstance(args.gate_bias, torch.Tensor):
        check_tensor("gate_bias", args.gate_bias, device, GATE_DTYPES, unit_inner_stride=False)
        if args.gate_bias.numel() != 1:
            raise ValueError(f"gatedlora cuda: gate_bias must hold one value, got shape {list(args.gate_bias.shape)}")


def _check_x(x, device: torch.device) -> tuple[int, int]:
    check_tensor("x", x, device, SUPPORTED_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"gatedlora cuda: x must have shape [M, K], got {list(x.shape)}")
    return x.shape[0], x.shape[1]


def _check_lora(args: GatedLoraArgs, device: torch.device, m: int, k: int, n: int) -> None:
    check_tensor("lora_a", args.lora_a, device, SUPPORTED_DTYPES)
    if args.lora_a.dim() != 2 or args.lora_a.shape[1] != k:
        raise ValueError(f"gatedlora cuda: lora_a must have shape [r, {k}], got {list(args.lora_a.shape)}")
    r = args.lora_a.shape[0]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"gatedlora cuda: rank must be in [1, {MAX_RANK}], lora_a has shape {list(args.lora_a.shape)}")
    check_tensor("lora_b", args.lora_b, device, (args.lora_a.dtype,), (n, r))
    if not dtype_pair_supported(args.x.dtype, args.lora_a.dtype):
        raise TypeError(f"gatedlora cuda: x in {args.x.dtype} with lora weights in {args.lora_a.dtype} is not compiled "
                        "(same dtype, or 16-bit x with float32 lora weights)")
    _check_gate(args, device, m, k)


def validate_adapter(out: torch.Tensor, args: GatedLoraArgs, device: torch.device) -> None:
    """What ``adapter_add`` assumes. out: [M, N]; x: [M, K]; lora_a: [r, K]; lora_b: [N, r];
    gate: [M]; gate_weight: [K]; all on ``device``, unit stride along the last dim (rows any stride)."""
    m, k = _check_x(args.x, device)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gatedlora cuda: out must have shape [{m}, N], got {shape}")
    check_tensor("out", out, device, (args.x.dtype,), (m, out.shape[1]))
    _check_lora(args, device, m, k, out.shape[1])


def validate_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], args: GatedLoraArgs,
                   device: torch.device) -> None:
    """What ``fused_gemv`` assumes. x: [M, K] with 1 <= M <= 16; weight: [N, K]; bias: [N] or None;
    lora_a: [r, K]; lora_b: [N, r]; gate: [M]; gate_weight: [K]; all on ``device``."""
    m, k = _check_x(x, device)
    if not 1 <= m <= MAX_FUSED_ROWS:
        raise ValueError(f"gatedlora cuda: x must have 1 to {MAX_FUSED_ROWS} rows for the fused GEMV, "
                         f"got shape {list(x.shape)}")
    check_tensor("weight", weight, device, (x.dtype,))
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"gatedlora cuda: weight must have shape [N, {k}], got {list(weight.shape)}")
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, device, (x.dtype,), (n,))
    _check_lora(args, device, m, k, n)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _gate_kwargs(args: GatedLoraArgs, x_dtype: torch.dtype) -> dict:
    """The gate's launch arguments (pointers, strides, dtype codes); reads no tensor value."""
    kwargs = dict(gate_mode=GATE_NONE, hard=int(args.hard), threshold=float(args.threshold), gate=0, stride_g=0,
                  gate_dtype=0, gate_weight=0, gate_weight_dtype=0, gate_bias=0, gate_bias_dtype=0, bias_from_ptr=0,
                  gate_bias_value=0.0)
    if args.gate is not None:
        kwargs.update(gate_mode=GATE_GIVEN, gate=args.gate.data_ptr(), stride_g=args.gate.stride(0),
                      gate_dtype=DTYPE_CODES[args.gate.dtype])
    elif args.gate_weight is not None:
        weight = args.gate_weight
        if weight.dtype not in (x_dtype, torch.float32):
            # The kernel reads w_g in x's dtype or fp32; others (fp64, or fp16 with bf16 x) cost one small cast.
            weight = weight.float()
        weight = weight.contiguous()
        kwargs.update(gate_mode=GATE_TOKEN, gate_weight=weight.data_ptr(), gate_weight_dtype=DTYPE_CODES[weight.dtype])
        kwargs["_keep"] = weight  # alive until the launch is queued
        if isinstance(args.gate_bias, torch.Tensor):
            kwargs.update(gate_bias=args.gate_bias.data_ptr(), gate_bias_dtype=DTYPE_CODES[args.gate_bias.dtype],
                          bias_from_ptr=1)
        else:
            kwargs.update(gate_bias_value=float(args.gate_bias))
    return kwargs


def _unit_inner_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels read rows as contiguous vectors; other layouts (a transposed A, say) are copied:
    # one extra read and write of that tensor, on an uncommon path. Row strides pass as they are.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_device_problems: dict[int, str] = {}


def extension_problem(device: torch.device) -> Optional[str]:
    """None when the extension is loaded (built if needed) and can use ``device``, else why not."""
    why = cuda_build.unavailable_reason()
    if why is not None:
        return f"the CUDA extension is unavailable: {why}"
    ext = cuda_build.load_extension()
    if ext.WORKSPACE_BYTES != WORKSPACE_BYTES or ext.MAX_RANK != MAX_RANK or ext.MAX_FUSED_ROWS != MAX_FUSED_ROWS:
        return "the CUDA extension does not match cuda_backend.py (constants differ); rebuild it"
    index = _device_index(device)
    if index not in _device_problems:
        _device_problems[index] = ext.device_problem(index)
    problem = _device_problems[index]
    return f"the CUDA extension cannot use {device}: {problem}" if problem else None


def launch(out: torch.Tensor, args: GatedLoraArgs, n_split: int = 0) -> None:
    """Add the gated LoRA term into ``out`` [M, N] in place: one launch of ``adapter_kernel``.

    x: [M, K]; lora_a: [r, K]; lora_b: [N, r]; gate: [M] or None; gate_weight: [K] or None.
    ``n_split`` > 0 overrides the number of blocks along N (tests). Raises ValueError/TypeError on
    a tensor the kernel cannot take, RuntimeError from the extension (no CUDA device, launch failure).
    """
    device = out.device
    if device.type != "cuda":
        raise ValueError(f"gatedlora cuda: out is on {device}; the cuda backend runs on CUDA tensors")
    if out.dim() == 2 and out.shape[-1] > 1 and out.stride(-1) != 1:
        staged = out.contiguous()
        launch(staged, args, n_split)
        out.copy_(staged)
        return
    args = GatedLoraArgs(_unit_inner_stride(args.x), _unit_inner_stride(args.lora_a), _unit_inner_stride(args.lora_b),
                         args.scaling, args.gate, args.gate_weight, args.gate_bias, args.threshold, args.hard)
    validate_adapter(out, args, device)
    ext = cuda_build.load_extension()
    x, a, b = args.x, args.lora_a, args.lora_b
    gate = _gate_kwargs(args, x.dtype)
    keep = gate.pop("_keep", None)
    ext.adapter_add(
        out=out.data_ptr(), x=x.data_ptr(), a=a.data_ptr(), b=b.data_ptr(),
        m=x.shape[0], n=out.shape[1], k=x.shape[1], r=a.shape[0],
        stride_xm=x.stride(0), stride_ar=a.stride(0), stride_bn=b.stride(0), stride_om=out.stride(0),
        x_dtype=DTYPE_CODES[x.dtype], lora_dtype=DTYPE_CODES[a.dtype], scaling=float(args.scaling),
        n_split=int(n_split), device=_device_index(device), stream=_stream(device), **gate,
    )
    del keep


_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def workspace(device: torch.device) -> torch.Tensor:
    """The fused GEMV's workspace for ``device`` and its current stream: zeroed once, and left zeroed
    by every launch (the kernel's last block resets its counters), so no memset per call. One per
    stream because launches on one stream run one after the other."""
    index = _device_index(device)
    key = (index, _stream(device))
    ws = _workspaces.get(key)
    if ws is None:
        ws = torch.zeros(WORKSPACE_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", index))
        _workspaces[key] = ws
    return ws


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], args: GatedLoraArgs) -> torch.Tensor:
    """``x W^T + bias + scaling * g * (x A^T) B^T`` in one launch of ``fused_gemv_kernel``.

    x: [M, K] with M <= 16; weight: [N, K]; bias: [N] or None; args as for ``launch`` (args.x is
    ignored: x is given here). Returns y [M, N] (new, contiguous, x's dtype).
    """
    device = x.device
    if device.type != "cuda":
        raise ValueError(f"gatedlora cuda: x is on {device}; the fused GEMV runs on CUDA tensors")
    x = _unit_inner_stride(x)
    args = GatedLoraArgs(x, _unit_inner_stride(args.lora_a), _unit_inner_stride(args.lora_b), args.scaling, args.gate,
                         args.gate_weight, args.gate_bias, args.threshold, args.hard)
    validate_fused(x, weight, bias, args, device)
    ext = cuda_build.load_extension()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=device)
    a, b = args.lora_a, args.lora_b
    gate = _gate_kwargs(args, x.dtype)
    keep = gate.pop("_keep", None)
    ext.fused_gemv(
        y=y.data_ptr(), x=x.data_ptr(), w=weight.data_ptr(), bias=0 if bias is None else bias.data_ptr(),
        a=a.data_ptr(), b=b.data_ptr(), workspace=workspace(device).data_ptr(),
        m=m, n=n, k=k, r=a.shape[0], stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_ar=a.stride(0),
        stride_bn=b.stride(0), stride_ym=y.stride(0), x_dtype=DTYPE_CODES[x.dtype], lora_dtype=DTYPE_CODES[a.dtype],
        scaling=float(args.scaling), device=_device_index(device), stream=_stream(device), **gate,
    )
    del keep
    return y


def input_reasons(x: torch.Tensor, lora_a: torch.Tensor, gate: Optional[torch.Tensor],
                  tensors: tuple) -> list[str]:
    """Reasons shared by the adapter kernel and the fused GEMV that need no extension: dtypes, rank,
    grad, device (``tensors``: every input, for the requires-grad check)."""
    reasons = []
    for label, dtype in (("x", x.dtype), ("lora weights", lora_a.dtype)):
        if dtype not in SUPPORTED_DTYPES:
            reasons.append(f"{label} dtype {dtype} is not supported (float16, bfloat16, float32)")
    if x.dtype in SUPPORTED_DTYPES and lora_a.dtype in SUPPORTED_DTYPES and not dtype_pair_supported(x.dtype, lora_a.dtype):
        reasons.append(f"x in {x.dtype} with lora weights in {lora_a.dtype} is not compiled (same dtype, or 16-bit x "
                       "with float32 lora weights as PEFT makes them)")
    if gate is not None and gate.dtype not in GATE_DTYPES:
        reasons.append(f"gate dtype {gate.dtype} is not supported ({_dtype_names(GATE_DTYPES)})")
    if lora_a.dim() == 2 and lora_a.shape[0] > MAX_RANK:
        reasons.append(f"rank {lora_a.shape[0]} exceeds the kernel's maximum of {MAX_RANK}")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        reasons.append("inputs require grad and the kernel has no backward (gated_lora's autograd runs the "
                       "forward on a backend that allows it and the backward in PyTorch)")
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    elif x.device.type != "cuda":
        reasons.append(f"tensors are on {x.device.type}; the cuda backend runs on CUDA tensors")
    return reasons


class CudaBackend(Backend):
    name = "cuda"

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        reasons = input_reasons(args.x, args.lora_a, args.gate,
                                (args.x, args.lora_a, args.lora_b, args.gate, args.gate_weight, args.gate_bias))
        if not reasons:
            # Only now, with CUDA tensors the kernel could take: build or load the extension.
            why = extension_problem(args.x.device)
            if why:
                reasons.append(why)
        return reasons

    def add_into(self, out: torch.Tensor, args: GatedLoraArgs) -> None:
        launch(out, args)


register_backend(CudaBackend())
