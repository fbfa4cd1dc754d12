"""Gate test cases shared by the backend sweeps (triton, cuda): fresh random inputs with an exact
number of open rows, and the check against the fp64 reference (closed rows bitwise, open rows within
2x the torch backend's error)."""
from __future__ import annotations


import torch

import gatedlora
from gatedlora.reference import gated_lora_reference

FRACTIONS = ("none", "one", "6%", "75%", "all")


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


def check_against_reference(case: dict, out: torch.Tensor, base_before: torch.Tensor | None = None) -> None:
    """Exact mode. Open rows: error <= 2x the torch backend's + 1 ulp; closed rows: bitwise the base."""
    kwargs = op_kwargs(case)
    base = kwargs["base_out"] if base_before is None else base_before
    kwargs["base_out"] = base
    ref = gated_lora_reference(**kwargs)
    ours = gatedlora.gated_lora(**kwargs, backend="torch")
    is_open = case["open"]
    assert torch.equal(bits(out[~is_open]), bits(base[~is_open])), "a closed row differs from base_out"
    if is_open.any():
        err_kernel = (out[is_open].double() - ref[is_open]).abs().max().item()
        err_torch = (ours[is_open].double() - ref[is_open]).abs().max().item()
        floor = torch.finfo(out.dtype).eps * ref[is_open].abs().max().item()
        assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch, floor)


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
    rows = dict(case, x=x.reshape(-1, k), base_out=out.reshape(-1, n), gate=p.reshape(-1))
    check_against_reference(rows, out.reshape(-1, n), base_before=before.reshape(-1, n))
