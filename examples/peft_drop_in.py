"""Drop-in on a PEFT model: patch, then the base model and plain LoRA are one context away.

    python examples/peft_drop_in.py
"""
import torch

import gatedlora
from gatedlora import force_gate, patch_model
from tiny_llama import left_padded, prompts, tiny_peft_model

model = tiny_peft_model()
batch = left_padded(prompts(4))
with torch.no_grad():
    with model.disable_adapter():
        peft_base = model(**batch).logits
    peft_lora = model(**batch).logits

    patch_model(model)  # token gates that start open: the same outputs as PEFT
    torch.testing.assert_close(model(**batch).logits, peft_lora)
    with force_gate(model, 0.0):  # every gate closed: the base model, bit for bit
        assert torch.equal(model(**batch).logits, peft_base)
    with model.disable_adapter():  # PEFT's own switch does the same on a patched model
        assert torch.equal(model(**batch).logits, peft_base)
    with force_gate(model, 1.0):  # every gate open: plain LoRA
        torch.testing.assert_close(model(**batch).logits, peft_lora)

gatedlora.unpatch_model(model)  # the PEFT modules back, state_dict unchanged
print("drop-in: patched outputs match PEFT; closed gates give the base model bitwise")
