"""``SaveGatedLoraCallback``: gates and router in every ``transformers.Trainer`` checkpoint.

The Trainer saves a PEFT model's checkpoints with PEFT's ``save_pretrained``, which writes the LoRA weights
only: trained gates and a trained router would be missing from them, and a run resumed from one would apply
the saved optimizer state to fresh gates. Likewise ``load_best_model_at_end`` reloads the best checkpoint's
LoRA weights only: the callback then loads its gates and router, which stayed as the last step left them.
"""
from __future__ import annotations

import os
import warnings

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

from .io import CONFIG_NAME, holds_save, load_pretrained, save_pretrained


class SaveGatedLoraCallback(TrainerCallback):
    """Writes ``gatedlora.save_pretrained`` files (gates, router, config) into each checkpoint folder, beside
    the Trainer's. ``Trainer(..., callbacks=[SaveGatedLoraCallback()])``. To resume from ``checkpoint``:
    ``gatedlora.load_pretrained(model, checkpoint)``, then ``trainer.train(resume_from_checkpoint=checkpoint)``.
    Every process calls ``save_pretrained`` (a collective under FSDP2); the main one writes. With
    ``load_best_model_at_end``, the best checkpoint's gates and router are loaded at the end of training, after
    the Trainer has loaded its LoRA weights."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A resumed run (the Trainer restored the LoRA weights and the optimizer only): warn where the gates and
        # router are not those of the output folder's checkpoint at this step. The callback is not told which
        # checkpoint the run resumed from, so it only warns, and says nothing where that folder has no save.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not (state.global_step and model is not None and os.path.exists(os.path.join(folder, CONFIG_NAME))):
            return control
        try:
            restored = holds_save(model, folder)
        except (OSError, ValueError) as err:  # (a check that only warns never stops the training)
            warnings.warn(f"SaveGatedLoraCallback: could not compare the gates with the save in {folder}: {err}",
                          stacklevel=2)
            return control
        if not restored:
            warnings.warn(f"SaveGatedLoraCallback: training resumes at step {state.global_step}, but the gates and "
                          f"router are not those saved in {folder}: the Trainer restores the LoRA weights and the "
                          "optimizer only, so the saved optimizer state now steps other gates. Call "
                          "gatedlora.load_pretrained(model, checkpoint) before trainer.train(resume_from_checkpoint="
                          "checkpoint)", stacklevel=2)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # a folder the Trainer has just written: files of an earlier run at this step are replaced, as its own are
        save_pretrained(model, folder, is_main_process=state.is_world_process_zero, overwrite=True)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        best = state.best_model_checkpoint
        if not args.load_best_model_at_end or best is None or model is None:
            return control
        if hasattr(model, "peft_config") and not any(
                os.path.exists(os.path.join(best, name)) for name in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)):
            # the Trainer loads a PEFT model's best adapter from these files only (PEFT saves an adapter not named
            # "default" in a subfolder): loading the gates alone would pair them with the last step's LoRA
            warnings.warn(f"SaveGatedLoraCallback: the Trainer found no LoRA weights at the top of the best checkpoint "
                          f"{best} (PEFT saves an adapter not named 'default' in a subfolder) and kept the last "
                          "step's; the gates and router are kept from the last step too. To load the best: "
                          "model.load_adapter(path, adapter_name=name) and gatedlora.load_pretrained(model, "
                          f"{best!r})", stacklevel=2)
        elif os.path.exists(os.path.join(best, CONFIG_NAME)):
            load_pretrained(model, best)
        else:
            warnings.warn(f"SaveGatedLoraCallback: the best checkpoint {best} has no gatedlora files (saved without "
                          "this callback): the gates and router stay as the last step left them", stacklevel=2)
        return control
