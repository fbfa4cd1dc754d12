"""What only the triton multi-adapter kernel has: its tiles, one launch for every adapter, a launch plan that
reads no tensor value, a decode step with several adapters that reads no route on the host; with a GPU (marked
``gpu``), no sync and a CUDA-graph replay that follows a refilled index. The accuracy sweep is
tests/test_multi_ops.py (its ``backend`` fixture runs the interpreter here)."""
from __future__ import annotations

import pytest
import torch

import gatedlora
from gate_cases import bits
from gatedlora.ops import available_backends
from gatedlora.ops.multi_args import make_multi_args
from gatedlora.reference import gated_lora_multi_reference

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")

if "triton" in available_backends():
    from gatedlora.ops import triton_backend, triton_multi

    DEVICE = "cpu" if triton_backend.kernel_is_interpreted() else "cuda"
else:  # pragma: no cover - the module is skipped
    DEVICE = "cpu"


def case_for(seed: int, m: int, k: int, n: int, ranks, dtype, device: str = DEVICE) -> dict:
    """Random inputs with NaN poison in the base rows' outputs (index -1), which must keep their bits."""
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(m) % (len(ranks) + 1) - 1
    index = index[torch.randperm(m, generator=g)]
    base = torch.randn(m, n, generator=g)
    base[index < 0] = float("nan")
    return dict(x=torch.randn(m, k, generator=g).to(dtype).to(device), base_out=base.to(dtype).to(device),
                lora_a=[(torch.randn(r, k, generator=g) * k ** -0.5).to(dtype).to(device) for r in ranks],
                lora_b=[(torch.randn(n, r, generator=g) * r ** -0.5).to(dtype).to(device) for r in ranks],
                scaling=[1.5 + i for i in range(len(ranks))], adapter_index=index.to(device))


def check(case: dict, out: torch.Tensor, tolerance: float) -> None:
    on_base = case["adapter_index"] < 0
    assert torch.equal(bits(out[on_base]), bits(case["base_out"][on_base])), "a base row was written"
    ref = gated_lora_multi_reference(**case)
    err = (out[~on_base].double() - ref[~on_base]).abs().max().item()
    assert err <= tolerance * ref[~on_base].abs().max().item(), err


@pytest.mark.parametrize("key", sorted(triton_multi.multi_tiles()) if "triton" in available_backends() else [],
                         ids=str)
@pytest.mark.parametrize("n_split", (1, 2))
def test_every_tile_config(key, n_split):
    """Each tile the launcher can pick (overrides included), every loop taking more than one step: two K steps,
    three N tiles, a partial second row block, two adapters whose ranks leave BLOCK_R padding."""
    block_r, elt = key
    tiles = triton_multi.multi_tiles()[key]
    block_m = tiles.block_m
    dtype = torch.float32 if elt == 4 else torch.bfloat16
    m, k, n = block_m + 3, tiles.block_k + 37, 2 * tiles.block_n + 22
    case = case_for(block_m * 1000 + block_r + n_split, m, k, n, (max(1, block_r - 3), max(1, block_r // 2)), dtype)
    out = case["base_out"].clone()
    args = make_multi_args(case["x"], n, case["lora_a"], case["lora_b"], tuple(case["scaling"]),
                           case["adapter_index"])
    triton_multi.launch(out, args, tiles=tiles, n_split=n_split)
    check(case, out, 1e-5 if dtype == torch.float32 else 2e-2)


def test_one_launch_covers_every_adapter(monkeypatch):
    """Four adapters, one launch: the grid's second dimension is the adapter."""
    launches = []
    kernel = triton_multi.gated_lora_multi_add_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_multi, "gated_lora_multi_add_kernel", Counting())
    case = case_for(3, 9, 48, 40, (4, 8, 2, 16), torch.float32)
    out = gatedlora.gated_lora_multi(**case, backend="triton")
    assert len(launches) == 1 and launches[0][1] == 4
    check(case, out, 1e-5)


def test_launch_plan_reads_no_tensor_value(monkeypatch):
    """The pointer table is built from data pointers and shapes; the routes stay on the device (a read of a
    tensor value would be a host sync on a GPU)."""
    case = case_for(5, 6, 32, 24, (4, 8), torch.float16)
    args = make_multi_args(case["x"], 24, case["lora_a"], case["lora_b"], tuple(case["scaling"]),
                           case["adapter_index"])

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the launcher read a tensor value")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    grid, positional, keywords = triton_multi.launch_plan(case["base_out"].clone(), args,
                                                          triton_multi.multi_tiles()[(16, 2)], 2)
    monkeypatch.undo()
    assert grid == (1, 2, 1) and positional[2] is case["adapter_index"]  # N = 24: one N tile, no split


def test_reasons():
    case = case_for(7, 4, 16, 8, (4,), torch.float64)
    args = make_multi_args(case["x"], 8, case["lora_a"], case["lora_b"], tuple(case["scaling"]), case["adapter_index"])
    assert any("float64" in r for r in triton_multi.multi_reasons(args))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run these inputs: .*float64"):
        gatedlora.gated_lora_multi(**case, backend="triton")


def test_multi_adapter_decode_step_reads_no_route_on_the_host():
    """A decode step of a model routed among three adapters over a static cache, triton backend: gatedlora's
    code reads no tensor value on the host (what a CUDA-graph capture needs)."""
    if torch.cuda.is_available():
        pytest.skip("checked by the GPU tests below where a GPU exists")
    from steered_routers import RoutePatternRouter
    from test_decode_graph_safety import cache_argument
    from tiny_models import MULTI_ADAPTERS, tiny_multi_adapter_model

    from gatedlora import GatedLoraConfig, patch_model
    from gatedlora.benchmarking.cuda_graphs import gatedlora_host_reads, prefill_static

    model = tiny_multi_adapter_model(layers=3, layers_to_transform=[1, 2])
    router = RoutePatternRouter(40, 4)
    router.pattern = torch.tensor([2, 0, 1, 3])
    patch_model(model, GatedLoraConfig(gate="sequence", adapters=list(MULTI_ADAPTERS), router=router,
                                       backend="triton"))
    ids = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, _, step = prefill_static(model, ids, torch.ones_like(ids), cache_argument(model))
        assert gatedlora_host_reads(lambda: model(**step)) == []


compiled = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled kernel)")


@pytest.mark.gpu
@compiled
def test_cuda_call_does_not_synchronise():
    case = case_for(11, 8, 4096, 4096, (16, 8, 16, 64), torch.bfloat16, device="cuda")
    gatedlora.gated_lora_multi(**case, backend="triton")  # compiles, and builds the pointer table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gatedlora.gated_lora_multi(**case, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(case, out, 2e-2)


@pytest.mark.gpu
@compiled
def test_cuda_graph_replay_follows_a_refilled_index():
    """Capture once, then refill the index in place: each replay takes the new routes (decided on the device)."""
    case = case_for(13, 6, 1024, 2048, (16, 8, 32), torch.float16, device="cuda")
    case["base_out"] = torch.randn_like(case["base_out"])
    index = case["adapter_index"]
    gatedlora.gated_lora_multi(**case, backend="triton")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gatedlora.gated_lora_multi(**case, backend="triton")
    for _ in range(3):
        index.copy_(torch.randint(-1, 3, (6,), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        check(dict(case, adapter_index=index.clone()), out, 2e-2)


def test_fp32_weights_beyond_rank_64_are_refused_and_auto_runs_torch():
    """fp32 LoRA weights with BLOCK_R = 128 have no one-pass tile (each one tried spilled): by name a clear
    error, under auto the torch backend, which is still exact."""
    case = case_for(11, 6, 32, 24, (80, 8), torch.float32)
    with pytest.raises(RuntimeError, match="no tile for BLOCK_R=128"):
        gatedlora.gated_lora_multi(**case, backend="triton")
    check(case, gatedlora.gated_lora_multi(**case), 1e-5)
