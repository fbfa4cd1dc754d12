"""The cuda backend (ops/cuda_backend.py): launch arguments without host sync, the reasons it gives,
the fused GEMV's workspace; with a CUDA device (marked ``gpu``) the kernels against the fp64
reference, no host sync and CUDA-graph capture. The accuracy sweep of every backend, cuda included
where a device exists, is tests/test_backends.py; the extension build is tests/test_cuda_build.py."""
from __future__ import annotations

import pytest
import torch

import gatedlora
from gate_cases import check_against_reference, check_fused, fused_kwargs, make_case, op_kwargs
from gatedlora.ops import backends, cuda_backend, cuda_build, gated_lora_fused
from gatedlora.ops.args import make_args
from gatedlora.ops.contract import GateKind

HAS_GPU = torch.cuda.is_available()


def args_of(case: dict):
    return make_args(case["x"], case["base_out"].shape[-1], case["lora_a"], case["lora_b"], case["scaling"],
                     case.get("gate"), case.get("gate_weight"), case.get("gate_bias"), case["threshold"],
                     case["hard"])


def test_gate_arguments_travel_as_pointers_without_sync(monkeypatch):
    """A gate_bias tensor goes to the kernel by address; nothing reads a tensor value on the host."""
    case = make_case(2, 3, 16, 8, 4, torch.float16, "token-hard", "75%", bias_tensor=True)
    args = args_of(case)
    strided_gate = torch.rand(3, 16)[:, 0]
    given_args = make_args(case["x"], 8, case["lora_a"], case["lora_b"], 1.0, strided_gate, None, None, 0.5, True)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the wrapper read a tensor value")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    kwargs, keep = cuda_backend._gate_kwargs(args)
    given, _ = cuda_backend._gate_kwargs(given_args)
    monkeypatch.undo()
    assert (kwargs["gate_kind"], kwargs["gate_bias"]) == (GateKind.TOKEN, case["gate_bias"].data_ptr())
    assert kwargs["gate_weight"] == case["gate_weight"].data_ptr() == keep.data_ptr()
    assert kwargs["gate_weight_dtype"] == 0
    # a strided given gate passes its stride (x[:, 0] has stride K = 16), not a copy
    assert (given["gate_kind"], given["stride_g"], given["gate_dtype"]) == (GateKind.GIVEN, 16, 0)


def test_not_supported_reasons_without_building(monkeypatch):
    """On CPU tensors the reasons come from dtypes, shapes and the device; the extension is not
    built or loaded to find them."""
    def no_build():
        raise AssertionError("not_supported_reasons tried to load the extension")

    monkeypatch.setattr(cuda_build, "load_extension", no_build)
    monkeypatch.setattr(cuda_build, "unavailable_reason", no_build)
    backend = cuda_backend.CudaBackend()

    def args_for(x_dtype=torch.float32, lora_dtype=None, r=4):
        a = torch.randn(r, 8, dtype=lora_dtype or x_dtype)
        return make_args(torch.randn(2, 8, dtype=x_dtype), 6, a, torch.randn(6, r, dtype=lora_dtype or x_dtype),
                         1.0, None, None, None, 0.5, True)

    device_reason = "no CUDA device" if not HAS_GPU else "tensors are on cpu"
    assert any(device_reason in reason for reason in backend.not_supported_reasons(args_for()))
    assert any("float64" in reason for reason in backend.not_supported_reasons(args_for(torch.float64)))
    assert any("not compiled" in reason for reason in
               backend.not_supported_reasons(args_for(torch.float32, torch.bfloat16)))
    assert any("rank 129" in reason for reason in backend.not_supported_reasons(args_for(r=129)))
    assert not any("rank" in reason for reason in backend.not_supported_reasons(args_for(r=128)))


def test_explicit_cuda_backend_explains_itself(monkeypatch):
    case = make_case(3, 4, 16, 8, 4, torch.float32, "given-hard", "75%")
    expected = "no CUDA device" if not HAS_GPU else "tensors are on cpu"
    with pytest.raises(RuntimeError, match=f"backend 'cuda' cannot run these inputs: .*{expected}"):
        gatedlora.gated_lora(**op_kwargs(case), backend="cuda")
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    backends.clear_dispatch_cache()  # the variable is read when a configuration is first dispatched
    try:
        with pytest.raises(RuntimeError, match=expected):
            gatedlora.gated_lora(**op_kwargs(case))
    finally:
        monkeypatch.delenv(backends.ENV_VAR)
        backends.clear_dispatch_cache()


def test_auto_still_takes_the_torch_backend_on_cpu():
    case = make_case(4, 9, 24, 16, 4, torch.float32, "token-hard", "75%")
    assert "cuda" in backends.available_backends()
    assert backends.select_backend("auto", args_of(case)).name == "torch"


def test_workspace_of_a_captured_call_is_its_own(monkeypatch):
    """Under CUDA-graph capture the fused GEMV gets a fresh workspace (zeroed by a node of the graph), not
    the per-stream one: a graph replayed on another stream must not share counters with eager calls."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cached = dict(cuda_backend._workspaces)
    first = cuda_backend.workspace(torch.device("cpu"))
    second = cuda_backend.workspace(torch.device("cpu"))
    assert first.data_ptr() != second.data_ptr()
    assert first.shape == (cuda_backend.WORKSPACE_BYTES // 4,) and not first.any()
    assert cuda_backend._workspaces == cached


# --- GPU only --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n_split", (1, 2, 7))
@pytest.mark.parametrize("m,k,r", [(1, 4096, 128), (5, 1000, 64), (20, 2048, 17)])
def test_gpu_n_split_and_ranks(n_split, m, k, r):
    """Row blocks of 1, 4 and 8; K a multiple of 8 (vector path) or not; ranks with and without a
    scalar tail along R."""
    case = make_case(m * 31 + r, m, k, 600, r, torch.bfloat16, "token-hard", "75%", bias_tensor=True, device="cuda")
    out = case["base_out"].clone()
    cuda_backend.launch(out, args_of(case), n_split=n_split)
    check_against_reference(case, out)
@pytest.mark.gpu
def test_gpu_calls_do_not_synchronise():
    exact = make_case(31, 1, 4096, 4096, 16, torch.bfloat16, "token-hard", "all", bias_tensor=True, device="cuda")
    fused = make_case(32, 4, 4096, 4096, 16, torch.bfloat16, "given-hard", "75%", device="cuda", linear=True)
    with torch.no_grad():
        gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")  # build, load and allocate outside the check
        gated_lora_fused(**fused_kwargs(fused))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
            y = gated_lora_fused(**fused_kwargs(fused))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check_against_reference(exact, out)
    check_fused(fused, y)


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_step_follows_gate_values():
    """One decode step (exact-mode adapter + fused GEMV) captured once; gates changed in place
    between replays must be followed, which works only if the skip is decided on the device."""
    exact = make_case(41, 4, 1024, 2048, 16, torch.float16, "given-hard", "all", device="cuda")
    fused = make_case(42, 4, 1024, 2048, 16, torch.float16, "given-hard", "all", device="cuda", linear=True)
    gate = exact["gate"]
    fused["gate"] = gate  # one gate tensor drives both kernels
    with torch.no_grad():
        gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs advises
            gated_lora_fused(**fused_kwargs(fused))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gatedlora.gated_lora(**op_kwargs(exact), backend="cuda")
            y = gated_lora_fused(**fused_kwargs(fused))
    for step in range(3):
        new_gate = torch.rand(4, device="cuda")
        new_gate[step] = 0.0
        gate.copy_(new_gate)
        graph.replay()
        torch.cuda.synchronize()
        opened = new_gate >= 0.5
        check_against_reference(dict(exact, gate=new_gate.clone(), open=opened), out)
        check_fused(dict(fused, gate=new_gate.clone(), open=opened), y)


@pytest.mark.gpu
def test_gpu_fused_graph_replays_on_another_stream_beside_eager_calls():
    """A captured fused GEMV replayed on a side stream while eager fused calls run on the capture stream:
    each has its own workspace, so both give the reference result (a shared one would mix counters)."""
    case = make_case(43, 4, 2048, 2048, 16, torch.float16, "given-hard", "75%", device="cuda", linear=True)
    eager = make_case(44, 4, 2048, 2048, 16, torch.float16, "token-hard", "75%", device="cuda", linear=True)
    kwargs, eager_kwargs = fused_kwargs(case), fused_kwargs(eager)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gated_lora_fused(**kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = gated_lora_fused(**kwargs)
        torch.cuda.synchronize()
        results = []
        for _ in range(20):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graph.replay()
            results.append(gated_lora_fused(**eager_kwargs))
            torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
    check_fused(case, y)
    for result in results:
        check_fused(eager, result)
