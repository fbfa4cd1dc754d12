"""PRISM in one pass: train a router, then generate() a batch in which each prompt takes its own route.

The task here is made up: prompts that end in token 7 should go to the adapter. On a real model
the labels say where the adapter answers better (``gatedlora train-router`` does the same from a
JSONL file).

    python examples/prism_generate.py
"""
import torch

from gatedlora import GatedLoraConfig, force_gate, get_router, patch_model, train_router
from tiny_llama import left_padded, prompts, tiny_peft_model

MARKER = 7
# the adapter covers the layers after the router's tap layer (block 0), as PRISM trains it
model = patch_model(tiny_peft_model(first_layer=1), GatedLoraConfig(gate="sequence", router_layer=0))

train = prompts(300, seed=1)
labels = [i % 3 == 0 for i in range(len(train))]
train = [p[:-1] + [MARKER] if label else p for p, label in zip(train, labels)]
result = train_router(model, train, [int(v) for v in labels], epochs=60, progress=False)
print(result.summary())

# a mixed batch: prompts 0 and 2 end in the marker, 1 and 3 do not
batch_prompts = prompts(4, seed=2)
for i in (0, 2):
    batch_prompts[i] = batch_prompts[i][:-1] + [MARKER]
batch = left_padded(batch_prompts)
with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    routes = get_router(model).last_decisions.tolist()
    with force_gate(model, 0.0):
        base_out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    with force_gate(model, 1.0):
        lora_out = model.generate(**batch, max_new_tokens=8, do_sample=False)

print("routes (True = adapter):", routes, "probabilities:", [round(p, 3) for p in
                                                              get_router(model).last_probabilities.tolist()])
assert routes == [True, False, True, False], routes
for i, adapter in enumerate(routes):
    # each sequence generated exactly what its route gives on its own: the adapter's or the base model's
    assert torch.equal(out[i], (lora_out if adapter else base_out)[i])
print("generate: every sequence followed its own route in one batched pass")
