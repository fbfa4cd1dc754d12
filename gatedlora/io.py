"""save_pretrained / load_pretrained: gate and router parameters (safetensors) and the config (JSON).

The two files sit next to a PEFT adapter saved by PEFT's own ``save_pretrained`` and use other
names (``gatedlora_config.json``, ``gatedlora_model.safetensors``), so neither overwrites the
other. LoRA weights are stored here only for fresh adapters (a PEFT model saves its own).

A save cannot tear. The config is the commit record: it names the SHA-256 of the weights file
it belongs to. A save writes the new weights under a pending name, then the new config under a
temporary name, commits by renaming the config into place (one atomic ``os.replace``), and
only then renames the weights into place. Whatever point a failure or a kill stops it at, the
directory loads as the old save or as the new one: before the commit the old config still names
the old weights; after it the new config names the pending weights, which the loader finds by
their checksum and the next save moves into place. A failed save removes what it wrote (or
rolls its commit back). Loading checks the checksum, dtypes, finiteness, every key and shape
before it changes anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as serialize_safetensors
from torch import nn

from .config import GatedLoraConfig
from .routing import PrismMultiRouter, PrismRouter, prism_two_class_router
from .patching import (ROUTER_ATTRIBUTE, gated_layers, is_patched, patch_model, patch_state, peft_lora_layers,
                       unpatch_model)

CONFIG_NAME = "gatedlora_config.json"
WEIGHTS_NAME = "gatedlora_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksum, every config field recorded
# Fields that describe a fresh adapter; a PEFT adapter's own rank and alpha are recorded under "adapter".
# (target_modules is not one of them: on a PEFT model it says which LoRA layers are gated, and a load must
# gate the same ones.)
FRESH_ADAPTER_FIELDS = ("r", "lora_alpha", "lora_dropout")
# How the model runs here, not what was saved: chosen again at load.
RUNTIME_FIELDS = ("backend", "base_mode")
TEMP_PREFIX = ".gatedlora-"
# The names a save writes under TEMP_PREFIX (pending weights, the config before its commit): the only entries an
# interrupted save's cleanup removes; anything else so named is the user's
TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"([0-9a-f]{32}\.safetensors|[0-9a-f]{16}\.json)")
# Routers that patch_model builds itself (no router=... needed to load their parameters)
DEFAULT_ROUTERS = (None, "PrismRouter", "PrismMultiRouter")
REBUILT_ROUTERS = DEFAULT_ROUTERS + ("PrismTwoClassRouter",)  # built from a save's tensors (saved_router_module)
ROUTER_PREFIX = f"{ROUTER_ATTRIBUTE}."  # the router's tensors in a gatedlora save


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


def _warn_of_settings_not_saved(model: nn.Module, config: GatedLoraConfig) -> None:
    """Warn where a token-gated layer's ``threshold`` or ``hard``, set on the layer after patching, differs from the
    config's: the save records the config's, so a load would give every layer that one and decide differently."""
    differing = [f"{name} (threshold={layer.threshold}, hard={layer.hard})" for name, layer in gated_layers(model)
                 if layer.gate_mode == "token" and (layer.threshold, layer.hard) != (config.threshold, config.hard)]
    if differing:
        warnings.warn(f"save_pretrained: {len(differing)} token-gated layers were set to a threshold or hardness "
                      f"other than the config's (threshold={config.threshold}, hard={config.hard}), which the save "
                      f"records and a load gives every layer: {', '.join(differing[:4])}"
                      f"{' ...' if len(differing) > 4 else ''}. Patch with GatedLoraConfig(threshold=..., hard=...) "
                      "to save them", stacklevel=3)


def _adapter_record(model: nn.Module) -> dict:
    """The adapter's name, real rank and alpha (alpha = scaling * r): one value each, or one per layer where they
    differ. With several adapters, rank, alpha and the layers that hold it per adapter under ``"adapters"``."""
    layers = sorted(gated_layers(model))
    record: dict = {"fresh": patch_state(model).fresh}
    if patch_state(model).config.adapters is None:
        names = {layer.adapter_name for _, layer in layers}
        record["name"] = names.pop() if len(names) == 1 else {name: layer.adapter_name for name, layer in layers}
        record.update(_rank_and_alpha({name: (layer.rank, layer.scaling) for name, layer in layers}))
        return record
    record["adapters"] = {}
    for adapter in patch_state(model).config.adapters:
        held = {name: (layer.ranks()[adapter], layer.scalings[layer.adapter_names.index(adapter)])
                for name, layer in layers if adapter in layer.adapter_names}
        # the layers too: two adapters of one rank and alpha on different layers, loaded under each other's
        # names, must not pass for the saved ones (the router would send each route to the other adapter)
        record["adapters"][adapter] = {**_rank_and_alpha(held), "layers": sorted(held)}
    return record


def _rank_and_alpha(layers: dict[str, tuple[int, float]]) -> dict:
    """{"r": ..., "lora_alpha": ...} from each layer's (rank, scaling): one value where every layer agrees."""
    record = {}
    for key, values in (("r", {n: r for n, (r, _) in layers.items()}),
                        ("lora_alpha", {n: s * r for n, (r, s) in layers.items()})):
        distinct = set(values.values())
        record[key] = distinct.pop() if len(distinct) == 1 else values
    return record


def model_type(config) -> str | None:
    """The model type a Transformers config names (``config.model_type``: "llama", "qwen2", ...), None for no config
    or none named."""
    kind = getattr(config, "model_type", None)
    return kind if isinstance(kind, str) and kind else None


def check_model_type(meta: dict, config, source: Path, caller: str) -> None:
    """Gates and a router are trained on one model's hidden states: a save made on a model of another type (a Llama
    router onto a Qwen2 of the same width; ``config``: the loading model's Transformers config) is refused. Saves
    from before the type was recorded are not checked."""
    saved, kind = meta.get("model_type"), model_type(config)
    if saved is not None and kind is not None and saved != kind:
        raise ValueError(f"{caller}: {source} was saved from a {saved!r} model, this is a {kind!r} model: gates and "
                         "a router trained on one model's hidden states do not carry over to another")


def _config_record(model: nn.Module, config: GatedLoraConfig, fresh: bool) -> dict:
    skipped = RUNTIME_FIELDS + (() if fresh else FRESH_ADAPTER_FIELDS)
    record = {k: v for k, v in config.to_dict().items() if k not in skipped}
    router = getattr(model, ROUTER_ATTRIBUTE, None)
    if router is not None and type(router.router).__name__ != saved_router_class(record):
        # a router set after patching (get_router(model).router = ...): the save names the one it holds
        record["router"] = type(router.router).__name__
    return record


def _pending_weights_path(directory: Path, sha256: str) -> Path:
    """Where a save keeps its weights between its commit and their rename into place."""
    return directory / f"{TEMP_PREFIX}{sha256[:32]}.safetensors"


def _write_new_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (mode 0666 less the umask: 0644, as PEFT's adapter_config.json) and flush it
    to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _finish_interrupted_save(directory: Path) -> None:
    """Move a committed save's pending weights into place, then remove what interrupted saves left behind."""
    try:
        meta = _read_meta(directory)
    except (FileNotFoundError, ValueError):
        meta = None
    sha256 = (meta or {}).get("weights_sha256")
    if sha256:
        pending = _pending_weights_path(directory, sha256)
        if pending.is_file() and _sha256_of(pending.read_bytes()) == sha256:
            os.replace(pending, directory / WEIGHTS_NAME)
            _fsync_directory(directory)
    _remove_quietly(*(entry for entry in directory.glob(f"{TEMP_PREFIX}*")
                      if TEMP_NAME.fullmatch(entry.name) and entry.is_file()))


def _sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_save_target(path: str | os.PathLike, overwrite: bool, caller: str) -> Path:
    """The directory a save writes to, refused (before any work) where the save would fail: a file at ``path``, or
    gatedlora files already there without ``overwrite=True``."""
    if not isinstance(overwrite, bool):  # ("no" would replace a save)
        raise TypeError(f"{caller}: overwrite must be True or False, got {overwrite!r}")
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{caller}: {directory} is a file; a save is a directory (it holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}): nothing was written")
    ancestor = directory.parent
    while not ancestor.exists():  # (ends: "." and "/" exist)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{caller}: cannot create the directory {directory}: {ancestor} is a file; nothing "
                                 "was written")
    existing = [str(directory / name) for name in (CONFIG_NAME, WEIGHTS_NAME) if (directory / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{caller}: {existing} already exist; pass overwrite=True to replace them")
    return directory


def save_pretrained(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                    is_main_process: bool = True) -> None:
    """Write ``gatedlora_config.json`` and ``gatedlora_model.safetensors`` into directory ``path``.

    Existing gatedlora files are kept unless ``overwrite=True``; other files (a PEFT adapter) are
    never touched. A save that fails or is killed part way leaves the previous save loadable.
    Distributed training: only the process with ``is_main_process`` writes. A model sharded by FSDP2
    (``fully_shard``) is gathered first, which is a collective: call this on every rank with
    ``is_main_process=(rank == 0)``. Under DDP every rank holds the whole model, so rank 0 alone may call it.
    """
    state = patch_state(model)
    tensors = {k: (v.full_tensor() if _is_sharded(v) else v).detach().to("cpu").reshape(_file_shape(k, v))
               .contiguous() for k, v in _saved_tensors(model).items()}
    if not is_main_process:
        return
    # what load_pretrained refuses is not written (a diverged training would leave a save that cannot load)
    broken = [key for key, t in tensors.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if broken:
        raise ValueError(f"save_pretrained: {broken[:4]} hold NaN or infinite values, which load_pretrained "
                         "refuses: nothing was written")
    directory = check_save_target(path, overwrite, "save_pretrained")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a parent directory should be, no permission: say which directory
        raise type(err)(err.errno, f"save_pretrained: cannot create the directory {directory}: {err.strerror}") \
            from None
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    _warn_of_settings_not_saved(model, state.config)
    payload = serialize_safetensors(tensors, metadata={"format": "pt"})
    sha256 = _sha256_of(payload)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": _config_record(model, state.config, state.fresh),
        "adapter": _adapter_record(model),
        "fresh_adapter": state.fresh,
        "layers": sorted(name for name, _ in gated_layers(model)),
        "weights_sha256": sha256,
        "model_type": model_type(getattr(model, "config", None)),
    }
    _finish_interrupted_save(directory)
    previous_config = config_path.read_bytes() if config_path.is_file() else None
    pending = _pending_weights_path(directory, sha256)
    config_tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}.json"
    committed = renamed = False
    try:
        _write_new_file(pending, payload)
        _write_new_file(config_tmp, (json.dumps(meta, indent=2) + "\n").encode())
        os.replace(config_tmp, config_path)  # the commit
        committed = True
        os.replace(pending, weights_path)
        renamed = True
        _fsync_directory(directory)
    except BaseException:
        if committed and (renamed or not pending.exists()):
            # the new save is whole on disk: its weights are in place (only the directory's fsync failed), or
            # another save's _finish_interrupted_save put them there; undoing the commit would tear it
            keep_pending = True
        else:
            # after the commit the pending weights belong to the save on disk unless the commit is undone
            keep_pending = committed and not _roll_back_commit(directory, config_path, previous_config)
        _remove_quietly(config_tmp, *(() if keep_pending else (pending,)))
        raise


def _roll_back_commit(directory: Path, config_path: Path, previous_config: bytes | None) -> bool:
    """Put the previous config back after a failed rename of the weights (the old weights are still in
    place); True if done. If not, the committed config names the pending weights, which load finds."""
    restore = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}.json"
    try:
        if previous_config is None:
            config_path.unlink()
        else:
            _write_new_file(restore, previous_config)
            os.replace(restore, config_path)
        return True
    except OSError:
        return False
    finally:
        _remove_quietly(restore)


# The fields of gatedlora_config.json and the JSON types each may take (null: absent in older saves).
META_FIELDS = {"config": (dict,), "adapter": (dict, type(None)), "fresh_adapter": (bool, type(None)),
               "layers": (list, type(None)), "weights_sha256": (str, type(None)), "model_type": (str, type(None))}
JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true or false", type(None): "null"}


class _NewerFormat(Exception):
    """A save whose format_version is above FORMAT_VERSION: written by a later gatedlora, not corrupt."""

    def __init__(self, version: int) -> None:
        super().__init__(version)
        self.version = version


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "no such directory"
        raise FileNotFoundError(f"load_pretrained: {directory}: {what}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        hint = (f"it holds a PEFT adapter ({PEFT_CONFIG_NAME}) but no gatedlora save: load the adapter with "
                f"PeftModel.from_pretrained(model, {str(directory)!r}), then gatedlora.patch_model(model) for fresh "
                "gates, or load gates saved by gatedlora.save_pretrained from their own directory"
                if (directory / PEFT_CONFIG_NAME).is_file() else "not a gatedlora save directory")
        raise FileNotFoundError(f"load_pretrained: {config_path} not found: {hint}")
    try:
        meta = json.loads(config_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        version = meta.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise _NewerFormat(version)
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unknown format_version {meta.get('format_version')!r}")
        for field, kinds in META_FIELDS.items():  # what a save writes, and what reading it relies on
            if not isinstance(meta.get(field), kinds):
                raise ValueError(f"{field!r} must be {' or '.join(JSON_NAMES[k] for k in kinds)}, got "
                                 f"{json.dumps(meta.get(field))[:80]}")
        if version != 1 and meta.get("weights_sha256") is None:  # format 2 writes it in every save
            raise ValueError(f"'weights_sha256' is missing, which every save of format_version {version} records "
                             "(the config was edited or damaged); its weights cannot be checked")
        layers, adapters = meta.get("layers"), (meta.get("adapter") or {}).get("adapters")
        inner = [("layers", layers, "a list of layer names",
                  layers is None or all(isinstance(name, str) for name in layers)),
                 ("adapter.adapters", adapters, "null or an object of one object per adapter",
                  adapters is None or isinstance(adapters, dict)
                  and all(isinstance(record, dict) for record in adapters.values()))]
        for field, value, expected, valid in inner:
            if not valid:
                raise ValueError(f"{field!r} must be {expected}, got {json.dumps(value)[:80]}")
    except _NewerFormat as newer:
        raise ValueError(f"load_pretrained: {config_path} was written by a newer gatedlora (format_version "
                         f"{newer.version}; this one reads {', '.join(map(str, READABLE_VERSIONS))}): upgrade "
                         "gatedlora to load it") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"load_pretrained: {config_path} is corrupt or not a gatedlora config: {err}") from None
    # format 1 recorded how the saving machine ran (backend="cuda" fails at a CPU model's first forward)
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in RUNTIME_FIELDS}
    return meta


def _read_weights(directory: Path, meta: dict) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors the config names (verified by checksum where it records one) and the file they came from."""
    weights_path = directory / WEIGHTS_NAME
    sha256 = meta.get("weights_sha256")
    candidates = [weights_path] + ([_pending_weights_path(directory, sha256)] if sha256 else [])
    data = None
    for candidate in candidates:
        if candidate.is_file():
            data = candidate.read_bytes()
            if sha256 is None or _sha256_of(data) == sha256:
                weights_path = candidate
                break
    else:
        if data is None:
            raise FileNotFoundError(f"load_pretrained: {weights_path} not found")
        raise ValueError(f"load_pretrained: {weights_path} is corrupt: its SHA-256 is not the {sha256[:16]}... "
                         f"that {CONFIG_NAME} records (a damaged file, or weights from another save)")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"load_pretrained: {weights_path} is corrupt or not a safetensors file: {err}") from None
    for key, tensor in tensors.items():
        # a router's buffers may be integers (BatchNorm's num_batches_tracked); _copy_checked matches the kind
        router_integer = key.startswith(ROUTER_ATTRIBUTE + ".") and not tensor.is_floating_point() \
            and not tensor.is_complex() and tensor.dtype != torch.bool
        if not (tensor.is_floating_point() or router_integer):
            raise ValueError(f"load_pretrained: {key} in {weights_path} has dtype {tensor.dtype}; gate, router "
                             "and LoRA parameters are floating point (router buffers may be integers)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"load_pretrained: {key} in {weights_path} holds NaN or infinite values")
    return tensors, weights_path


# A read that finds weights other than its config names is tried again this often: a save into the same
# directory may have committed between reading the config and reading the weights (a reviewer saw 5 of 300
# concurrent reads fail, the intact files called corrupt); a damaged file fails every time.
READ_ATTEMPTS = 3


def _read_save(directory: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """(config record, checked tensors, the file they came from) of one save: the old one or the new one where a
    save runs meanwhile, never a mix."""
    for _ in range(READ_ATTEMPTS - 1):
        meta = _read_meta(directory)
        try:
            return (meta, *_read_weights(directory, meta))
        except (FileNotFoundError, ValueError):
            continue
    meta = _read_meta(directory)
    return (meta, *_read_weights(directory, meta))


def read_saved(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The saved record (``"config"``: the fields ``GatedLoraConfig.to_dict`` wrote; ``"model_type"``: the saved
    model's, or None) and tensors (checked, on the CPU) of a gatedlora save."""
    meta, tensors, _ = _read_save(Path(path))
    return meta, tensors


def holds_save(model: nn.Module, path: str | os.PathLike) -> bool:
    """Whether ``model``'s gates, router and fresh LoRA weights are, value for value, those saved at ``path``
    (True where they cannot be compared here: tensors sharded over processes)."""
    _, saved = read_saved(path)
    live = _saved_tensors(model)
    if set(live) != set(saved) or any(saved[key].numel() != t.numel() for key, t in live.items()):
        return False
    if any(_is_sharded(t) for t in live.values()):
        return True
    return all(torch.equal(saved[key].reshape(t.shape).to(t.device, t.dtype), t.detach()) for key, t in live.items())


def load_pretrained(model: nn.Module, path: str | os.PathLike, router: nn.Module | None = None) -> nn.Module:
    """Load gates, router and config saved by ``save_pretrained`` into ``model`` (patching it if needed).

    ``router``: the router module to fill when the save used a custom router class (the built-in ones,
    ``prism_two_class_router``'s included, are rebuilt from the save). Nothing in the model changes unless
    every tensor matches in name and shape. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be an nn.Module, got {type(model).__name__}")
    if router is not None and not isinstance(router, nn.Module):
        raise TypeError(f"load_pretrained: router must be an nn.Module or None, got {type(router).__name__}")
    route = getattr(model, ROUTER_ATTRIBUTE, None)
    if router is not None and is_patched(model) and (route is None or router is not route.router):
        # (it was ignored): the patched model's router is the one filled, and a token-gated model has none
        raise ValueError("load_pretrained: router= builds the router of an unpatched model, but the model is "
                         "patched and has its own; leave router= out, or unpatch_model(model) first")
    directory = Path(path)
    meta, loaded, weights_path = _read_save(directory)
    check_model_type(meta, getattr(model, "config", None), directory, "load_pretrained")

    saved = dict(meta["config"])
    if "target_modules" not in saved and "layers" in meta:
        # a PEFT model's save from before target_modules was recorded for it: gate exactly the layers it gated
        saved["target_modules"] = meta["layers"]
    if saved.get("router") not in DEFAULT_ROUTERS and router is None and not is_patched(model):
        router = saved_router_module(saved.get("router"), router_state(loaded))
        if router is None:
            raise ValueError(f"load_pretrained: the save used a custom router ({saved['router']}); "
                             f"{router_to_pass(saved['router'], router_state(loaded))}")
    # a PEFT model's LoRA: its own LoRA layers, or patched, the LoRA layers patch_model gated
    holds_peft_lora = not patch_state(model).fresh if is_patched(model) else bool(peft_lora_layers(model))
    router_only = _router_only(meta, loaded) and holds_peft_lora
    if router_only:
        # the router of `gatedlora train-router` without --adapter (PRISM's step 1) onto the LoRA trained since
        # (step 2): the PEFT model's own LoRA layers after router_layer are gated (or already were, by the
        # patch_model call before this load), whatever the save's fresh adapter covered
        saved = {k: v for k, v in saved.items() if k not in FRESH_ADAPTER_FIELDS + ("target_modules",)}
        loaded = {k: v for k, v in loaded.items() if k.startswith(ROUTER_ATTRIBUTE + ".")}
    config = config_of_save(saved, directory, "load_pretrained", router if saved.get("gate") == "sequence" else None)
    patched_here = not is_patched(model)
    if patched_here:
        patch_model(model, config)
    try:
        current, expected = patch_state(model).config.to_dict(), config.to_dict()
        differing = {k: (current[k], expected[k]) for k in ("gate", "router_layer", "threshold", "hard", "adapters")
                     if current[k] != expected[k]}
        custom_router = False
        # a router of another class may hold the same parameters for another function (a token-gated model holds
        # no router: its differing gate is the error)
        if config.gate == "sequence" and "gate" not in differing:
            held = getattr(model, ROUTER_ATTRIBUTE).router
            if not fills_saved_router(held, saved):
                differing["router"] = (type(held).__name__, saved_router_class(saved))
                if patched_here:
                    raise ValueError(f"load_pretrained: the save's router is a {differing['router'][1]}, router= a "
                                     f"{differing['router'][0]}: pass a module of the saved class")
                # (a router load_pretrained rebuilds from the save needs no router=)
                custom_router = saved.get("router") not in REBUILT_ROUTERS
        if differing:
            raise ValueError(f"load_pretrained: the model is patched with a different config (model vs saved): "
                             f"{differing}; unpatch_model(model) first or load into an unpatched model"
                             f"{' (passing router=<module of the saved class>)' if custom_router else ''}")
        targets = _saved_tensors(model)
        if router_only:
            targets = {k: v for k, v in targets.items() if k.startswith(ROUTER_ATTRIBUTE + ".")}
        else:
            _check_gated_layers(model, meta, directory / CONFIG_NAME)
            _check_adapter(model, meta, directory / CONFIG_NAME)
        _copy_checked(targets, loaded, weights_path)
    except Exception:
        if patched_here:
            unpatch_model(model)
        raise
    return model


def config_of_save(record: dict, directory: Path, caller: str, router: nn.Module | None = None) -> GatedLoraConfig:
    """``GatedLoraConfig.from_dict(record)`` of the save in ``directory``, its errors naming the file (a field of
    the wrong type, or one this gatedlora does not know, said only "GatedLoraConfig: ...")."""
    try:
        return GatedLoraConfig.from_dict(record, router=router)
    except ValueError as err:
        raise ValueError(f"{caller}: {Path(directory) / CONFIG_NAME}: {err}") from None


def router_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The router's tensors of a save (``gate_router.*``), by their names in the router."""
    return {key[len(ROUTER_PREFIX):]: value for key, value in tensors.items() if key.startswith(ROUTER_PREFIX)}


def saved_router_module(class_name: str | None, state: dict[str, torch.Tensor]) -> nn.Module | None:
    """A fresh module of the router class a save names, shaped by its tensors ``state`` (``router_state``), not
    yet filled: ``PrismRouter`` and ``PrismMultiRouter`` (the defaults) and ``PrismTwoClassRouter``
    (``prism_two_class_router``). None for any other class, a ``TwoClassRouter`` around its user's net included:
    only its user can build one."""
    if class_name in DEFAULT_ROUTERS:
        hidden = state["net.0.weight"].shape[1]
        sizes = tuple(state[f"net.{i}.weight"].shape[0] for i in range(0, len(state), 2))
        # (a default router is saved as None: one output is PrismRouter's, one per route PrismMultiRouter's)
        return (PrismRouter(hidden, widths=sizes[:-1], start_open=False) if sizes[-1] == 1
                else PrismMultiRouter(hidden, sizes[-1], widths=sizes[:-1], start_route=None))
    if class_name == "PrismTwoClassRouter" and set(state) == {"net.0.weight", "net.0.bias", "net.3.weight",
                                                             "net.3.bias"}:
        # in the dtype it was saved in (a module its user passes is filled as saved too)
        first = state["net.0.weight"]
        return prism_two_class_router(first.shape[1], width=first.shape[0]).to(first.dtype)
    return None


def saved_router_class(config: dict) -> str:
    """The class of router a saved config names: its own, or where it names none, the default patch_model builds."""
    return config.get("router") or (PrismRouter if not config.get("adapters") else PrismMultiRouter).__name__


# The class a router of gatedlora's was saved as before it had its own (prism_two_class_router's).
_EARLIER_NAMES = {"PrismTwoClassRouter": "TwoClassRouter"}


def fills_saved_router(router: nn.Module, config: dict) -> bool:
    """Whether ``router`` may be filled from a save with ``config``: the saved class is its class, or the name an
    earlier save gave it (a ``PrismTwoClassRouter`` fills a ``TwoClassRouter`` save, whose net it was). A router of
    another class, a subclass included, may hold the same parameters for another function."""
    name, saved = type(router).__name__, saved_router_class(config)
    return saved == name or saved == _EARLIER_NAMES.get(name)


def router_to_pass(class_name: str | None, state: dict[str, torch.Tensor]) -> str:
    """How to give a loader the router a save names, when it cannot build it (``saved_router_module``); ``state``:
    the saved router's tensors (``router_state``)."""
    hint = "pass router=<module of that class> so its parameters can be loaded"
    earlier = saved_router_module("PrismTwoClassRouter", state) if class_name == "TwoClassRouter" else None
    if earlier is not None:  # shaped as PRISM's router, which saves named TwoClassRouter before it had a class
        hidden, width = earlier.net[0].in_features, earlier.net[0].out_features
        hint += (f"; only if it is PRISM's router, saved from prism_two_class_router before that had a class of its "
                 f"own (PrismTwoClassRouter), pass router=gatedlora.prism_two_class_router({hidden}, width={width}) "
                 f"(gatedlora route: --prism-two-class); a TwoClassRouter around your own net takes that net")
    return hint


def _router_only(meta: dict, loaded: dict[str, torch.Tensor]) -> bool:
    """Whether a save holds a router and no adapter: one-adapter sequence gates on a fresh adapter whose every
    lora_B is zero (`gatedlora train-router` without --adapter, PRISM's router trained before its LoRA). The
    router reads the blocks before any adapter, so it serves whatever LoRA the model holds after them, and
    the save's untrained adapter adds nothing that loading elsewhere would lose."""
    config = meta.get("config", {})
    return (config.get("gate") == "sequence" and not config.get("adapters") and bool(meta.get("fresh_adapter"))
            and not any(t.any() for k, t in loaded.items() if k.endswith("lora_B.weight")))


def _mismatch(source: Path, here: set[str], saved: set[str], what: str = "") -> ValueError:
    """The error for names the model has and the save lacks (missing) or the other way round (unexpected)."""
    missing, unexpected = sorted(here - saved), sorted(saved - here)
    return ValueError(f"load_pretrained: {source} does not match the model: missing {missing[:6]}"
                      f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                      f"{' ...' if len(unexpected) > 6 else ''}{what}")


def _check_gated_layers(model: nn.Module, meta: dict, source: Path) -> None:
    """The model must gate the layers the save gated: a layer gated on one side and left to PEFT (always on) on
    the other computes something else, even where no tensor of the save belongs to it (sequence gates)."""
    adapters = (meta.get("adapter") or {}).get("adapters")
    if isinstance(adapters, dict) and all("layers" in record for record in adapters.values()):
        # several adapters: _check_adapter compares the layers that hold each one; a layer that holds none of them
        # (another PEFT adapter's) is the base layer on every route, whether it is gated or not
        return
    saved = meta.get("layers")
    here = {name for name, _ in gated_layers(model)}
    if saved is not None and here != set(saved):
        raise _mismatch(source, here, set(saved), f" (gated layers: the save gated {len(saved)}, the model "
                        f"{len(here)}); patch with the save's GatedLoraConfig(target_modules=...), or load into an "
                        "unpatched model of the saved structure")


def _same(a, b) -> bool:
    """Equal records, floats to rounding (alpha is recorded as scaling * r)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _check_adapter(model: nn.Module, meta: dict, source: Path) -> None:
    """Gates and a router are trained for one adapter: the model's must be the saved one (name, r, lora_alpha; with
    several adapters each one's, and the layers that hold it)."""
    saved, here = meta.get("adapter") or {}, _adapter_record(model)
    differing = _record_differences(here, saved, ("name", "r", "lora_alpha", "adapters"))
    if differing:
        listed = "; ".join(differing[:_DIFFERENCES_NAMED])
        more = f"; and {len(differing) - _DIFFERENCES_NAMED} more" if len(differing) > _DIFFERENCES_NAMED else ""
        raise ValueError(f"load_pretrained: {source} was saved with another adapter: {listed}{more}. "
                         "Gates and a router trained for one adapter do not carry over to another: load the adapter "
                         "the save was made with, under its name (PeftModel.from_pretrained(model, path, "
                         "adapter_name=name)), or patch the model afresh and train new gates")


_DIFFERENCES_NAMED = 6  # (a whole record in the message was 89,543 characters for 4 adapters on 32 blocks)


def _record_differences(here: dict, saved: dict, keys: Sequence[str], owner: str = "") -> list[str]:
    """What differs between the model's adapter record and the saved one (``_adapter_record``), field by field,
    each as "<owner>field: <model's> in the model, <saved> saved". Only the fields ``keys`` that the save holds are
    compared: a save from before the layers were recorded per adapter is compared on what it recorded."""
    found = []
    for key in keys:
        if key not in saved or _same(here.get(key), saved[key]):
            continue
        mine, theirs = here.get(key), saved[key]
        if key == "adapters" and not (isinstance(mine, dict) and isinstance(theirs, dict)):
            found.append(f"adapters: {list(mine or ())} in the model, {list(theirs or ())} saved")
        elif key == "adapters":
            for name in [*theirs, *(n for n in mine if n not in theirs)]:
                if name not in mine or name not in theirs:
                    found.append(f"adapter {name!r}: {'saved, not in the model' if name in theirs else 'not saved'}")
                else:
                    found += _record_differences(mine[name], theirs[name], ("r", "lora_alpha", "layers"),
                                                 f"adapter {name!r}: ")
        elif key == "layers" and isinstance(mine, list) and isinstance(theirs, list):
            lacking, others = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
            found.append(f"{owner}layers: {len(lacking)} saved layers not in the model {lacking[:2]}, "
                         f"{len(others)} in the model not saved {others[:2]}")
        elif isinstance(mine, dict) and isinstance(theirs, dict):  # one value per layer
            layers = [n for n in theirs if n not in mine or not _same(mine[n], theirs[n])]
            layers += [n for n in mine if n not in theirs]
            first = layers[0]
            found.append(f"{owner}{key} differs on {len(layers)} layer{'s' * (len(layers) > 1)}, {first}: "
                         f"{mine.get(first)!r} in the model, {theirs.get(first)!r} saved")
        else:
            found.append(f"{owner}{key}: {_per_layer_or_value(mine)} in the model, {_per_layer_or_value(theirs)} saved")
    return found


def _per_layer_or_value(value) -> str:
    """A record field for a message: its value, or for one value per layer the distinct values."""
    if isinstance(value, dict):
        return f"one per layer ({sorted(set(map(repr, value.values())))[:4]})"
    return repr(value)


def _copy_checked(targets: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], source: Path) -> None:
    if set(targets) != set(loaded):
        raise _mismatch(source, set(targets), set(loaded))
    for key, target in targets.items():
        if loaded[key].is_floating_point() != target.is_floating_point():
            raise ValueError(f"load_pretrained: {key} has dtype {loaded[key].dtype} in {source}, the model's is "
                             f"{target.dtype}: an integer tensor loads only into an integer buffer")
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
