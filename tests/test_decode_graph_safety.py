"""A sequence-routed decode step can be captured in a CUDA graph: it reads no decision on the host.

CPU: ``gatedlora_host_reads`` lists the host reads of tensor data that gatedlora's own code makes during
a decode step over a static cache (what makes a CUDA-graph capture fail on a GPU); the triton backend runs
in the interpreter. GPU (marked ``gpu``): an eager decode step runs under
``torch.cuda.set_sync_debug_mode("error")``, and a decode step captured with
``gatedlora.benchmarking.cuda_graphs.capture_decode_step`` replays to the eager step's logits, with mixed
routes whose closed sequences equal the unpatched model's.
"""
from __future__ import annotations

import gc

import pytest
import torch
from steered_routers import PatternRouter
from tiny_models import randomize_lora_b, tiny_peft_model

from gatedlora import GatedLoraConfig, gated_lora, patch_model
from gatedlora.benchmarking.cuda_graphs import capture_decode_step, gatedlora_host_reads, prefill_static
from gatedlora.benchmarking.scenarios import cache_argument as hf_cache_argument
from gatedlora.ops import available_backends

PATTERN = torch.tensor([1.0, 0.0, 1.0, 0.0])  # sequences 0 and 2 take the adapter


def routed_pair(backend: str, device: str, dtype: torch.dtype):
    """(unpatched PEFT model, its patched twin with a PatternRouter) on ``device``; adapter after block 0."""
    base = tiny_peft_model(layers=3, layers_to_transform=[1, 2]).to(device, dtype)
    randomize_lora_b(base)
    twin = tiny_peft_model(layers=3, layers_to_transform=[1, 2]).to(device, dtype)
    twin.load_state_dict(base.state_dict())
    router = PatternRouter(40, dtype).to(device)
    router.pattern = PATTERN.to(device)
    patch_model(twin, GatedLoraConfig(gate="sequence", router_layer=0, router=router, backend=backend))
    return base, twin


def cache_argument(model) -> str:
    """The keyword the PEFT model ``model`` passes its KV cache by."""
    return hf_cache_argument(model.get_base_model())


@pytest.mark.skipif("triton" not in available_backends(), reason="triton backend unavailable")
def test_decode_step_reads_no_decision_on_the_host():
    if torch.cuda.is_available():
        pytest.skip("checked by the GPU tests below where a GPU exists")
    _, model = routed_pair("triton", "cpu", torch.float32)
    ids = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        _, _, step = prefill_static(model, ids, mask, cache_argument(model))
        assert gatedlora_host_reads(lambda: model(**step)) == []


def test_host_read_recorder_sees_a_read_in_gatedlora_code():
    """The recorder is not blind: on the CPU the op checks a caller's gate values on the host (free there),
    a read in gatedlora's own code; a read inside torch itself is not blamed on the caller."""
    x, base = torch.randn(5, 8), torch.randn(5, 6)
    a, b, gate = torch.randn(4, 8), torch.randn(6, 4), torch.rand(5)
    reads = gatedlora_host_reads(lambda: gated_lora(x, base, a, b, 1.0, gate=gate, backend="torch"))
    assert reads and all(" at ops/args.py:" in read for read in reads), reads
    assert gatedlora_host_reads(lambda: torch.randn(3).sum().item()) == []


GPU_BACKENDS = [b for b in ("triton", "cuda") if b in available_backends()]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sync_checked_blocks(model):
    """Hooks that turn ``set_sync_debug_mode("error")`` on around each decoder block, where gatedlora's layers
    and routing run: transformers' own mask code before the blocks reads the mask on the host (5.17,
    ``fast_all``), which is not gatedlora's to fix. Returns the hook handles."""
    handles = []
    for block in model.get_base_model().model.layers:
        handles.append(block.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error")))
        handles.append(block.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"),
                                                   always_call=True))
    return handles


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_eager_decode_step_does_not_sync(backend):
    """No host sync inside the decoder blocks (gatedlora's layers and the routing hook) in an eager decode step."""
    base, model = routed_pair(backend, "cuda", torch.bfloat16)
    ids = torch.randint(3, 97, (4, 9), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        token = out.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, mask[:, :1]], 1)
        model(input_ids=token, attention_mask=step_mask, use_cache=True, **{cache_argument(model): cache})  # warm
        cache.crop(-1)
        torch.cuda.synchronize()
        handles = sync_checked_blocks(model)
        try:
            model(input_ids=token, attention_mask=step_mask, use_cache=True, **{cache_argument(model): cache})
        finally:
            torch.cuda.set_sync_debug_mode("default")
            for handle in handles:
                handle.remove()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_decode_step_captured_in_a_cuda_graph(backend):
    """The replay equals the eager step, also after other allocations: the capture keeps its inputs alive
    (small int64 blocks filled with out-of-vocabulary ids would take over freed input ids)."""
    base, model = routed_pair(backend, "cuda", torch.bfloat16)
    ids = torch.randint(3, 97, (4, 9), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        replay, logits = capture_decode_step(model, ids, mask, cache_argument(model))
        gc.collect()
        clutter = [torch.full((4, n), 10**9, dtype=torch.long, device="cuda") for n in range(1, 17) for _ in range(16)]
        _, _, step = prefill_static(model, ids, mask, cache_argument(model))
        eager = model(**step).logits
        replay()
        torch.cuda.synchronize()
        captured = logits.clone()
        del clutter
        with base.disable_adapter():  # the base model's own prefill: its next tokens are the closed sequences'
            _, _, base_step = prefill_static(base, ids, mask, cache_argument(base))
            plain = base(**base_step).logits
    # a replay may pick other library kernels than the eager step (cuBLAS under capture): close, not bitwise
    torch.testing.assert_close(captured.float(), eager.float(), rtol=2e-2, atol=2e-2)
    closed = ~PATTERN.bool().cuda()
    assert torch.equal(eager[closed], plain[closed])  # closed sequences: the base model, bit for bit


def test_every_provider_decodes_the_same_token():
    """The benchmarks' decode step feeds each model the prompt's last tokens, not its own argmax: two models
    that disagree on the next token (here the base and its adapter, with large LoRA weights) still step on
    the same input, so the check compares their logits on equal inputs."""
    from gatedlora.benchmarking.scenarios import decode_stepper

    base, _ = routed_pair("torch", "cpu", torch.float32)
    for name, param in base.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 3.0)  # make the adapter move the argmax
    ids = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    fed = []
    hook = base.get_input_embeddings().register_forward_hook(lambda module, args, out: fed.append(args[0].clone()))
    try:
        with torch.inference_mode():
            plain = base(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
            with base.disable_adapter():
                assert not torch.equal(plain, base(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1))
            fed.clear()
            decode_stepper("peft", base, ids, mask, cache_argument(base), graphs=False, notes=[])()
            with base.disable_adapter():
                decode_stepper("base", base, ids, mask, cache_argument(base), graphs=False, notes=[])()
            _, step_ids, _ = prefill_static(base, ids, mask, cache_argument(base))
    finally:
        hook.remove()
    steps = [t for t in fed if t.shape == (4, 1)]
    assert len(steps) == 2 and all(torch.equal(t, ids[:, -1:]) for t in steps)
    assert torch.equal(step_ids, ids[:, -1:])
