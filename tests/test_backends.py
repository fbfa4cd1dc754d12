"""Every backend against the fp64 reference: one sweep, run by the ``backend`` fixture (tests/conftest.py)
on torch, triton (the interpreter without a GPU, compiled with one) and, with a CUDA device, cuda and
torch on CUDA tensors (those parameters are marked ``gpu``).

Accuracy rule (flash-attention style): on the rows the gate opens, the largest error against the
fp64 reference is at most twice that of the same computation in PyTorch at the same dtype, plus
one unit in the last place of the largest output. Rows the gate closes equal ``base_out`` bit for bit.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import gatedlora
from gate_cases import (MODES_FRACTIONS, SHAPES, bits, check_against_reference, check_strided_inplace, make_case,
                        op_kwargs, open_count)
from gatedlora.reference import gated_lora_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())  # str hashes vary per process


def run(backend, case: dict, **changes) -> torch.Tensor:
    return gatedlora.gated_lora(**dict(op_kwargs(case), **changes), backend=backend.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,fraction", MODES_FRACTIONS)
def test_gate_modes_and_open_fractions(backend, mode, fraction, dtype):
    seed = seed_of(mode, fraction, dtype)
    case = make_case(seed, 133, 113, 203, 16, dtype, mode, fraction, bias_tensor=seed % 2 == 0,
                     device=backend.device)
    if mode in ("none", "token-soft"):
        assert int(case["open"].sum()) == 133
    else:
        assert int(case["open"].sum()) == open_count(fraction, 133)
    check_against_reference(case, run(backend, case))


@pytest.mark.parametrize("m,r,kn", SHAPES)
def test_odd_shapes(backend, m, r, kn):
    k, n = kn
    dtype = (torch.float16, torch.float32, torch.bfloat16)[(m + r) % 3]
    mode = ("given-hard", "token-hard", "none")[r % 3]
    case = make_case(1000 + 7 * m + r, m, k, n, r, dtype, mode, "75%", device=backend.device)
    check_against_reference(case, run(backend, case))


@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", ("given-soft", "token-hard"))
def test_fp32_lora_weights_on_16bit_x(backend, x_dtype, mode):
    """PEFT keeps adapter weights in fp32 on a bf16/fp16 model: x is upcast, the sum stored in x's dtype."""
    case = make_case(77, 64, 113, 59, 8, x_dtype, mode, "75%", lora_dtype=torch.float32, device=backend.device)
    out = run(backend, case)
    assert out.dtype == x_dtype
    check_against_reference(case, out)


@pytest.mark.parametrize("x_offset", (0, 1))
def test_strided_inputs_and_inplace_output(backend, x_offset):
    """Row strides passed as they are; transposed A and B copied; x one element off alignment."""
    check_strided_inplace(backend.name, backend.device, x_offset=x_offset)


def test_output_with_column_stride(backend):
    """An out [M, N] whose columns are not adjacent: written in place all the same (the kernels stage it
    through a contiguous copy); the gaps keep their poison."""
    case = make_case(12, 9, 40, 24, 4, torch.float32, "given-hard", "75%", device=backend.device)
    buffer = torch.full((9, 48), float("nan"), device=backend.device)
    out = buffer[:, ::2]
    out.copy_(case["base_out"])
    result = run(backend, case, base_out=out, inplace=True)
    assert result is out and torch.isnan(buffer[:, 1::2]).all()
    check_against_reference(case, out)


def test_nan_probability_closes_row(backend):
    """A NaN gate (a token gate on a row of x holding a NaN, or a soft gate computed elsewhere) closes the
    row; on a GPU nothing checks for NaN on the host (that would sync), so the backend must close it."""
    case = make_case(21, 20, 64, 48, 8, torch.float32, "token-hard", "all", device=backend.device)
    case["x"][3, 5] = float("nan")
    case["open"][3] = False
    check_against_reference(case, run(backend, case))


def test_closed_row_holding_inf_stays_the_base_output(backend):
    """inf or NaN in a closed row of x must not reach any other row or the closed row itself."""
    case = make_case(23, 12, 64, 40, 8, torch.float32, "given-hard", "75%", device=backend.device)
    closed = (~case["open"]).nonzero().flatten()
    case["x"][closed[0]] = float("inf")
    case["x"][closed[-1], 7] = float("nan")
    out = run(backend, case)
    assert torch.isfinite(out).all()
    check_against_reference(case, out)


def test_inplace_base_out_that_aliases_or_overlaps_x(backend):
    """inplace=True where base_out is x itself (K = N) or a shifted window of the same buffer: a kernel
    would read x while writing base_out; the op computes through a copy and writes the right answer."""
    case = make_case(31, 10, 48, 48, 8, torch.float32, "given-hard", "75%", device=backend.device)
    for shift in (0, 5):
        buffer = torch.randn(10, 48 + shift, device=backend.device)
        x, base_out = buffer[:, :48], buffer[:, shift:shift + 48]
        expected = gated_lora_reference(x, base_out, case["lora_a"], case["lora_b"], case["scaling"],
                                        gate=case["gate"])
        before = base_out.clone()
        out = run(backend, case, x=x, base_out=base_out, inplace=True)
        assert out is base_out
        closed = ~case["open"]
        assert torch.equal(bits(out[closed]), bits(before[closed]))
        assert (out.double() - expected).abs().max().item() < 1e-4


def test_expanded_base_out(backend):
    """An expanded base_out (stride 0), or one whose rows overlap, cannot be written in place: a clear error naming
    it; out of place it works."""
    case = make_case(32, 6, 32, 16, 4, torch.float32, "given-hard", "75%", device=backend.device)
    row = case["base_out"][:1]
    expanded = row.expand(6, 16)
    with pytest.raises(ValueError, match=r"inplace=True needs a base_out .* expanded tensor \(shape \[6, 16\], "
                                         r"strides \[0, 1\]\)"):
        run(backend, case, base_out=expanded, inplace=True)
    check_against_reference(dict(case, base_out=expanded.contiguous()), run(backend, case, base_out=expanded))
    # rows that overlap without a stride of 0 (an as_strided view): refused too, as two rows would write one address
    overlapping = torch.randn(96, device=backend.device).as_strided((6, 16), (8, 1))
    with pytest.raises(ValueError, match=r"inplace=True needs a base_out .* elements may share memory \(shape "
                                         r"\[6, 16\], strides \[8, 1\]\)"):
        run(backend, case, base_out=overlapping, inplace=True)


@pytest.mark.parametrize("bias", ["float", "0-dim", "[1]", "[1, 1]", "None"])
def test_gate_bias_forms(backend, bias):
    """A token-gate bias as a float, a one-element tensor of any shape, or None (no bias): one value."""
    case = make_case(33, 16, 32, 24, 4, torch.float32, "token-hard", "75%", device=backend.device)
    value = float(case["gate_bias"])
    forms = {"float": value, "0-dim": torch.tensor(value), "[1]": torch.tensor([value]),
             "[1, 1]": torch.tensor([[value]]), "None": None}
    given = forms[bias]
    if isinstance(given, torch.Tensor):
        given = given.to(backend.device)
    if bias == "None":
        expected_open = (torch.sigmoid(case["x"].double().cpu() @ case["gate_weight"].double().cpu()) >= 0.5)
        case = dict(case, open=expected_open.to(backend.device))
    check_against_reference(dict(case, gate_bias=given), run(backend, case, gate_bias=given))


def test_k_zero_gives_the_base_output(backend):
    """K = 0: x A^T is 0, so the term vanishes whatever the gate."""
    device = backend.device
    x, base = torch.zeros(5, 0, device=device), torch.randn(5, 7, device=device)
    a, b = torch.zeros(3, 0, device=device), torch.randn(7, 3, device=device)
    gate = torch.tensor([0.9, 0.1, 0.7, 0.6, 0.2], device=device)
    out = gatedlora.gated_lora(x, base, a, b, 2.0, gate=gate, backend=backend.name)
    assert torch.equal(bits(out), bits(base))
    token = gatedlora.gated_lora(x, base, a, b, 2.0, gate_weight=torch.zeros(0, device=device), gate_bias=0.3,
                                 backend=backend.name)
    assert torch.equal(bits(token), bits(base))


@pytest.mark.parametrize("m,fraction", [(24, "75%"), (1, "one"), (1, "none")])
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_bool_decisions_as_the_gate(backend, hard, m, fraction):
    """A bool gate holds each row's decision: the term of the probabilities that made it under hard gates,
    and a gate of 1 or 0 under soft ones (the threshold is not read)."""
    case = make_case(29, m, 64, 40, 8, torch.float32, "given-hard", fraction, device=backend.device)
    out = run(backend, case, gate=case["open"].to(case["x"].device), hard=hard, threshold=0.99)
    check_against_reference(case, out)
