"""``SaveGatedLoraCallback``: gates and router in every ``transformers.Trainer`` checkpoint.

The Trainer saves a PEFT model's checkpoints with PEFT's ``save_pretrained``, which writes the LoRA weights
only: trained gates and a trained router would be missing from them, and a run resumed from one would apply
the saved optimizer state to fresh gates.
"""
from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .io import save_pretrained


class SaveGatedLoraCallback(TrainerCallback):
    """Writes ``gatedlora.save_pretrained`` files (gates, router, config) into each checkpoint folder, beside
    the Trainer's. ``Trainer(..., callbacks=[SaveGatedLoraCallback()])``. To resume from ``checkpoint``:
    ``gatedlora.load_pretrained(model, checkpoint)``, then ``trainer.train(resume_from_checkpoint=checkpoint)``.
    Every process calls ``save_pretrained`` (a collective under FSDP2); the main one writes."""

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # a folder the Trainer has just written: files of an earlier run at this step are replaced, as its own are
        save_pretrained(model, folder, is_main_process=state.is_world_process_zero, overwrite=True)
        return control
