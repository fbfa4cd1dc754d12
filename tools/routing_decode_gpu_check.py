"""GPU check of sequence routing at decode (needs a CUDA device; prints what it finds):
(a) an eager decode step under torch.cuda.set_sync_debug_mode("error"), so any host sync raises
with its stack; (b) CUDA-graph capture of a decode step with a StaticCache, replayed against the
eager step. Run from the repository root:

    GATEDLORA_BACKEND=triton PYTHONPATH=. python tools/routing_decode_gpu_check.py
"""
import inspect
import traceback

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from gatedlora import GatedLoraConfig, get_router, patch_model
from gatedlora.call_state import output_cache

print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
dev, dtype = torch.device("cuda"), torch.bfloat16
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"


class Pattern(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)

    def forward(self, h):
        return self.proj(h).squeeze(-1) * 0 + torch.tensor([0.9, 0.1, 0.8, 0.2], device=h.device, dtype=h.dtype)


torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                     attn_implementation="eager")
model = LlamaForCausalLM(config).to(dev, dtype).eval()
patch_model(model, GatedLoraConfig(gate="sequence", router_layer=0, router=Pattern(256).to(dev, dtype),
                                   target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
ids = torch.randint(3, 128, (4, 16), device=dev)
mask = torch.ones_like(ids)
step_mask = torch.cat([mask, mask[:, :1]], 1)

with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    print("prefill decisions", get_router(model).routes_of(cache).decisions.tolist())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: cache})
        print("(a) eager decode step (DynamicCache): no host sync")
    except Exception:
        print("(a) eager decode step synced:")
        traceback.print_exc(limit=-8)
    finally:
        torch.cuda.set_sync_debug_mode(0)

    def static_cache():
        try:
            sc = StaticCache(config=config, max_cache_len=64)
        except TypeError:
            sc = StaticCache(config=config, max_batch_size=4, max_cache_len=64, device=dev, dtype=dtype)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE: sc})
        return sc

    try:
        eager_cache, graph_cache, warm_cache = static_cache(), static_cache(), static_cache()
        eager = model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: eager_cache}).logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: warm_cache})
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(input_ids=token, attention_mask=step_mask, use_cache=True, **{CACHE: graph_cache}).logits
        graph.replay()
        torch.cuda.synchronize()
        print("(b) CUDA graph capture of a decode step (StaticCache): ok; replay vs eager max |diff| =",
              float((captured.float() - eager.float()).abs().max()))
    except Exception:
        print("(b) CUDA graph capture failed:")
        traceback.print_exc(limit=-10)
