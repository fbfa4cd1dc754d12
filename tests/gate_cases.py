"""Gate test cases shared by the backend sweeps: fresh random inputs with an exact number of open
rows, and the check against the fp64 reference (closed rows bitwise, open rows within 2x the torch
backend's error)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import gatedlora
from gatedlora.reference import gate_probabilities_reference, gate_values_reference, gated_lora_reference

FRACTIONS = ("none", "one", "6%", "75%", "all")
# Gate modes with every open fraction where the fraction is the caller's to choose; a soft token
# gate and no gate open every row.
MODES_FRACTIONS = [(mode, fraction) for mode in ("given-hard", "given-soft", "token-hard") for fraction in FRACTIONS]
MODES_FRACTIONS += [("none", "all"), ("token-soft", "all")]
# Odd sizes (flash-attention's habit): (M, r, (K, N)); M = 1, 3 (decode), 64, 133 (a partial block).
SHAPES = [(m, r, kn) for m in (1, 3, 64, 133)
          for r, kn in zip((1, 4, 16, 64), ((113, 203), (59, 113), (203, 59), (113, 59)))]


def open_count(fraction: str, m: int) -> int:
    return {"none": 0, "one": 1, "6%": max(1, round(0.06 * m)), "75%": round(0.75 * m), "all": m}[fraction]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a float tensor, so comparisons are exact (NaN and -0.0 included)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def make_case(seed: int, m: int, k: int, n: int, r: int, dtype: torch.dtype, mode: str, fraction: str = "all",
              lora_dtype: torch.dtype | None = None, bias_tensor: bool = False, threshold: float = 0.5,
              device: str = "cpu", linear: bool = False) -> dict:
    """Random inputs; gated modes open exactly ``open_count(fraction, m)`` rows, with margins far
    above fp32 rounding. mode: none, given-hard, given-soft, token-hard, token-soft. With
    ``linear`` the case also holds a base weight [N, K] and bias [N]. "open" is [M] bool."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    case = dict(x=randn(m, k), base_out=randn(m, n), lora_a=randn(r, k, dt=lora_dtype, scale=k ** -0.5),
                lora_b=randn(n, r, dt=lora_dtype, scale=r ** -0.5), scaling=1.7, threshold=threshold,
                hard=mode.endswith("hard"))
    if linear:
        case["weight"] = randn(n, k, scale=k ** -0.5)
        case["bias"] = randn(n)
    count = open_count(fraction, m)
    is_open = torch.zeros(m, dtype=torch.bool)
    is_open[torch.randperm(m, generator=g)[:count]] = True
    if mode.startswith("given"):
        u = torch.rand(m, generator=g, dtype=torch.float64)
        if case["hard"]:
            p = torch.where(is_open, threshold + (1 - threshold) * u, 0.98 * threshold * u)
        else:
            p = torch.where(is_open, 0.05 + 0.95 * u, torch.zeros_like(u))
        case["gate"] = p.float().to(device)
    elif mode.startswith("token"):
        w = torch.randn(k, generator=g, dtype=torch.float64) * k ** -0.5
        logits = case["x"].double().cpu() @ w.float().double()
        if case["hard"]:
            order = logits.sort(descending=True).values
            if count == 0:
                bias, margin = -(order[0].item() + 1.0), 1.0
            elif count == m:
                bias, margin = -(order[-1].item() - 1.0), 1.0
            else:
                bias = -0.5 * (order[count - 1] + order[count]).item()
                margin = 0.5 * (order[count - 1] - order[count]).item()
            assert margin > 1e-4, "seed gives two rows with nearly equal logits; pick another seed"
            is_open = (logits + bias) >= 0
        else:
            bias = 0.3
            is_open = torch.ones(m, dtype=torch.bool)
        case["gate_weight"] = w.float().to(device)
        case["gate_bias"] = torch.tensor(bias, dtype=torch.float32, device=device) if bias_tensor else bias
    else:
        is_open = torch.ones(m, dtype=torch.bool)
    case["open"] = is_open.to(device)
    return case


def op_kwargs(case: dict) -> dict:
    return {key: value for key, value in case.items() if key not in ("open", "weight", "bias")}


def same_dtype_result(case: dict, base: torch.Tensor) -> torch.Tensor:
    """The operation done by plain PyTorch at the inputs' dtypes (flash-attention's yardstick): PEFT's
    ``base + lora_B(lora_A(x)) * s`` with the gate value per row, gates in fp32, on every row (the
    rounding of a CPU matmul depends on its row count) with closed rows of x zeroed (they may hold
    inf, and a bf16 CPU matmul lets a row's inf reach its neighbour). Returns [M, N]."""
    x, a, b = case["x"], case["lora_a"], case["lora_b"]
    x_rows = x.reshape(-1, x.shape[-1])
    x_rows = torch.where(case["open"].reshape(-1, 1), x_rows, torch.zeros_like(x_rows))
    delta = (x_rows.to(a.dtype) @ a.T) @ b.T * case["scaling"]
    p = gate_probabilities_reference(case["x"], case.get("gate"), case.get("gate_weight"), case.get("gate_bias", 0.0),
                                     dtype=torch.float32)
    g = gate_values_reference(p, case["threshold"], case["hard"])
    if g is not None:
        delta = delta * g[:, None].to(delta.dtype)
    return (base.reshape(-1, base.shape[-1]) + delta).to(base.dtype)


def check_against_reference(case: dict, out: torch.Tensor, base_before: torch.Tensor | None = None) -> None:
    """Exact mode. Open rows: error against the fp64 reference at most 2x that of the same computation
    in PyTorch at the same dtype, + 1 ulp of the largest value; closed rows: bitwise the base output."""
    kwargs = op_kwargs(case)
    base = kwargs["base_out"] if base_before is None else base_before
    kwargs["base_out"] = base
    n = base.shape[-1]
    ref = gated_lora_reference(**kwargs).reshape(-1, n)
    out, base = out.reshape(-1, n), base.reshape(-1, n)
    is_open = case["open"].reshape(-1)
    assert torch.equal(bits(out[~is_open]), bits(base[~is_open])), "a closed row differs from base_out"
    if is_open.any():
        plain = same_dtype_result(case, base)
        err_kernel = (out[is_open].double() - ref[is_open]).abs().max().item()
        err_plain = (plain[is_open].double() - ref[is_open]).abs().max().item()
        floor = torch.finfo(out.dtype).eps * ref[is_open].abs().max().item()
        assert err_kernel <= 2 * err_plain + floor, (err_kernel, err_plain, floor)


def fused_kwargs(case: dict) -> dict:
    """``gated_lora_fused``'s arguments from a case made with ``linear=True``."""
    return {key: value for key, value in case.items() if key not in ("open", "base_out")}


def fused_reference(case: dict) -> torch.Tensor:
    """x W^T + bias + the gated LoRA term, all in fp64. Returns [M, N]."""
    base = F.linear(case["x"].double(), case["weight"].double(), case["bias"].double())
    kwargs = dict(op_kwargs(case), base_out=base)
    return gated_lora_reference(**kwargs)


def check_fused(case: dict, y: torch.Tensor) -> None:
    """Every row: error <= 2x that of F.linear + the torch backend at the same dtype, + 1 ulp."""
    ref = fused_reference(case)
    with torch.no_grad():
        base = F.linear(case["x"], case["weight"], case["bias"])
        same_dtype = gatedlora.gated_lora(**dict(op_kwargs(case), base_out=base), backend="torch")
    err = (y.double() - ref).abs().max().item()
    err_torch = (same_dtype.double() - ref).abs().max().item()
    floor = torch.finfo(y.dtype).eps * ref.abs().max().item()
    assert y.shape == ref.shape and y.dtype == case["x"].dtype
    assert err <= 2 * err_torch + floor, (err, err_torch, floor)


def check_strided_inplace(backend: str, device: str, x_offset: int) -> None:
    """x and base_out are column slices of wider buffers (row strides 7 and 5 elements wider; x
    starting ``x_offset`` columns in), A and B transposed views: the backend must write open rows in
    place, leave closed rows bitwise, and never touch the NaN poison beyond base_out's columns."""
    g = torch.Generator().manual_seed(11)
    b_, t_, k, n, r = 3, 11, 113, 59, 16
    dtype = torch.float16
    x = torch.randn(b_, t_, k + 7, generator=g).to(dtype).to(device)[..., x_offset:x_offset + k]
    assert not x.is_contiguous()
    buffer = torch.full((b_, t_, n + 5), float("nan"), dtype=dtype, device=device)
    base_out = buffer[..., :n]
    base_out.copy_(torch.randn(b_, t_, n, generator=g).to(dtype))
    lora_a = torch.randn(k, r, generator=g).mul(k ** -0.5).to(dtype).to(device).t()  # stride (1, r)
    lora_b = torch.randn(r, n, generator=g).mul(r ** -0.5).to(dtype).to(device).t()
    p = torch.rand(b_, t_, generator=g).to(device)
    case = dict(x=x, base_out=base_out, lora_a=lora_a, lora_b=lora_b, scaling=2.0, gate=p, threshold=0.5,
                hard=True, open=(p >= 0.5).reshape(-1))
    before = base_out.clone()
    poison_before = bits(buffer[..., n:]).clone()
    out = gatedlora.gated_lora(**op_kwargs(case), backend=backend, inplace=True)
    assert out.data_ptr() == base_out.data_ptr()
    assert torch.equal(bits(buffer[..., n:]), poison_before), "the kernel wrote outside base_out"
    check_against_reference(case, out, base_before=before)
