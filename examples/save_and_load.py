"""Save trained gates beside a PEFT adapter, and load them back into a fresh model.

    python examples/save_and_load.py [DIRECTORY]
"""
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

import gatedlora
from gatedlora import patch_model
from tiny_llama import left_padded, prompts, tiny_llama, tiny_peft_model

directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gatedlora-example-"))
if directory.exists() and any(directory.iterdir()):  # before PEFT's save_pretrained, which would overwrite its files
    sys.exit(f"{directory} is not empty: give a new directory (this example does not replace an existing save)")
model = tiny_peft_model()
model.save_pretrained(directory)  # PEFT's own files: adapter_config.json, adapter_model.safetensors
patch_model(model)  # token gates: g = sigmoid(w . x + b) per token and layer
gen = torch.Generator().manual_seed(0)
with torch.no_grad():  # stand-in for trained gates: each opens for some tokens and not others
    for name, param in model.named_parameters():
        if name.endswith(("gate_weight", "gate_bias")):
            param.copy_(torch.randn(param.shape, generator=gen))
gatedlora.save_pretrained(model, directory)  # gatedlora_config.json, gatedlora_model.safetensors
print("saved:", sorted(p.name for p in directory.iterdir()))

batch = left_padded(prompts(6, seed=3))
with torch.no_grad():
    want = model(**batch).logits

fresh = PeftModel.from_pretrained(tiny_llama(), directory).eval()  # the adapter, as PEFT loads it
gatedlora.load_pretrained(fresh, directory)  # patches it and fills the gates
with torch.no_grad():
    assert torch.equal(fresh(**batch).logits, want)
print("loaded: the same logits, bit for bit")

try:  # an existing save is never replaced unless asked
    gatedlora.save_pretrained(model, directory)
except FileExistsError:
    print("an existing save is kept unless overwrite=True")
gatedlora.save_pretrained(model, directory, overwrite=True)
