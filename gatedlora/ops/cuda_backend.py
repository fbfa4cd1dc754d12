"""The cuda backend: one launch of a csrc/ kernel through the pybind11 module, no host sync.

The module (``cuda_build.load_extension``) takes integers: data pointers, sizes, row strides, dtype
codes, the device index and ``torch.cuda.current_stream().cuda_stream``. The arguments arrive
normalised and validated (``args.py``); what the kernels assume beyond that is the kernel contract
(``contract.py``), checked once per configuration by the dispatcher through ``not_supported_reasons``.
The C++ entry points check the device and every CUDA call and raise RuntimeError with their own message.

Nothing here reads a tensor value: the gate is decided in the kernel, and ``gate_bias`` travels as a
device pointer. A call can be captured in a CUDA graph.

The extension is built or loaded the first time this backend sees CUDA tensors, never at
``import gatedlora``; on a machine without a GPU the backend says "no CUDA device" and builds nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cuda_build
from .args import GatedLoraArgs
from .backends import Backend, Launch, register_backend
from .contract import MAX_RANK, GateKind, kernel_reasons, staged_output, unit_inner_stride

MAX_FUSED_ROWS = 16     # csrc/gated_lora.h kMaxFusedRows
WORKSPACE_BYTES = 8464  # csrc/gated_lora.h kWorkspaceBytes (checked against the module when it loads)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # csrc DType


def _gate_kwargs(args: GatedLoraArgs) -> tuple[dict, Optional[torch.Tensor]]:
    """The gate's launch arguments (pointers, strides, dtype codes) and a tensor to keep alive until the
    launch is queued (a cast copy of the token-gate weight); reads no tensor value."""
    kwargs = dict(gate_kind=int(args.gate_kind), hard=int(args.hard), threshold=float(args.threshold), gate=0,
                  stride_g=0, gate_dtype=0, gate_weight=0, gate_weight_dtype=0, gate_bias=0, gate_bias_dtype=0)
    keep = None
    if args.gate_kind is GateKind.GIVEN:
        gate = args.gate
        if gate.dtype == torch.bool:  # decisions: 0/1 probabilities, which any threshold in (0, 1) reproduces
            keep = gate = gate.float()
        kwargs.update(gate=gate.data_ptr(), stride_g=gate.stride(0), gate_dtype=DTYPE_CODES[gate.dtype])
    elif args.gate_kind is GateKind.TOKEN:
        weight = args.gate_weight
        if weight.dtype not in (args.x.dtype, torch.float32):
            # The kernel reads w_g in x's dtype or fp32; others (fp64, or fp16 with bf16 x) cost one small cast.
            weight = weight.float()
        keep = weight = weight.contiguous()
        kwargs.update(gate_weight=weight.data_ptr(), gate_weight_dtype=DTYPE_CODES[weight.dtype],
                      gate_bias=args.gate_bias.data_ptr(), gate_bias_dtype=DTYPE_CODES[args.gate_bias.dtype])
    return kwargs, keep


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_device_problems: dict[int, str] = {}


def extension_problem(device: torch.device) -> Optional[str]:
    """None when the extension is loaded (built if needed) and can use ``device``, else why not."""
    why = cuda_build.unavailable_reason()
    if why is not None:
        return f"the CUDA extension is unavailable: {why}"
    ext = cuda_build.load_extension()
    if mismatched_constants(ext):
        return ("the CUDA extension does not match the Python side (" + ", ".join(mismatched_constants(ext))
                + " differ); rebuild it")
    index = _device_index(device)
    if index not in _device_problems:
        _device_problems[index] = ext.device_problem(index)
    problem = _device_problems[index]
    return f"the CUDA extension cannot use {device}: {problem}" if problem else None


def mismatched_constants(ext) -> list[str]:
    """Names of the constants whose value in the built module differs from the Python side's."""
    expected = {"WORKSPACE_BYTES": WORKSPACE_BYTES, "MAX_RANK": MAX_RANK, "MAX_FUSED_ROWS": MAX_FUSED_ROWS,
                **{f"GATE_{kind.name}": int(kind) for kind in GateKind}}
    return [name for name, value in expected.items() if getattr(ext, name, None) != value]


def _device_reasons(device: torch.device) -> list[str]:
    if not torch.cuda.is_available():
        return ["no CUDA device (torch.cuda.is_available() is False)"]
    if device.type != "cuda":
        return [f"tensors are on {device.type}; the cuda backend runs on CUDA tensors"]
    return []


def launch(out: torch.Tensor, args: GatedLoraArgs, n_split: int = 0) -> None:
    """Add the gated LoRA term into ``out`` [M, N] in place: one launch of ``adapter_kernel``.

    ``n_split`` > 0 overrides the number of blocks along N (tests); 0 lets csrc's heuristic choose.
    Raises RuntimeError from the extension (no CUDA device, launch failure).
    """
    target = staged_output(out)
    x, a, b = unit_inner_stride(args.x), unit_inner_stride(args.lora_a), unit_inner_stride(args.lora_b)
    device = x.device
    gate, keep = _gate_kwargs(args)
    cuda_build.load_extension().adapter_add(
        out=target.data_ptr(), x=x.data_ptr(), a=a.data_ptr(), b=b.data_ptr(), m=args.m, n=args.n, k=args.k,
        r=args.r, stride_xm=x.stride(0), stride_ar=a.stride(0), stride_bn=b.stride(0), stride_om=target.stride(0),
        x_dtype=DTYPE_CODES[x.dtype], lora_dtype=DTYPE_CODES[a.dtype], scaling=float(args.scaling),
        n_split=int(n_split), device=_device_index(device), stream=_stream(device), **gate,
    )
    del keep
    if target is not out:
        out.copy_(target)


# (device index, CUDA stream handle) -> workspace, 8 KB each. Not capped, and never freed: a launch on another stream
# may still read one. The handles are bounded: PyTorch's streams (``torch.cuda.Stream()``, side streams) come from
# its fixed per-device pools and are reused round-robin. Only ``torch.cuda.ExternalStream`` brings handles from
# outside them, one entry for each distinct handle.
_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def workspace(device: torch.device) -> torch.Tensor:
    """The fused GEMV's workspace: kWorkspaceBytes of counters and rank products, zeroed before its
    first use and left zeroed by every launch (the kernel's last block resets its counters).

    Eager calls share one per (device, stream): launches on one stream run one after the other, and
    no memset is needed per call. A call captured in a CUDA graph gets its own, zeroed by a memset
    node in the graph: the graph may replay on any stream, concurrently with eager calls on the
    capture stream or with other graphs, and a workspace chosen by the capture stream's key would
    then be shared between launches that overlap.
    """
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(WORKSPACE_BYTES // 4, dtype=torch.int32, device=device)
    index = _device_index(device)
    key = (index, _stream(device))
    ws = _workspaces.get(key)
    if ws is None:
        ws = torch.zeros(WORKSPACE_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", index))
        _workspaces[key] = ws
    return ws


def fused_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               args: GatedLoraArgs) -> torch.Tensor:
    """``x W^T + bias + scaling * g * (x A^T) B^T`` in one launch of ``fused_gemv_kernel``.

    x: [M, K] with M <= 16 (args.x); weight: [N, K] with unit inner stride; bias: [N] or None.
    Returns y [M, N] (new, contiguous, x's dtype).
    """
    x, a, b = unit_inner_stride(x), unit_inner_stride(args.lora_a), unit_inner_stride(args.lora_b)
    device = x.device
    y = torch.empty(args.m, args.n, dtype=x.dtype, device=device)
    gate, keep = _gate_kwargs(args)
    cuda_build.load_extension().fused_gemv(
        y=y.data_ptr(), x=x.data_ptr(), w=weight.data_ptr(), bias=0 if bias is None else bias.contiguous().data_ptr(),
        a=a.data_ptr(), b=b.data_ptr(), workspace=workspace(device).data_ptr(), m=args.m, n=args.n, k=args.k,
        r=args.r, stride_xm=x.stride(0), stride_wn=weight.stride(0), stride_ar=a.stride(0), stride_bn=b.stride(0),
        stride_ym=y.stride(0), x_dtype=DTYPE_CODES[x.dtype], lora_dtype=DTYPE_CODES[a.dtype],
        scaling=float(args.scaling), device=_device_index(device), stream=_stream(device), **gate,
    )
    del keep
    return y


class CudaBackend(Backend):
    name = "cuda"
    fused = True

    def not_supported_reasons(self, args: GatedLoraArgs) -> list[str]:
        reasons = kernel_reasons(args.x.dtype, args.lora_a.dtype, args.r) + _device_reasons(args.x.device)
        if not reasons:
            # Only now, with CUDA tensors the kernel could take: build or load the extension.
            why = extension_problem(args.x.device)
            if why:
                reasons.append(why)
        return reasons

    def launcher(self, args: GatedLoraArgs) -> Launch:
        return launch  # csrc picks its tiles from the sizes, in C++

    def fused_reasons(self, args: GatedLoraArgs, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> list[str]:
        reasons = kernel_reasons(args.x.dtype, args.lora_a.dtype, args.r) + _device_reasons(args.x.device)
        if args.m > MAX_FUSED_ROWS:
            reasons.append(f"more than {MAX_FUSED_ROWS} rows (the one-pass GEMV serves decode)")
        if weight.dtype != args.x.dtype or (bias is not None and bias.dtype != args.x.dtype):
            reasons.append(f"the base weight and bias must have x's dtype {args.x.dtype} (got {weight.dtype} and "
                           f"{None if bias is None else bias.dtype})")
        if weight.shape[-1] > 1 and weight.stride(-1) != 1:
            reasons.append(f"weight has stride {weight.stride(-1)} along K (the GEMV streams rows of W)")
        if not reasons:
            why = extension_problem(args.x.device)
            if why:
                reasons.append(why)
        return reasons

    def gated_lora_fused(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         args: GatedLoraArgs) -> torch.Tensor:
        return fused_gemv(x, weight, bias, args)


register_backend(CudaBackend())
