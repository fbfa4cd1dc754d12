"""save_pretrained / load_pretrained: gate and router parameters (safetensors) and the config (JSON).

The two files sit next to a PEFT adapter saved by PEFT's own ``save_pretrained`` and use other
names (``gatedlora_config.json``, ``gatedlora_model.safetensors``), so neither overwrites the
other. LoRA weights are stored here only for fresh adapters (a PEFT model saves its own).
Loading validates every key and shape before it changes anything.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import GatedLoraConfig
from .patching import ROUTER_ATTRIBUTE, gated_layers, is_patched, patch_model, patch_state, unpatch_model

CONFIG_NAME = "gatedlora_config.json"
WEIGHTS_NAME = "gatedlora_model.safetensors"
FORMAT_VERSION = 1


def _saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that a save stores, by key: token gates, fresh LoRA weights, router parameters."""
    state = patch_state(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in gated_layers(model):
        if layer.gate_mode == "token":
            tensors[f"{name}.gate_weight"] = layer.gate_weight
            tensors[f"{name}.gate_bias"] = layer.gate_bias
        if state.fresh:
            tensors[f"{name}.lora_A.weight"] = layer.lora_A[layer.adapter_name].weight
            tensors[f"{name}.lora_B.weight"] = layer.lora_B[layer.adapter_name].weight
    router = getattr(model, ROUTER_ATTRIBUTE, None)
    if router is not None:
        for key, value in router.router.state_dict(keep_vars=True).items():
            tensors[f"{ROUTER_ATTRIBUTE}.{key}"] = value
    return tensors


def _file_shape(key: str, tensor: torch.Tensor) -> torch.Size:
    """A token gate's bias is a [1] parameter (FSDP2 refuses 0-dim ones) and 0-dim in the file, as format 1 has it."""
    return torch.Size([]) if key.endswith(".gate_bias") else tensor.shape


def _is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor: a parameter of a model sharded by FSDP2's ``fully_shard`` (or tensor parallelism)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then move it over ``path``: no half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                    is_main_process: bool = True) -> None:
    """Write ``gatedlora_config.json`` and ``gatedlora_model.safetensors`` into directory ``path``.

    Existing gatedlora files are kept unless ``overwrite=True``; other files (a PEFT adapter) are never touched.
    Distributed training: only the process with ``is_main_process`` writes. A model sharded by FSDP2
    (``fully_shard``) is gathered first, which is a collective: call this on every rank with
    ``is_main_process=(rank == 0)``. Under DDP every rank holds the whole model, so rank 0 alone may call it.
    """
    state = patch_state(model)
    tensors = {k: (v.full_tensor() if _is_sharded(v) else v).detach().to("cpu").reshape(_file_shape(k, v))
               .contiguous() for k, v in _saved_tensors(model).items()}
    if not is_main_process:
        return
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    targets = (directory / CONFIG_NAME, directory / WEIGHTS_NAME)
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"save_pretrained: {existing} already exist; pass overwrite=True to replace them")
    meta = {
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "fresh_adapter": state.fresh,
        "layers": sorted(name for name, _ in gated_layers(model)),
    }
    write_atomically(targets[1], lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomically(targets[0], lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


def _read_meta(directory: Path) -> dict:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"load_pretrained: {config_path} not found: not a gatedlora save directory")
    try:
        meta = json.loads(config_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION or not isinstance(meta.get("config"), dict):
            raise ValueError(f"unknown format_version {meta.get('format_version')!r}")
    except (json.JSONDecodeError, ValueError, AttributeError) as err:
        raise ValueError(f"load_pretrained: {config_path} is corrupt or not a gatedlora config: {err}") from None
    return meta


def read_saved(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The saved config (as ``GatedLoraConfig.to_dict`` wrote it) and tensors (on the CPU) of a gatedlora save."""
    directory = Path(path)
    meta = _read_meta(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"load_pretrained: {weights_path} not found")
    try:
        loaded = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_pretrained: {weights_path} is corrupt or not a safetensors file: {err}") from None
    return meta["config"], loaded


def load_pretrained(model: nn.Module, path: str | os.PathLike, router: nn.Module | None = None) -> nn.Module:
    """Load gates, router and config saved by ``save_pretrained`` into ``model`` (patching it if needed).

    ``router``: the router module to fill when the save used a custom router class. Nothing in the
    model changes unless every tensor matches in name and shape. Returns the model.
    """
    saved, loaded = read_saved(path)
    weights_path = Path(path) / WEIGHTS_NAME
    if saved.get("router") not in (None, "PrismRouter") and router is None and not is_patched(model):
        raise ValueError(f"load_pretrained: the save used a custom router ({saved['router']}); pass router=<module "
                         "of that class> so its parameters can be loaded")
    config = GatedLoraConfig.from_dict(saved, router=router if saved.get("gate") == "sequence" else None)
    patched_here = not is_patched(model)
    if patched_here:
        patch_model(model, config)
    try:
        current = patch_state(model).config.to_dict()
        differing = {k: (current[k], saved.get(k)) for k in ("gate", "router_layer", "threshold", "hard")
                     if current[k] != saved.get(k)}
        if differing:
            raise ValueError(f"load_pretrained: the model is patched with a different config (model vs saved): "
                             f"{differing}; unpatch_model(model) first or load into an unpatched model")
        _copy_checked(_saved_tensors(model), loaded, weights_path)
    except Exception:
        if patched_here:
            unpatch_model(model)
        raise
    return model


def _copy_checked(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: Path) -> None:
    missing = sorted(set(targets) - set(loaded))
    unexpected = sorted(set(loaded) - set(targets))
    if missing or unexpected:
        raise ValueError(f"load_pretrained: {source} does not match the model: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for key, target in targets.items():
        if loaded[key].shape != _file_shape(key, target):
            raise ValueError(f"load_pretrained: {key} has shape {list(loaded[key].shape)} in {source}, "
                             f"the model expects {list(_file_shape(key, target))}")
    with torch.no_grad():
        for key, target in targets.items():
            value = loaded[key].reshape(target.shape)
            if _is_sharded(target):  # every rank read the whole file: each keeps its own shard, no communication
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                          src_data_rank=None)
            target.copy_(value)
