"""``gated_lora_multi``: several adapters, one per row, on every backend that has a multi-adapter kernel
(torch; triton in the interpreter without a GPU, compiled with one), against the fp64 reference.

Accuracy rule as in tests/test_backends.py: on adapter rows the largest error against the fp64 reference
is at most twice that of the same computation in PyTorch at the same dtype, plus one unit in the last
place of the largest output. The PyTorch computation is done two ways, since a CPU matmul's rounding
depends on its row count: PEFT's mixed batch (each adapter on its own rows) and each adapter on every
row; the larger error of the two is the yardstick. Base rows (index -1)
equal ``base_out`` bit for bit, checked on outputs poisoned with NaN where nothing may write.
"""
from __future__ import annotations

import zlib

import os

import pytest
import torch

import gatedlora
from gate_cases import bits
from gatedlora.ops import backends
from gatedlora.ops.multi_args import make_multi_args
from gatedlora.reference import gated_lora_multi_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (M, K, N, ranks): decode sizes, a partial Triton block, and the torch backend's grouped strategy (M > 32)
SHAPES = [(1, 113, 59, (4, 16, 1)), (3, 59, 113, (16, 8)), (13, 203, 59, (1, 64, 4, 16)),
          (64, 113, 203, (8, 8, 8)), (133, 59, 113, (16, 4, 32))]
# rows per route: every row on base, every row on one adapter, PRISM-like mixes
MIXES = ("base", "one adapter", "25% base", "no base")


@pytest.fixture
def multi_backend(backend):
    if backend.name == "cuda":
        pytest.skip("the cuda backend has no multi-adapter kernel (test_cuda_is_refused_and_auto_skips_it)")
    return backend


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_case(seed: int, m: int, k: int, n: int, ranks, dtype, mix: str = "25% base", lora_dtype=None,
              device: str = "cpu") -> dict:
    """Fresh random inputs; ``index`` [M] int64 with the routes of ``mix`` in a random order."""
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    adapters = len(ranks)
    if mix == "base":
        index = torch.full((m,), -1)
    elif mix == "one adapter":
        index = torch.full((m,), adapters - 1)
    else:
        low = 0 if mix == "no base" else -1
        index = torch.arange(m) % (adapters - low) + low  # every route taken when M allows
        index = index[torch.randperm(m, generator=g)]
    return dict(x=randn(m, k), base_out=randn(m, n),
                lora_a=[randn(r, k, dt=lora_dtype, scale=k ** -0.5) for r in ranks],
                lora_b=[randn(n, r, dt=lora_dtype, scale=r ** -0.5) for r in ranks],
                scaling=[0.5 + i for i in range(adapters)], adapter_index=index.to(device))


def plain_result(case: dict, base: torch.Tensor, every_row: bool = False) -> torch.Tensor:
    """``base + lora_B(lora_A(x)) * s`` at the inputs' dtypes with each row's adapter: PEFT's mixed batch
    (each adapter's rows gathered), or with ``every_row`` each adapter on every row, then selected."""
    out = base.clone()
    for i, (a, b, s) in enumerate(zip(case["lora_a"], case["lora_b"], case["scaling"])):
        rows = case["adapter_index"] == i
        x = case["x"].to(a.dtype)
        delta = ((x @ a.T) @ b.T * s)[rows] if every_row else (x[rows] @ a.T) @ b.T * s
        out[rows] = (out[rows] + delta).to(out.dtype)
    return out


def check(case: dict, out: torch.Tensor, base_before: torch.Tensor | None = None) -> None:
    base = case["base_out"] if base_before is None else base_before
    ref = gated_lora_multi_reference(**dict(case, base_out=base))
    on_base = case["adapter_index"] < 0
    assert out.dtype == base.dtype
    assert torch.equal(bits(out[on_base]), bits(base[on_base])), "a base row differs from base_out"
    if (~on_base).any():
        err = (out[~on_base].double() - ref[~on_base]).abs().max().item()
        err_plain = max((plain_result(case, base, every)[~on_base].double() - ref[~on_base]).abs().max().item()
                        for every in (False, True))
        floor = torch.finfo(out.dtype).eps * ref[~on_base].abs().max().item()
        assert err <= 2 * err_plain + floor, (err, err_plain, floor)


def run(backend, case: dict, **changes) -> torch.Tensor:
    return gatedlora.gated_lora_multi(**dict(case, **changes), backend=backend.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mix", MIXES)
def test_routes_and_dtypes(multi_backend, mix, dtype):
    case = make_case(seed_of(mix, dtype), 45, 113, 59, (16, 4, 8), dtype, mix, device=multi_backend.device)
    check(case, run(multi_backend, case))


@pytest.mark.parametrize("m,k,n,ranks", SHAPES)
def test_odd_shapes_and_ranks(multi_backend, m, k, n, ranks):
    dtype = DTYPES[(m + k) % 3]
    case = make_case(seed_of(m, k, n, ranks), m, k, n, ranks, dtype, device=multi_backend.device)
    check(case, run(multi_backend, case))


@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16), ids=str)
def test_fp32_adapters_on_16bit_x(multi_backend, x_dtype):
    """PEFT keeps adapter weights in fp32 on a 16-bit model: x is upcast, the sum stored in x's dtype."""
    case = make_case(5, 40, 59, 113, (8, 16), x_dtype, lora_dtype=torch.float32, device=multi_backend.device)
    check(case, run(multi_backend, case))


@pytest.mark.parametrize("m", (3, 64))
def test_poisoned_output_written_only_on_adapter_rows(multi_backend, m):
    """Base rows of base_out hold NaN poison (and the buffer's gaps beside base_out too): after an in-place
    call both keep their bits, and adapter rows are right."""
    case = make_case(7 + m, m, 59, 48, (4, 16, 8), torch.float32, device=multi_backend.device)
    buffer = torch.full((m, 53), float("nan"), device=multi_backend.device)
    out = buffer[:, :48]
    out.copy_(case["base_out"])
    on_base = case["adapter_index"] < 0
    out[on_base] = float("nan")
    before, gaps = out.clone(), bits(buffer[:, 48:]).clone()
    result = run(multi_backend, case, base_out=out, inplace=True)
    assert result is out
    assert torch.equal(bits(buffer[:, 48:]), gaps), "the kernel wrote outside base_out"
    assert torch.isfinite(out[~on_base]).all()
    check(case, out, base_before=before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_in_a_base_row_reaches_no_other_row(multi_backend, dtype):
    """The base row keeps its bits (``check``) and no other row sees the inf."""
    case = make_case(9, 24, 64, 40, (8, 4), dtype, device=multi_backend.device)
    on_base = (case["adapter_index"] < 0).nonzero().flatten()
    case["x"][on_base[0]] = float("inf")
    out = run(multi_backend, case)
    assert torch.isfinite(out).all()
    check(case, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [12, 45])  # the torch backend's concatenated strategy (M <= 32 on the CPU), grouped
def test_a_diverged_adapter_reaches_only_its_own_rows(multi_backend, dtype, m):
    """Adapter 1's B holds an inf and adapter 2's a NaN: base rows keep their bits, and every row is non-finite
    exactly where the fp64 reference is and otherwise within rounding of it (the concatenated strategy multiplied
    the masked columns' 0 by the inf and made NaN of every row, base rows included)."""
    if multi_backend.name == "torch" and multi_backend.device != "cpu":
        pytest.skip("off the CPU the torch backend restores base rows only (nonfinite_adapters)")
    case = make_case(seed_of("diverged", m, dtype), m, 40, 24, (8, 4, 6), dtype, device=multi_backend.device)
    case["lora_b"][1][3, 2] = float("inf")
    case["lora_b"][2][5, 1] = float("nan")
    ref = gated_lora_multi_reference(**case)
    on_base = case["adapter_index"] < 0
    assert (case["adapter_index"] == 0).any() and ref.isinf().any() and ref.isnan().any()
    outputs = [run(multi_backend, case)]
    if multi_backend.name == "torch":  # the layers' path, its column mask kept with the index
        from gatedlora.ops import add_lora_multi_

        outputs.append(add_lora_multi_(case["base_out"].clone(), case["x"], tuple(case["lora_a"]),
                                       tuple(case["lora_b"]), tuple(case["scaling"]), case["adapter_index"],
                                       index_fixed=True))
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for out in outputs:
        assert torch.equal(bits(out[on_base]), bits(case["base_out"][on_base]))
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        finite = ref.isfinite()
        torch.testing.assert_close(out[finite].double(), ref[finite], rtol=tolerance, atol=tolerance)


def test_an_overflow_in_another_adapters_product_reaches_no_row(multi_backend):
    """fp16: adapter 1's x A^T overflows, but no row takes adapter 1; every row equals PEFT's adapter 0."""
    device = multi_backend.device
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 32, generator=g).half().to(device)
    a0 = (torch.randn(4, 32, generator=g) * 0.1).half().to(device)
    a1 = torch.full((4, 32), 60000.0).half().to(device)
    b0, b1 = (torch.randn(16, 4, generator=g).half().to(device) for _ in range(2))
    base = torch.randn(4, 16, generator=g).half().to(device)
    index = torch.zeros(4, dtype=torch.int64, device=device)
    out = gatedlora.gated_lora_multi(x, base, [a0, a1], [b0, b1], [2.0, 2.0], index, backend=multi_backend.name)
    want = gated_lora_multi_reference(x, base, [a0], [b0], [2.0], index)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_strided_inputs_int32_index_and_leading_dims(multi_backend):
    """x a column slice of a wider buffer with leading dims [2, 5], transposed weights (read through
    contiguous copies), an int32 index of shape [2, 5]."""
    device = multi_backend.device
    case = make_case(13, 10, 59, 40, (8, 16), torch.float16, device=device)
    wide = torch.randn(10, 66, dtype=torch.float16, device=device)
    x = wide[:, 3:62]
    x.copy_(case["x"])
    case["lora_a"] = [a.t().contiguous().t() for a in case["lora_a"]]  # same values, stride (1, r)
    case["lora_b"] = [b.t().contiguous().t() for b in case["lora_b"]]
    assert case["lora_a"][0].stride(-1) != 1
    out = gatedlora.gated_lora_multi(x.reshape(2, 5, 59), case["base_out"].reshape(2, 5, 40), case["lora_a"],
                                     case["lora_b"], case["scaling"], case["adapter_index"].int().reshape(2, 5),
                                     backend=multi_backend.name)
    assert out.shape == (2, 5, 40)
    check(case, out.reshape(10, 40))


def test_weights_updated_in_place_or_moved_are_read_as_they_are_now(multi_backend):
    """No stale copy: after an in-place update (an optimizer step) and after a weight's storage is
    replaced (``param.data = ...``, as ``model.to`` does) the op computes with the current values."""
    case = make_case(17, 6, 48, 32, (4, 8), torch.float32, "no base", device=multi_backend.device)
    case["lora_a"] = [torch.nn.Parameter(a, requires_grad=False) for a in case["lora_a"]]
    check(case, run(multi_backend, case))
    with torch.no_grad():
        case["lora_a"][1].mul_(-3.0)
        case["lora_b"][0].add_(0.5)
    check(case, run(multi_backend, case))
    case["lora_a"][0].data = torch.randn_like(case["lora_a"][0])
    check(case, run(multi_backend, case))


@pytest.mark.parametrize("m", [6, 40])  # the torch backend's concatenated and grouped strategies on the CPU
def test_adapters_of_different_dtypes_are_refused_where_the_layers_call_the_op(multi_backend, m):
    """The layers call the op without validation (``add_lora_multi_``): adapters whose weights differ in dtype
    (PEFT's fp32 default beside one loaded with autocast_adapter_dtype=False, or a weight cast after patching)
    raise a TypeError that names them, where the triton kernel read one with the other's element type (values
    of 1e9, inf or NaN) and the torch backend raised a matmul dtype error or gave a result."""
    case = make_case(23, m, 48, 32, (4, 8), torch.float32, device=multi_backend.device)
    out = case["base_out"].clone()
    gatedlora.ops.add_lora_multi_(out, case["x"], case["lora_a"], case["lora_b"], case["scaling"],
                                  case["adapter_index"], multi_backend.name)
    check(case, out)
    case["lora_a"][1] = torch.nn.Parameter(case["lora_a"][1].to(torch.bfloat16), requires_grad=False)
    case["lora_b"][1] = case["lora_b"][1].to(torch.bfloat16)
    with pytest.raises(TypeError, match="adapters' weights must share one dtype, got adapter 0: A float32, B float32, "
                                        "adapter 1: A bfloat16, B bfloat16"):
        gatedlora.ops.add_lora_multi_(case["base_out"].clone(), case["x"], case["lora_a"], case["lora_b"],
                                      case["scaling"], case["adapter_index"], multi_backend.name)
    with pytest.raises(TypeError, match="share one dtype"):
        run(multi_backend, case)


@pytest.mark.parametrize("optimizer", ("AdamW", "SGD"))
def test_weights_updated_by_a_fused_optimizer_are_read_as_they_are_now(multi_backend, optimizer):
    """Fused optimizer kernels write without moving the version counters that keep the torch backend's
    concatenation (and a pointer table's contiguous copies) current: every optimizer step invalidates them.
    B of adapter 1 is a transposed view (inner stride not 1), so the pointer table keeps a copy of it too."""
    case = make_case(18, 6, 40, 24, (4, 8), torch.float32, device=multi_backend.device)
    weights = [torch.nn.Parameter(t) for t in case["lora_a"]]
    weights += [torch.nn.Parameter(case["lora_b"][0]),
                torch.nn.Parameter(case["lora_b"][1].t().contiguous().t())]
    case["lora_a"], case["lora_b"] = weights[:2], weights[2:]
    step = getattr(torch.optim, optimizer)(weights, lr=0.1, fused=True)
    for _ in range(2):
        out = run(multi_backend, case)
        with torch.no_grad():
            check(case, out)
        # (a sum: the steps move the weights by about lr without growing them, so the outputs stay at the
        # magnitudes the check's rounding floor is set for; squared, two SGD steps grew them to about 5e10)
        out.sum().backward()
        before = [w.detach().clone() for w in weights]
        step.step()
        step.zero_grad()
        assert all(not torch.equal(w, b) for w, b in zip(weights, before))
        with torch.no_grad():
            check(case, run(multi_backend, case))


def test_weights_updated_by_an_unseen_write_are_read_after_forget_kept_copies(multi_backend):
    """A write through ``.data`` moves no version counter; ``forget_kept_copies`` is the way to say it happened."""
    case = make_case(20, 6, 40, 24, (4, 8), torch.float32, "no base", device=multi_backend.device)
    check(case, run(multi_backend, case))
    case["lora_b"][1].data.mul_(-3.0)
    gatedlora.ops.forget_kept_copies()
    check(case, run(multi_backend, case))


def test_a_rank_cut_down_through_data_at_the_same_address_is_read_after_forget_kept_copies(multi_backend):
    """``w.data = w.data[:2]`` keeps the address and the version: the kernel's pointer table still held the old
    rank (and ``forget_kept_copies`` did not reach tables), so it read adapter 0's old columns."""
    case = make_case(21, 8, 40, 24, (4, 8), torch.float32, "no base", device=multi_backend.device)
    check(case, run(multi_backend, case))
    a, b = case["lora_a"][0], case["lora_b"][0]
    address = a.data_ptr(), b.data_ptr()
    a.data, b.data = a.data[:2], b.data[:, :2]
    assert (a.data_ptr(), b.data_ptr()) == address
    if multi_backend.name == "triton":  # the table is keyed by the ranks too: seen without being told
        check(case, run(multi_backend, case))
    gatedlora.ops.forget_kept_copies()
    check(case, run(multi_backend, case))


def test_a_pointer_table_whose_rows_are_unchanged_stays_the_same_tensor():
    """A CUDA graph captured with a pointer table reads that tensor on every replay: ``forget_kept_copies`` and
    updates in place (a kept contiguous copy refreshed where it is) keep it; a weight at a new address, or a rank
    cut, gives a table with the new rows."""
    from gatedlora.ops.multi_weights import pointer_table

    case = make_case(24, 6, 40, 24, (4, 8), torch.float32)
    lora_a = [torch.nn.Parameter(a) for a in case["lora_a"]]
    lora_b = [torch.nn.Parameter(case["lora_b"][0]), torch.nn.Parameter(case["lora_b"][1].t().contiguous()).t()]
    assert lora_b[1].stride(-1) != 1  # read through a contiguous copy kept with the table

    def table():
        args = make_multi_args(case["x"], 24, lora_a, lora_b, case["scaling"], case["adapter_index"])
        return pointer_table(args)[0]

    first = table()
    rows = first.clone()
    gatedlora.ops.forget_kept_copies()
    assert table() is first
    with torch.no_grad():
        lora_b[1].mul_(-2.0)  # the copy is stale: refreshed in place
    assert table() is first and torch.equal(first, rows)
    lora_a[0].data = torch.randn(4, 40)
    gatedlora.ops.forget_kept_copies()
    moved = table()
    assert moved is not first and moved[0, 0] == lora_a[0].data_ptr() and torch.equal(moved[:, 1], rows[:, 1])
    lora_a[1].data = lora_a[1].data[:2]
    lora_b[1].data = lora_b[1].data[:, :2]
    cut = table()
    assert cut is not moved and cut[2].tolist() == [4, 2]


def test_inference_weights_updated_in_place_are_read_as_they_are_now(multi_backend):
    """Inference tensors have no version counter, so nothing derived from their values is kept between calls
    (B of adapter 1 is a transposed view: the pointer table's contiguous copy of it is rebuilt too)."""
    with torch.inference_mode():
        case = make_case(22, 6, 40, 24, (4, 8), torch.float32, device=multi_backend.device)
        case["lora_b"][1] = case["lora_b"][1].t().contiguous().t()
        check(case, run(multi_backend, case))
        case["lora_a"][0].copy_(torch.randn_like(case["lora_a"][0]))
        case["lora_b"][1].mul_(-3.0)
        check(case, run(multi_backend, case))
    check(case, run(multi_backend, case))


@pytest.mark.parametrize("m", (5, 45))  # both torch strategies
def test_autocast_leaves_the_op_computing_in_the_adapters_dtype(multi_backend, m):
    """Under ``torch.autocast`` the op computes as without it (x cast to the adapters' dtype), forward and
    backward: the same bits, not a bf16 term the torch backend's in-place adds could not mix with fp32 weights."""
    device = multi_backend.device
    # x and the base output in bf16 (the base layer ran under autocast), PEFT's fp32 adapters
    case = make_case(seed_of("autocast", m), m, 40, 24, (4, 8, 2), torch.bfloat16, lora_dtype=torch.float32,
                     device=device)
    leaves = [t.clone().requires_grad_() for t in [case["x"], *case["lora_a"], *case["lora_b"]]]
    go = torch.randn(m, 24, device=device)
    results = []
    from gatedlora.ops import add_lora_multi_

    fp32 = [t.float() for t in [case["x"], case["base_out"]]]
    for enabled in (False, True):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
            out = gatedlora.gated_lora_multi(leaves[0], case["base_out"], leaves[1:4], leaves[4:], case["scaling"],
                                             case["adapter_index"], backend=multi_backend.name)
            with torch.no_grad():
                plain = run(multi_backend, case)
                # every tensor fp32 (the direct path of add_lora_multi_ at M <= 32 on the CPU computed in bf16)
                added = add_lora_multi_(fp32[1].clone(), fp32[0], tuple(case["lora_a"]), tuple(case["lora_b"]),
                                        tuple(case["scaling"]), case["adapter_index"], multi_backend.name)
        results.append((out.detach(), plain, added, *torch.autograd.grad(out, leaves, go.to(out.dtype))))
    check(case, results[0][1])
    for without, under in zip(*results):
        assert torch.equal(bits(under), bits(without))


@pytest.mark.parametrize("device", ("cpu", pytest.param("cuda", marks=pytest.mark.gpu)))
@pytest.mark.parametrize("large", ("B", "xA"))
@pytest.mark.parametrize("m", (4, 40))  # both torch strategies
def test_fp16_adapters_whose_scaled_term_overflows_in_one_order_give_the_finite_term(m, large, device):
    """fp16, the term finite: |B| * scaling above 65504 (B times its scaling made inf, and the masked columns NaN
    in every row, base rows included), or |x A^T| * scaling above it (scaling x A^T instead made inf).
    The choice between the two is made on the device (no host read), so it runs on CUDA tensors too."""
    gen = torch.Generator().manual_seed(61)
    x = (torch.randn(m, 8, generator=gen) * (1e-3 if large == "B" else 1.0)).half()
    base = torch.randn(m, 6, generator=gen).half()
    a_size, b_size = (1, 400) if large == "B" else (3000, 1e-3)
    lora_a = [torch.randn(2, 8, generator=gen).half(), (torch.randn(3, 8, generator=gen) * a_size).half()]
    lora_b = [torch.randn(6, 2, generator=gen).half(), (torch.randn(6, 3, generator=gen) * b_size).half()]
    scaling = [1.0, 200.0 if large == "B" else 16.0]
    index = torch.tensor([0, 1, -1, 1] * (m // 4))
    moved = [t.to(device) for t in (x, base, index)], [[t.to(device) for t in ts] for ts in (lora_a, lora_b)]
    (x_d, base_d, index_d), (lora_a_d, lora_b_d) = moved
    out = gatedlora.gated_lora_multi(x_d, base_d, lora_a_d, lora_b_d, scaling, index_d, backend="torch").cpu()
    ref = gated_lora_multi_reference(x, base, lora_a, lora_b, scaling, index)
    u = x[index == 1].float() @ lora_a[1].float().t()
    big = (lora_b[1].float() * scaling[1]) if large == "B" else (u * scaling[1])
    assert torch.isfinite(ref).all() and big.abs().max() > 65504
    assert torch.equal(bits(out[index < 0]), bits(base[index < 0]))
    # fp16 rounding of terms that cancel: within a few ulp of the row's largest value
    assert ((out.double() - ref).abs() <= 2e-3 * ref.abs().amax(dim=1, keepdim=True)).all()


def test_the_callers_index_is_never_written(multi_backend):
    """Values outside [-1, A) are refused on the CPU; whatever runs, the index passed in keeps its values."""
    case = make_case(19, 8, 32, 24, (4, 8), torch.float32, device=multi_backend.device)
    before = case["adapter_index"].clone()
    check(case, run(multi_backend, case))
    assert torch.equal(case["adapter_index"], before)


def test_an_index_refilled_without_its_version_counter_is_read_as_it_is_now(multi_backend):
    """A write through ``.data`` or a numpy view does not move the version counter: the op must not reuse what
    it derived from the old values."""
    case = make_case(21, 8, 32, 24, (4, 8), torch.float32, "no base", device=multi_backend.device)
    check(case, run(multi_backend, case))
    case["adapter_index"].data.fill_(-1)
    out = run(multi_backend, case)
    assert torch.equal(bits(out), bits(case["base_out"]))


def test_forms_do_not_keep_freed_weights_alive(multi_backend):
    """The derived forms (pointer table, concatenation) hold the weights weakly: dropping them frees them."""
    import gc
    import weakref

    from gatedlora.ops import multi_weights

    case = make_case(29, 6, 32, 24, (4, 8), torch.float32, device=multi_backend.device)
    run(multi_backend, case)
    refs = [weakref.ref(t) for t in case["lora_a"] + case["lora_b"]]
    entries = len(multi_weights._FORMS)
    del case
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(multi_weights._FORMS) < entries


def test_auto_on_a_gpu_reads_the_dtype_of_every_adapter(monkeypatch):
    """``auto``'s GPU order takes the LoRA dtype of multi-adapter arguments too (their weights are a tuple)."""
    from types import SimpleNamespace

    from gatedlora.ops import preference

    seen = []
    monkeypatch.setattr(preference, "gpu_order",
                        lambda device, x_dtype, lora_dtype, m, table=None: seen.append(lora_dtype) or ())
    case = make_case(31, 4, 16, 8, (4, 2), torch.float32, lora_dtype=torch.float16)
    args = make_multi_args(case["x"], 8, case["lora_a"], case["lora_b"], tuple(case["scaling"]),
                           case["adapter_index"])
    args.x = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    backends._candidates(args)
    assert seen == [torch.float16]


def test_a_backend_override_without_a_multi_adapter_kernel_leaves_auto_to_choose(monkeypatch):
    case = make_case(37, 4, 16, 8, (4,), torch.float32)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    backends.clear_dispatch_cache()
    try:
        check(case, gatedlora.gated_lora_multi(**case))
    finally:
        backends.clear_dispatch_cache()


def test_no_adapter_and_no_row(multi_backend):
    x, base = torch.randn(4, 8), torch.randn(4, 6)
    index = torch.full((4,), -1)
    assert torch.equal(gatedlora.gated_lora_multi(x, base, [], [], [], index, backend=multi_backend.name), base)
    case = make_case(3, 0, 8, 6, (4,), torch.float32)
    assert run(multi_backend, case).shape == (0, 6)


def test_cuda_is_refused_and_auto_skips_it():
    """The cuda backend has no multi-adapter kernel: by name a clear error, under auto never chosen."""
    case = make_case(1, 4, 16, 8, (4,), torch.float32)
    with pytest.raises(RuntimeError, match="gated_lora_multi: backend 'cuda' .*has no multi-adapter kernel"):
        gatedlora.gated_lora_multi(**case, backend="cuda")
    args = make_multi_args(case["x"], 8, case["lora_a"], case["lora_b"], tuple(case["scaling"]),
                           case["adapter_index"])
    assert backends.dispatch_multi("auto", args).backend.name == "torch"


def test_both_torch_strategies_and_one_choice_per_configuration(monkeypatch):
    from gatedlora.ops import torch_multi

    calls = []
    for name in ("add_concatenated", "add_grouped"):
        original = getattr(torch_multi, name)
        monkeypatch.setattr(torch_multi, name, lambda out, args, f=original, n=name: (calls.append(n), f(out, args)))
    backends.clear_dispatch_cache()
    for m in (8, 8, 100):
        case = make_case(m, m, 32, 24, (4, 8), torch.float32)
        check(case, gatedlora.gated_lora_multi(**case, backend="torch"))
    assert calls == ["add_concatenated", "add_concatenated", "add_grouped"]
    backends.clear_dispatch_cache()


@pytest.mark.parametrize("m", (5, 70))  # both torch strategies
def test_gradients_match_the_reference(multi_backend, m):
    case = make_case(23 + m, m, 24, 16, (4, 8, 2), torch.float32, device=multi_backend.device)
    leaves = {name: [t.clone().requires_grad_() for t in case[name]] for name in ("lora_a", "lora_b")}
    x = case["x"].clone().requires_grad_()
    base = case["base_out"].clone().requires_grad_()
    go = torch.randn(m, 16, device=multi_backend.device)
    out = gatedlora.gated_lora_multi(x, base, leaves["lora_a"], leaves["lora_b"], case["scaling"],
                                     case["adapter_index"], backend=multi_backend.name)
    grads = torch.autograd.grad(out, [x, base, *leaves["lora_a"], *leaves["lora_b"]], go)
    ref_leaves = [t.detach().double().requires_grad_() for t in [x, base, *leaves["lora_a"], *leaves["lora_b"]]]
    adapters = len(case["lora_a"])
    ref = gated_lora_multi_reference(ref_leaves[0], ref_leaves[1], ref_leaves[2:2 + adapters],
                                     ref_leaves[2 + adapters:], case["scaling"], case["adapter_index"])
    expected = torch.autograd.grad(ref, ref_leaves, go.double())
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_inplace_on_a_view_under_autograd():
    """inplace=True on a base_out that is a view (a slice of a buffer), autograd recording: written in place, with
    the out-of-place gradients (x, every weight, and what the buffer came from; K != N)."""
    case = make_case(43, 6, 7, 5, (2, 3), torch.float64)
    source = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in [case["x"], *case["lora_a"], *case["lora_b"]]]
    go = torch.randn(6, 5, dtype=torch.float64)
    results = []
    for inplace in (False, True):
        buffer = source * 1.0
        base = buffer[2:8, 1:]
        out = gatedlora.gated_lora_multi(leaves[0], base, leaves[1:3], leaves[3:], case["scaling"],
                                         case["adapter_index"], backend="torch", inplace=inplace)
        assert (out is base) == inplace
        results.append((out.detach().clone(), torch.autograd.grad((out * go).sum(), [source, *leaves])))
    check(case, results[1][0], base_before=source.detach()[2:8, 1:])
    assert torch.equal(results[0][0], results[1][0])
    for plain, written in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(written, plain, rtol=1e-13, atol=1e-13)


def test_gradcheck_and_gradgradcheck():
    """fp64 on the torch backend's grouped strategy: first and second derivatives of every input. (gradcheck
    perturbs inputs through ``.data``, which bypasses the version counters that keep the concatenated
    strategy's copy current, so that strategy's gradients are checked against the reference above.)"""
    case = make_case(71, 40, 6, 5, (2, 3), torch.float64)
    inputs = [t.clone().requires_grad_() for t in [case["x"], case["base_out"], *case["lora_a"], *case["lora_b"]]]

    def fn(x, base, a0, a1, b0, b1):
        return gatedlora.gated_lora_multi(x, base, [a0, a1], [b0, b1], case["scaling"], case["adapter_index"],
                                          backend="torch")

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_base_rows_give_no_adapter_a_gradient():
    case = make_case(41, 6, 8, 5, (2, 3), torch.float32, "one adapter")
    weights = [t.clone().requires_grad_() for t in case["lora_a"] + case["lora_b"]]
    out = gatedlora.gated_lora_multi(case["x"], case["base_out"], weights[:2], weights[2:], case["scaling"],
                                     case["adapter_index"])
    out.sum().backward()
    assert torch.count_nonzero(weights[0].grad) == 0 and torch.count_nonzero(weights[2].grad) == 0
    assert torch.count_nonzero(weights[1].grad) > 0 and torch.count_nonzero(weights[3].grad) > 0


@pytest.mark.parametrize("inplace", (False, True))
@pytest.mark.parametrize("backend_name", ("torch", "triton"))
def test_torch_compile_keeps_the_op_whole(backend_name, inplace):
    """fullgraph=True: the registered op is one node; the compiled result equals eager exactly. In place too (the
    overlap check read storage addresses, which Dynamo cannot trace), and base_out is written as in eager."""
    if backend_name not in gatedlora.available_backends():
        pytest.skip("triton is not installed")
    case = make_case(43, 12, 32, 24, (4, 8), torch.float32)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(x, base, index):
        y = gatedlora.gated_lora_multi(x, base, case["lora_a"], case["lora_b"], case["scaling"], index,
                                       backend=backend_name, inplace=inplace)
        return torch.nn.functional.gelu(y)

    torch._dynamo.reset()
    eager_base, compiled_base = case["base_out"].clone(), case["base_out"].clone()
    with torch.no_grad():
        eager = fn(case["x"], eager_base, case["adapter_index"])
        compiled = torch.compile(fn, fullgraph=True, backend=recording_backend)(
            case["x"], compiled_base, case["adapter_index"])
    assert torch.equal(compiled, eager) and torch.equal(compiled_base, eager_base)
    assert torch.equal(eager_base, case["base_out"]) != inplace
    nodes = [n for n in graphs[0].graph.nodes if "gated_lora_multi_add_" in str(n.target)]
    assert len(nodes) == 1


@pytest.mark.parametrize("inplace", (False, True))
def test_torch_compile_with_dynamic_shapes_keeps_one_graph(inplace):
    """dynamic=True makes the ranks and strides symbolic: the arguments' host code must trace with them (max(...,
    default=) did not, nor sorting the strides for the in-place overlap check). Weights passed as inputs, two row
    counts, each against the fp64 reference."""
    case = make_case(44, 12, 16, 8, (2, 3), torch.float32)

    def fn(x, base, index, *weights):
        return gatedlora.gated_lora_multi(x, base, weights[:2], weights[2:], case["scaling"], index, backend="torch",
                                          inplace=inplace)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="eager")
    for m in (5, 9):
        x, base = torch.randn(m, 16), torch.randn(m, 8)
        index = torch.tensor([-1, 0, 1, 1, 0, -1, 0, 1, 1][:m])
        before = base.clone()
        with torch.no_grad():
            out = compiled(x, base, index, *case["lora_a"], *case["lora_b"])
        want = gated_lora_multi_reference(x, before, case["lora_a"], case["lora_b"], case["scaling"], index)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[index < 0], before[index < 0]) and torch.equal(base, out if inplace else before)


@pytest.mark.parametrize("change,message", [
    (dict(lora_b="drop"), r"lora_a and lora_b must list the same adapters, got 2 and 1"),
    (dict(lora_a="rank"), r"lora_b\[1\] must have shape \[N, r\] = \[6, 5\] \(r from lora_a\[1\]\), got \[6, 3\]"),
    (dict(lora_a="k"), r"lora_a\[0\] must have shape \[r, K\] = \[r, 8\] with r >= 1, got \[2, 7\]"),
    # every adapter agrees and x or base_out does not: they are named (lora_a[0] and lora_b[0] were)
    (dict(x="k"), r"x must have shape \[\.\.\., K\] with K = 8, as every adapter's lora_a has, got \[4, 7\]"),
    (dict(base_out="n"), r"base_out must have shape \[\.\.\., N\] with N = 6, as every adapter's lora_b has, "
                         r"got \[4, 5\]"),
    (dict(lora_b="dtype"), r"the adapters' weights must share one dtype"),
    (dict(scaling=[1.0]), r"scaling must have one value per adapter \(2\), got 1"),
    (dict(scaling=[1.0, float("nan")]), r"scaling must be a finite float"),
    (dict(scaling=[1.0, 10 ** 400]), r"scaling must be a finite float"),
    (dict(scaling=[1.0, -1e39]), r"scaling -1e\+39 does not fit in the LoRA weights' dtype torch.float32"),
    (dict(scaling=torch.tensor([1.0, 2.0], requires_grad=True)), r"gets no gradient, got a tensor that requires"),
    (dict(adapter_index="float"), r"adapter_index must be an int32 or int64 tensor"),
    (dict(adapter_index="shape"), r"adapter_index must have one value per row of x: shape \[4\], got \[3\]"),
    (dict(adapter_index="range"), r"adapter_index must hold -1 \(base\) or an adapter in \[0, 2\); rows \[1, 3\]"),
    (dict(lora_a="tensor"), r"lora_a must be a list of tensors, one per adapter, got Tensor"),
    (dict(base_out="meta"), r"base_out is on meta but x is on cpu; all tensors must share a device"),
    (dict(lora_b="sparse"), r"lora_b\[0\] must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
])
def test_bad_input_is_named(change, message):
    case = make_case(47, 4, 8, 6, (2, 3), torch.float32, "no base")
    key, how = next(iter(change.items()))
    if how == "drop":
        case[key] = case[key][:1]
    elif how == "rank":
        case["lora_a"][1] = torch.randn(5, 8)
    elif how == "k" and key == "lora_a":
        case["lora_a"][0] = torch.randn(2, 7)
    elif how == "k":
        case["x"] = case["x"][:, :7]
    elif how == "n":
        case["base_out"] = case["base_out"][:, :5]
    elif how == "dtype":
        case["lora_b"][1] = case["lora_b"][1].double()
    elif how == "float":
        case[key] = case[key].float()
    elif how == "shape":
        case[key] = case[key][:3]
    elif how == "range":
        case[key] = torch.tensor([0, 2, -1, -2])
    elif how == "tensor":
        case[key] = torch.stack([case["lora_a"][0], case["lora_a"][0]])
    elif how == "meta":
        case[key] = case[key].to("meta")
    elif how == "sparse":
        case[key][0] = case[key][0].to_sparse()
    else:
        case[key] = how
    with pytest.raises((TypeError, ValueError), match=message):
        gatedlora.gated_lora_multi(**case)


def test_numpy_scalings_are_numbers():
    """A NumPy scalar, or a list of them, as scaling gives what Python floats give."""
    import numpy as np

    case = make_case(seed_of("numpy", 9), 9, 8, 6, (2, 3), torch.float32, "25% base")
    numpy_case = {**case, "scaling": [np.float32(s) for s in case["scaling"]]}
    assert torch.equal(bits(gatedlora.gated_lora_multi(**numpy_case)), bits(
        gatedlora.gated_lora_multi(**{**case, "scaling": [float(np.float32(s)) for s in case["scaling"]]})))
    one = gatedlora.gated_lora_multi(**{**case, "scaling": np.float64(0.5)})
    assert torch.equal(bits(one), bits(gatedlora.gated_lora_multi(**{**case, "scaling": 0.5})))


@pytest.mark.parametrize("dtype,lora_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                              (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "bf16-fp32"])
@pytest.mark.parametrize("m", [1, 8, 32, 40])
def test_add_lora_multi_equals_the_op(dtype, lora_dtype, m):
    """``add_lora_multi_`` (the layers' path outside autograd) writes what ``gated_lora_multi`` returns, bit for
    bit, whether it runs the concatenated strategy directly (CPU, M <= 32, one dtype) or through the op; an
    inf in a base row stays out; the same index tensor passed again after the weights changed in place, or
    with other weights, gets their terms (the kept column mask belongs to one set of weights)."""
    from gatedlora.ops import add_lora_multi_

    case = make_case(seed_of("fast", m, dtype, lora_dtype), m, 40, 24, (4, 8, 16), dtype, lora_dtype=lora_dtype)
    case["x"][(case["adapter_index"] < 0).nonzero().flatten()[:1]] = float("inf")
    weights = (tuple(case["lora_a"]), tuple(case["lora_b"]), tuple(case["scaling"]))
    index = case["adapter_index"]
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                case["lora_b"][1].mul_(-2.0)  # in place: the version counter moves
        if step == 2:
            case["lora_a"] = [a.flip(1).contiguous() for a in case["lora_a"]]  # other weights, same index
            weights = (tuple(case["lora_a"]),) + weights[1:]
        expected = gatedlora.gated_lora_multi(case["x"], case["base_out"], *weights[:3], index, backend="torch")
        out = case["base_out"].clone()
        assert add_lora_multi_(out, case["x"], *weights, index, index_fixed=True) is out
        assert torch.equal(bits(out), bits(expected))
        check(case, out)


def test_add_lora_multi_with_no_adapter_leaves_out_as_it_is():
    """No adapter is valid (the op returns the base output): the direct path's test read lora_a[0]."""
    from gatedlora.ops import add_lora_multi_

    case = make_case(seed_of("no-adapter"), 4, 8, 6, (2,), torch.float32, "base")
    out = case["base_out"].clone()
    assert add_lora_multi_(out, case["x"], (), (), (), case["adapter_index"], index_fixed=True) is out
    assert torch.equal(bits(out), bits(case["base_out"]))


def test_add_lora_multi_takes_the_op_off_its_path(monkeypatch):
    """A non-contiguous out, a backend other than torch, or leading dims with an index of their shape: still the
    op's answer."""
    import importlib

    from gatedlora.ops import add_lora_multi_

    op_module = importlib.import_module("gatedlora.ops.gated_lora_multi")
    calls = []
    real = op_module.gated_lora_multi
    monkeypatch.setattr(op_module, "gated_lora_multi", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case(seed_of("fast-op"), 6, 40, 24, (4, 8), torch.float32)
    args = (case["x"], case["base_out"], case["lora_a"], case["lora_b"], case["scaling"], case["adapter_index"])
    expected = real(*args, backend="torch")
    strided = case["base_out"].t().contiguous().t()
    add_lora_multi_(strided, case["x"], tuple(case["lora_a"]), tuple(case["lora_b"]), tuple(case["scaling"]),
                    case["adapter_index"])
    # (not bitwise the row-major result: MKL rounds a column-major out differently on some CPUs, an AMD EPYC here)
    assert calls == [1]
    check(case, strided)
    out = case["base_out"].clone().view(2, 3, 24)
    add_lora_multi_(out, case["x"].view(2, 3, 40), tuple(case["lora_a"]), tuple(case["lora_b"]),
                    tuple(case["scaling"]), case["adapter_index"].view(2, 3))
    assert calls == [1] and torch.equal(out.view(6, 24), expected)
    if "triton" in backends.available_backends() and os.environ.get("TRITON_INTERPRET") == "1":  # CPU tensors
        out = case["base_out"].clone()
        add_lora_multi_(out, case["x"], tuple(case["lora_a"]), tuple(case["lora_b"]), tuple(case["scaling"]),
                        case["adapter_index"], backend="triton")
        assert calls == [1, 1]
        check(case, out)


@pytest.mark.parametrize("m", (12, 40))  # the concatenated strategy, the grouped one
def test_an_index_out_of_range_under_torch_compile_keeps_the_base_output(m):
    """Compiled, the op's range check cannot raise (it reads values): rows whose index is outside [-1, A) keep the
    base output, as on a GPU, on either CPU strategy. The grouped one refused -2 in bincount and, past A, added
    rows of memory nothing wrote (1.7e32 seen in a review)."""
    case = make_case(47, m, 32, 24, (4, 8), torch.float32)
    index = case["adapter_index"].clone()
    bad = torch.tensor([1, 5, 9])
    index[bad] = torch.tensor([2, -2, 7])

    def fn(x, base, index):
        return gatedlora.gated_lora_multi(x, base, case["lora_a"], case["lora_b"], case["scaling"], index,
                                          backend="torch")

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(case["x"], case["base_out"], index)
    with pytest.raises(ValueError, match=r"rows \[1, 5, 9\] \(of %d\) hold \[2, -2, 7\]" % m):
        fn(case["x"], case["base_out"], index)  # eager: refused
    assert torch.equal(bits(compiled[bad]), bits(case["base_out"][bad]))
    fine = torch.ones(m, dtype=torch.bool)
    fine[bad] = False
    valid = {**case, "adapter_index": index.where(fine, -1)}
    want = gated_lora_multi_reference(valid["x"], valid["base_out"], valid["lora_a"], valid["lora_b"],
                                      valid["scaling"], valid["adapter_index"])
    torch.testing.assert_close(compiled.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,k,n,ranks", [(8, 59, 113, (16, 4, 8)), (1, 113, 59, (4, 16, 1)), (32, 40, 24, (8, 8)),
                                         (6, 0, 24, (4, 8)), (6, 40, 0, (4, 8))])
def test_a_kept_concatenation_adds_what_the_op_adds_and_is_reused_until_an_argument_changes(m, k, n, ranks):
    """``add_kept_concatenation_`` (the layers' CPU decode path): bitwise the op's concatenated strategy (base rows
    their bits), the same record back while the weights, scalings, index and backend are the same, a new one when
    one changes, and None (out untouched) where the plain case does not hold: more rows than the strategy takes,
    another dtype than the weights'."""
    from gatedlora.ops.torch_multi import CONCATENATED_MAX_ROWS, add_kept_concatenation_

    case = make_case(41 + m + k + n, m, max(k, 1), max(n, 1), ranks, torch.float32)
    case.update(x=case["x"][:, :k], base_out=case["base_out"][:, :n].contiguous(),  # (a width of 0 where asked)
                lora_a=[a[:, :k] for a in case["lora_a"]], lora_b=[b[:n] for b in case["lora_b"]])
    args = (case["lora_a"], case["lora_b"], tuple(case["scaling"]), case["adapter_index"])
    expected = case["base_out"].clone()
    gatedlora.ops.add_lora_multi_(expected, case["x"], *args, "torch", True)
    out = case["base_out"].clone()
    kept = add_kept_concatenation_(out, case["x"], None, *args, "auto")
    assert kept is not None and torch.equal(bits(out), bits(expected))
    if k and n:
        check(case, out)
    out = case["base_out"].clone()
    assert add_kept_concatenation_(out, case["x"], kept, *args, "auto") is kept
    assert torch.equal(bits(out), bits(expected))
    with torch.no_grad():
        case["lora_b"][0].mul_(-2.0)  # (a weight updated in place: its version moves)
    renewed = add_kept_concatenation_(case["base_out"].clone(), case["x"], kept, *args, "auto")
    assert renewed is not kept and renewed is not None
    assert add_kept_concatenation_(case["base_out"].clone(), case["x"], renewed, *args[:3],
                                   case["adapter_index"].clone(), "auto") is not renewed
    untouched = case["base_out"].clone()
    assert add_kept_concatenation_(untouched, case["x"].double(), renewed, *args, "auto") is None
    assert torch.equal(untouched, case["base_out"])
    bf16 = [[t.bfloat16() for t in case[name]] for name in ("lora_a", "lora_b")]  # (rows computed in pairs)
    assert add_kept_concatenation_(untouched.bfloat16(), case["x"].bfloat16(), None, *bf16, *args[2:], "auto") is None
    many = torch.zeros(CONCATENATED_MAX_ROWS + 1, dtype=torch.int64)
    assert add_kept_concatenation_(torch.zeros(CONCATENATED_MAX_ROWS + 1, n), torch.zeros(CONCATENATED_MAX_ROWS + 1, k),
                                   None, *args[:3], many, "auto") is None
