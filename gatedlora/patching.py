"""patch_model / unpatch_model / force_gate / get_router: swapping GatedLoRALinear into a model.

Layer dispatch, PEFT style: the first matching rule wins, and an unsupported LoRA layer gets
an error that lists what is supported.
"""
from __future__ import annotations

import contextlib
import copy
import re
import threading
import warnings
import weakref
from dataclasses import dataclass, field, replace
from typing import Iterator

from torch import nn

from .call_state import forcing
from .config import GatedLoraConfig, check_router_layer
from .layers import GatedLoRALinear, linear_features
from .ops.args import is_real
from .ops.multi_args import check_one_dtype
from .routed_layer import RoutedLoRALinear
from .routing import (PrismMultiRouter, PrismRouter, SequenceRouter, install_routing, patched_model_of,
                      remove_routing)

ROUTER_ATTRIBUTE = "gate_router"  # no "lora_" in the name: PEFT's save_pretrained keeps keys with "lora_"
STATE_ATTRIBUTE = "_gatedlora_patch"
SUPPORTED = ("peft.tuners.lora.Linear on nn.Linear or transformers Conv1D (PEFT models)",
             "nn.Linear and transformers Conv1D (fresh adapters via target_modules)")


@dataclass
class PatchState:
    """What patch_model changed, so that unpatch_model can restore it exactly."""

    config: GatedLoraConfig
    originals: dict[str, nn.Module] = field(default_factory=dict)
    fresh: bool = False
    blocks_path: str | None = None
    # model.disable_adapter() blocks open at once (any thread), and the flags of the LoRA layers left to PEFT from
    # before the first: PEFT's switch is one flag per layer, set by the first block and restored by the last
    peft_switch_depth: int = 0
    peft_switch_flags: list = field(default_factory=list)
    # the parameters patch_model froze (fresh adapters on a plain model, as get_peft_model does): unfrozen again
    frozen: list = field(default_factory=list)


_PEFT_SWITCH = threading.Lock()  # guards every PatchState's peft_switch_* (entered and left in any order)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the ModuleList whose length is the text decoder's depth (``_decoder_depth``;
    for an encoder-decoder, a list under its "decoder"), else of one block type (hybrid models such as Jamba or
    Zamba2 mix attention and Mamba blocks in theirs), the largest such."""
    config = getattr(model, "config", None)
    depth, part = _decoder_depth(config)
    text = type(text_config(config)) if config is not None else None
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            one_type = len({type(m) for m in module}) == 1
            matches = len(module) == depth and (part is None or any(part in c for c in name.split(".")))
            if one_type or matches:
                # of the lists as deep as the text decoder, the text model's own (Blip-2's Q-Former can be as deep
                # as its language model, and larger)
                in_text_model = matches and type(_owner_config(model, name)) is text
                size = sum(p.numel() for p in module.parameters())
                candidates.append(((matches, in_text_model, one_type, size), name, module))
    if not candidates:
        raise ValueError(f"gate='sequence': found no list of transformer blocks in {type(model).__name__}")
    # a list inside a block of a list as deep as the decoder is part of a block (Zamba2's shared block's adapter
    # lists: one per hybrid block, as many as the blocks of a route-only model cut to its first hybrid block)
    outer = [n for (matches, *_), n, _ in candidates if matches]
    candidates = [c for c in candidates if not any(c[1].startswith(n + ".") for n in outer)]
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def block_linear_names(model: nn.Module) -> list[str]:
    """The last name parts of the layers in the model's transformer blocks (``find_blocks``) that can take a LoRA
    adapter (``linear_features``: nn.Linear, Transformers' Conv1D), sorted: ``target_modules`` for fresh adapters
    where none are named. Llama's seven projections, as PRISM trains them; GPT-2's c_attn, c_proj and c_fc; Phi-3's
    fused qkv_proj and gate_up_proj (a mixture-of-experts block's router layer too, where it is a plain nn.Linear).
    Every block is read: a hybrid model's blocks hold different layers. Left out: the numbered children of a
    container (Zamba2's nn.Sequential adapters: "0" matched every block's index, and patching refused the blocks),
    and nn.Linear subclasses with a forward of their own (Llama 4's and PhiMoE's MoE routers return tuples, which
    no LoRA layer takes)."""
    _, blocks = find_blocks(model)
    names = set()
    for name, module in blocks.named_modules():
        if name.rsplit(".", 1)[-1].isdigit() or (isinstance(module, nn.Linear)
                                                  and type(module).forward is not nn.Linear.forward):
            continue
        try:
            linear_features(module)
        except TypeError:
            continue
        names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _owner_config(model: nn.Module, name: str):
    """The config of the innermost module above ``name`` that has one (None if none has)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        config = getattr(model.get_submodule(".".join(parts[:depth])), "config", None)
        if config is not None:
            return config
    return None


def text_config(config):
    """The config of the model's text part: ``config`` itself, or for a composite model whose config has no
    ``num_hidden_layers`` (a vision-language model) its text config."""
    if getattr(config, "num_hidden_layers", None) is None and callable(getattr(config, "get_text_config", None)):
        return config.get_text_config(decoder=True)
    return config


def _decoder_depth(config) -> tuple[int | None, str | None]:
    """How many blocks the model's text decoder has, and the name part of the path to its list: the text config's
    ``num_hidden_layers``, except for an encoder-decoder (where that is the encoder's depth) its decoder's, in a
    list under "decoder" (an RNNT speech model counts its prediction network there, with no such list);
    (None, None) when unknown."""
    if config is None:
        return None, None
    text = text_config(config)
    if getattr(text, "is_encoder_decoder", False):
        depth = getattr(text, "decoder_layers", None) or getattr(text, "num_decoder_layers", None)
        if isinstance(depth, int):
            return depth, "decoder"
    depth = getattr(text, "num_hidden_layers", None)
    if not isinstance(depth, int):
        return None, None
    # a composite encoder-decoder whose text config is its decoder's (t5gemma2: the encoder is as deep)
    return depth, "decoder" if text is not config and getattr(config, "is_encoder_decoder", False) else None


def block_index(name: str, blocks_path: str) -> int | None:
    """Index of the block that holds module ``name``, or None when it is outside the blocks."""
    prefix = blocks_path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def _backbone(model: nn.Module, blocks_path: str) -> nn.Module:
    """The innermost transformers PreTrainedModel above the blocks (it receives the 2D attention mask)."""
    from transformers import PreTrainedModel

    parts = blocks_path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, PreTrainedModel):
            return module
    return model.get_submodule(".".join(parts[:-1]))


def _generator(model: nn.Module, blocks_path: str) -> nn.Module | None:
    """The innermost transformers GenerationMixin above the blocks (its generate runs the prefill), or None."""
    from transformers import GenerationMixin

    parts = blocks_path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, GenerationMixin):
            return module
    return None


def peft_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every PEFT LoRA layer in the model (none without PEFT installed)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _left_to_peft(layer: nn.Module, routed: list[str] | None) -> bool:
    """Whether a PEFT LoRA layer is left as it is: it holds none of the ``routed`` adapters, and none of those it
    holds is active, so PEFT runs it as its base layer (an embedding holding only an adapter that is not routed)."""
    held = _held_adapters(layer)
    return not held & set(routed or ()) and not held & set(layer.active_adapters)


def _held_adapters(layer: nn.Module) -> set[str]:
    """The adapters a PEFT LoRA layer holds (PEFT's Embedding keeps them in dicts of its own)."""
    return set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))


def _check_peft_layer(name: str, layer: nn.Module, routed: list[str] | None = None) -> str | list[str]:
    """The active adapter of a supported PEFT LoRA layer, or with ``routed`` (several adapters, one router) the
    ones of ``routed`` it holds, in that order; raises for anything else."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear):
        held = _held_adapters(layer)
        active = [a for a in layer.active_adapters if a in held] if routed and not held & set(routed) else []
        hint = (f" (it holds none of the routed adapters, but PEFT would run its active adapter {active} there on "
                "every sequence: model.set_adapter(<a routed adapter>) first)" if active else "")
        raise TypeError(f"gatedlora cannot patch {name} ({type(layer).__module__}.{type(layer).__name__}); "
                        f"supported: {'; '.join(SUPPORTED)}{hint}")
    try:
        linear_features(layer.base_layer)
    except TypeError as err:
        raise TypeError(f"gatedlora cannot patch {name}: {err}") from None
    if layer.merged:
        raise ValueError(f"gatedlora cannot patch {name}: its adapter is merged into the base weight; "
                         "call model.unmerge_adapter() first")
    if layer.disable_adapters:
        # PEFT runs it as the base layer; gatedlora's layers have no such switch, so patching would turn it back on
        raise ValueError(f"gatedlora cannot patch {name}: its adapter is disabled (model.disable_adapter_layers()), "
                         "and patching would turn it back on. Call model.enable_adapter_layers() first; on the patched "
                         "model, `with model.disable_adapter():` or `with gatedlora.force_gate(model, 0.0):` gives "
                         "the base model")
    if routed is None:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            raise ValueError(f"gatedlora patches exactly one active LoRA adapter per layer; {name} has {active}")
        held = active
    else:
        held = [a for a in routed if a in layer.lora_A]
        try:
            check_one_dtype([layer.lora_A[a].weight for a in held], [layer.lora_B[a].weight for a in held],
                            f"gatedlora cannot patch {name}", names=held)
        except TypeError as err:
            # PEFT makes adapters fp32 on a half-precision model unless autocast_adapter_dtype=False
            raise TypeError(f"{err}. Load every adapter the same way (PEFT casts an adapter to fp32 unless "
                            "load_adapter(..., autocast_adapter_dtype=False)), or cast them to one dtype before "
                            "patching: for m in model.modules(): if isinstance(m, peft.tuners.lora.LoraLayer): "
                            "m.lora_A.float(); m.lora_B.float()") from None
    for adapter in held:
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is not None or getattr(layer, "use_dora", {}).get(adapter):
            found = "use_dora" if variant is None else type(variant).__name__  # (DoraLinearVariant, ALoraLinear...)
            raise TypeError(f"gatedlora cannot patch {name}: LoRA variants such as DoRA are not supported (adapter "
                            f"{adapter!r} uses {found}); supported: {'; '.join(SUPPORTED)}")
        if getattr(layer, "lora_bias", {}).get(adapter):
            raise TypeError(f"gatedlora cannot patch {name}: lora_bias=True is not supported (adapter {adapter!r})")
    return held if routed is not None else held[0]


# PEFT initialisations that replace the base weights by a residual (the adapter holds the rest)
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _warn_of_rewritten_base(model: nn.Module) -> None:
    """Warn where an adapter was initialised by rewriting the base weights: closed gates and the base route then
    run the residual weights PEFT left, not the model as loaded (as PEFT's own disable_adapter does). Every
    adapter the model holds, gated or not: the base weights are shared."""
    configs = getattr(model, "peft_config", {})
    for name in sorted(configs):
        init = getattr(configs[name], "init_lora_weights", None)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            warnings.warn(f"gatedlora: adapter {name!r} was initialised with init_lora_weights={init!r}, which "
                          "replaced the base weights by their residual: closed gates and sequences routed to the "
                          "base model run those residual weights, not the original base model. To route to the "
                          "original, convert the adapter as PEFT documents (save_pretrained(..., "
                          "path_initial_model_for_weight_conversion=...)) and load it onto the original base model",
                          UserWarning, stacklevel=3)


def _check_routed_adapters(model: nn.Module, held: dict[str, list[str]], routed: list[str]) -> None:
    """Every adapter the router chooses among must be in the model."""
    missing = [a for a in routed if not any(a in names for names in held.values())]
    if missing:
        loaded = sorted({a for _, layer in peft_lora_layers(model) for a in _held_adapters(layer)})
        raise ValueError(f"GatedLoraConfig.adapters: {missing} not found in the LoRA layers of {type(model).__name__}, "
                         f"which hold {loaded}; load each with model.load_adapter(path, adapter_name=name)")


def _auxiliary_modules(model: nn.Module, gated: set[str]) -> list[tuple[str, str, list[str]]]:
    """(name, PEFT option, adapters) of each PEFT module wrapper (``modules_to_save``, ``trainable_token_indices``)
    that holds one of the adapters ``gated`` or one active in it."""
    from peft.utils.other import AuxiliaryTrainingWrapper, TrainableTokensWrapper

    found = []
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            running = module._get_available_adapters() & (gated | set(module.active_adapters))
            if running:
                option = "trainable_token_indices" if isinstance(module, TrainableTokensWrapper) else "modules_to_save"
                found.append((name, option, sorted(running)))
    return found


def _check_no_auxiliary_modules(model: nn.Module, gated: set[str]) -> None:
    """PEFT's modules_to_save and trainable_token_indices swap whole modules (a trained head, embedding rows) in for
    every input. gatedlora gates LoRA layers only, so where it promises the base model (closed gates,
    force_gate(model, 0.0), model.disable_adapter(), a sequence routed to the base model) those modules would
    still run their trained copies: refuse rather than compute something else."""
    found = _auxiliary_modules(model, gated)
    if not found:
        return
    listed = "; ".join(f"{name} ({option}, adapter {', '.join(map(repr, adapters))})"
                       for name, option, adapters in found[:4]) + (" ..." if len(found) > 4 else "")
    name, option, adapters = found[0]
    example = (f"`model.{name} = model.{name}.modules_to_save[{adapters[0]!r}]`" if option == "modules_to_save"
               else f"`model.{name}.token_adapter.merge(); model.{name} = model.{name}.token_adapter.base_layer`")
    raise ValueError(
        f"gatedlora cannot patch {type(model).__name__}: besides its LoRA layers, the PEFT adapter replaces whole "
        f"modules for every input: {listed}. gatedlora gates LoRA layers only, so closed gates, force_gate(model, "
        "0.0), model.disable_adapter() and sequences routed to the base model would still run those trained modules "
        "instead of the base model's. To go on, make them part of the base model before patching, by putting each "
        f"trained module in place of PEFT's wrapper (here {example}): gatedlora's base model is then the model with "
        "them as trained, and PEFT's save_pretrained no longer writes them (it saves the adapter's own modules only): "
        "keep them with the base model (its save_pretrained, or torch.save of their state_dict). Or drop them (an "
        "adapter trained without modules_to_save and trainable_token_indices)")


def _other_tuner_layers(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """(name, class, adapters) of each layer of another PEFT method than LoRA (LoHa, LoKr, IA3, ... in a
    ``PeftMixedModel`` or a PeftModel of that method) with an active adapter that it holds."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = {id(m) for w in model.modules() if isinstance(w, AuxiliaryTrainingWrapper) for m in w.modules()}
    found = []
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer) and not isinstance(layer, LoraLayer) and id(layer) not in wrapped:
            held = {a for field in layer.adapter_layer_names for a in getattr(getattr(layer, field, None), "keys",
                                                                                   tuple)()}
            running = [a for a in layer.active_adapters if a in held]
            if running:
                found.append((name, f"{type(layer).__module__}.{type(layer).__qualname__}", running))
    return found


def _check_no_other_tuner_layers(model: nn.Module) -> None:
    """Layers of other PEFT methods run their adapters on every input; gatedlora gates LoRA layers only, so where
    it promises the base model they would still run: refuse rather than compute something else."""
    found = _other_tuner_layers(model)
    if not found:
        return
    listed = "; ".join(f"{name} ({kind}, adapter {', '.join(map(repr, adapters))})"
                       for name, kind, adapters in found[:4]) + (" ..." if len(found) > 4 else "")
    raise ValueError(
        f"gatedlora cannot patch {type(model).__name__}: it holds layers of PEFT methods other than LoRA whose "
        f"adapters are active: {listed}. gatedlora gates LoRA layers only, so closed gates, force_gate(model, 0.0), "
        "model.disable_adapter() and sequences routed to the base model would still run those adapters instead of "
        "the base model. Deactivate them (model.set_adapter(<the LoRA adapter>): PEFT then runs those layers as their "
        "base layers), or make them part of the base model: merge them into it before adding the LoRA adapter")


def _fresh_targets(model: nn.Module, targets: list[str] | str) -> list[tuple[str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        try:
            linear_features(module)
        except TypeError:
            raise TypeError(f"gatedlora cannot add an adapter to {name} ({type(module).__name__}); "
                            f"supported: {'; '.join(SUPPORTED)}") from None
        found.append((name, module))
    return found


def _linear_names_hint(model: nn.Module, fresh: bool) -> str:
    """The names target_modules can match in ``model``: its linear layers' (or LoRA layers') last name parts."""
    if fresh:
        names = []
        for name, module in model.named_modules():
            try:
                linear_features(module)
            except TypeError:
                continue
            names.append(name)
    else:
        names = [name for name, _ in peft_lora_layers(model)]
    kind = "linear layers" if fresh else "LoRA layers"
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names if name})
    return f"the model's {kind} are named {suffixes}" if suffixes else f"the model has no {kind}"


def patch_model(model: nn.Module, config: GatedLoraConfig | None = None, *, freeze_base: bool = True) -> nn.Module:
    """Swap GatedLoRALinear in for LoRA layers (PEFT model) or add fresh gated adapters (plain model).

    With ``config.adapters`` (several PEFT adapters, one router) every LoRA layer becomes a ``RoutedLoRALinear``
    holding those of the adapters it has (the others, and PEFT's notion of the active adapter, no longer
    apply): the router picks one route per sequence.

    ``freeze_base``: on a plain model, every parameter that was there before the patch stops
    requiring gradients, as ``get_peft_model`` does, so only the adapters, gates and router
    train; ``False`` leaves them as they are. A PEFT model's base is PEFT's business (already frozen).
    Returns the same model object. Patching again with the same (or no) config is harmless.
    """
    check_config_argument("patch_model", model, config)
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):  # (its save_pretrained is reached through __getattr__: it failed half-patched)
        raise TypeError(f"patch_model: {type(model).__name__} is the tuner inside a PeftModel (peft_model.base_model); "
                        "pass the PeftModel itself, whose save_pretrained, disable_adapter and merge methods gatedlora "
                        "keeps working or refusing as they should")
    state: PatchState | None = getattr(model, STATE_ATTRIBUTE, None)
    if state is not None:
        if config is None or config.same_behaviour(state.config):
            return model
        raise ValueError("model is already patched with a different GatedLoraConfig; call unpatch_model(model) first")
    # the patch's own copy: get_router(model).threshold = t changes it, never the caller's object
    config = replace(config) if config is not None else GatedLoraConfig()
    peft_layers = peft_lora_layers(model)
    fresh = not peft_layers
    if not fresh and config.target_modules is not None:
        matched = [(n, m) for n, m in peft_layers if _matches(n, config.target_modules)]
        left = [n for n, _ in peft_layers if not _matches(n, config.target_modules)]
        if config.adapters is not None and left:
            raise ValueError(
                f"GatedLoraConfig(adapters=...) routes every PEFT LoRA layer (one left to PEFT would apply its active "
                f"adapter to every sequence, whatever its route), but target_modules={config.target_modules!r} "
                f"leaves out {left[:4]}{' ...' if len(left) > 4 else ''}: drop target_modules")
        peft_layers = matched
    if fresh and config.adapters is not None:
        raise ValueError(f"GatedLoraConfig.adapters names PEFT adapters, and {type(model).__name__} has no PEFT LoRA "
                         "layers: load them first (PeftModel.from_pretrained(model, path, adapter_name=name), then "
                         "model.load_adapter(path, adapter_name=name) for each other one)")
    if fresh:
        if config.target_modules is None:
            raise ValueError(f"nothing to patch in {type(model).__name__}: it has no PEFT LoRA layers; pass "
                             "GatedLoraConfig(target_modules=[...]) to add fresh gated adapters")
        targets = _fresh_targets(model, config.target_modules)
    else:
        targets = [(name, layer) for name, layer in peft_layers if not _left_to_peft(layer, config.adapters)]
    if not targets:
        raise ValueError(f"nothing to patch in {type(model).__name__}: no module matches "
                         f"target_modules={config.target_modules!r}; {_linear_names_hint(model, fresh)}")
    adapters = {} if fresh else {name: _check_peft_layer(name, layer, config.adapters) for name, layer in targets}
    if not fresh:
        _check_no_auxiliary_modules(model, set(config.adapters or adapters.values()))
    _check_no_other_tuner_layers(model)
    if not fresh:
        _warn_of_rewritten_base(model)
    if config.adapters is not None:
        _check_routed_adapters(model, adapters, config.adapters)
    state = PatchState(config=config, fresh=fresh)
    if fresh and freeze_base:
        state.frozen = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)  # before the adapters, gates and router exist: those stay trainable

    route = None
    if config.gate == "sequence":
        try:
            targets, route = _prepare_sequence_routing(model, config, targets, fresh, state, adapters)
        except BaseException:
            for parameter in state.frozen:  # a refused patch leaves the model as it was
                parameter.requires_grad_(True)
            raise

    options = dict(gate=config.gate, threshold=config.threshold, hard=config.hard, backend=config.backend,
                   base_mode=config.base_mode,
                   route=route, straight_through=config.straight_through,
                   train_hard=None if config.train_gate is None else config.train_gate == "hard")
    for name, module in targets:
        if fresh:
            new = GatedLoRALinear.fresh(module, config.r, config.lora_alpha, config.lora_dropout, **options)
        elif config.adapters is not None:
            new = RoutedLoRALinear.from_peft(module, config.adapters, route=route, backend=config.backend)
        else:
            new = GatedLoRALinear.from_peft(module, adapters[name], **options)
        # a module is built in training mode: the new layer (its gates, a fresh adapter's dropout) takes the mode
        # of the layer it replaces, so patching a model in eval mode does not turn dropout or soft gates on
        new.train(module.training)
        state.originals[name] = module
        _set_submodule(model, name, new)
    object.__setattr__(model, STATE_ATTRIBUTE, state)
    if not fresh and callable(getattr(model, "save_pretrained", None)):
        _keep_peft_save_working(model)
    if not fresh:
        _replace_peft_methods(model)
    return model


def check_config_argument(caller: str, model: object, config: object) -> None:
    """TypeError unless ``model`` is an nn.Module and ``config`` a GatedLoraConfig (or None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch nn.Module (a PEFT or Transformers model), "
                        f"got {type(model).__name__}")
    if config is not None and not isinstance(config, GatedLoraConfig):
        hint = f"; write GatedLoraConfig(**{config!r:.80})" if isinstance(config, dict) else ""
        raise TypeError(f"{caller}: config must be a gatedlora.GatedLoraConfig or None, got "
                        f"{type(config).__name__}{hint}")


@contextlib.contextmanager
def peft_view(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as PEFT built it, for PEFT methods that look for PEFT's layer types, without changing ``model``:
    forwards that other threads run meanwhile keep the gated layers (putting PEFT's layers back into the model
    for the call gave them PEFT's adapter on every sequence).

    The view shares everything (parameters, buffers, every other module) except the modules on the paths from
    the model to the gated layers: those are shallow copies, each with its own dict of children, PEFT's layers
    at the ends, and the root's without the router (not PEFT's: ``LoraConfig(bias="all")`` would save its
    biases). The gated layers hold PEFT's weight dicts, so weights a method changes or loads are the gated
    layers' too. After the call, attributes it set on a copy (PEFT's active adapter) are set on the module, and
    children it added or removed there likewise. Its ``train()``/``eval()`` calls on a copy are made again on the
    module, in order, so that they reach the gated layers (PEFT's ``load_adapter`` ends in ``eval()``, which also
    turns off a gated layer set to train on its own), and a training flag it set directly is set with ``train()``.
    """
    copies: dict[str, tuple[nn.Module, nn.Module, dict]] = {}  # path: (module, its copy, its attributes before)
    train_calls: list[tuple[str, bool]] = []  # (path, mode) of each train()/eval() call on a copy, in order

    def recording_train(twin: nn.Module, path: str):
        def train(mode: bool = True) -> nn.Module:
            train_calls.append((path, mode))
            return type(twin).train(twin, mode)
        return train

    def copy_of(path: str) -> nn.Module:
        if path not in copies:
            module = model.get_submodule(path)
            twin = type(module).__new__(type(module))  # no __init__, no __reduce__: the same attributes, shallowly
            twin.__dict__.update(module.__dict__)
            twin.__dict__["_modules"] = dict(module._modules)
            copies[path] = (module, twin, dict(module.__dict__))
            twin.__dict__["train"] = recording_train(twin, path)  # (eval() calls self.train(False))
            if path:
                parent, _, child = path.rpartition(".")
                copy_of(parent)._modules[child] = twin
        return copies[path][1]

    for name, original in patch_state(model).originals.items():
        parent, _, child = name.rpartition(".")
        copy_of(parent)._modules[child] = original
    view = copy_of("")
    hidden = {ROUTER_ATTRIBUTE} & view._modules.keys()
    for name in hidden:
        del view._modules[name]
    try:
        yield view
    finally:
        retrain = []
        called = {path for path, _ in train_calls}
        for path, (module, twin, before) in copies.items():
            for key, value in twin.__dict__.items():
                if key == "training":
                    if value != before["training"] and path not in called:
                        retrain.append((path, value))
                elif key not in ("_modules", "train") and before.get(key, _ABSENT) is not value:
                    module.__dict__[key] = value
            for key in before.keys() - twin.__dict__.keys():
                module.__dict__.pop(key, None)
            for child in module._modules.keys() - twin._modules.keys() - (hidden if twin is view else set()):
                del module._modules[child]
            for child in twin._modules.keys() - module._modules.keys():
                module._modules[child] = twin._modules[child]
        for path, mode in train_calls:
            copies[path][0].train(mode)
        for path, training in sorted(retrain, key=lambda item: item[0].count(".") + bool(item[0])):
            copies[path][0].train(training)  # outermost first, so that an inner module's own flag wins


_ABSENT = object()


class StandIn:
    """A method of one patched model, stored in its ``__dict__`` in place of PEFT's: ``model.name(...)`` calls
    ``function(model, ...)``. ``copy.deepcopy`` binds the copy's to the copied model (a closure over the model
    would stay with the original: a copy's ``save_pretrained`` wrote the original's weights). Pickling is refused
    with the way on: the stand-ins and the layers' routing state belong to this process.

    It holds the model weakly: the model holds it, and a strong reference made a cycle that kept a dropped model,
    every weight of it, alive until Python's cyclic collector ran (a review saw none run over 2,000 requests).
    ``held``: the model, held strongly, where nothing else would hold it (``__deepcopy__``)."""

    def __init__(self, function, model: nn.Module, held: nn.Module | None = None, **bound) -> None:
        self.function, self.bound, self.held = function, bound, held
        self.model_reference = weakref.ref(model)
        self.__name__ = getattr(function, "__name__", type(self).__name__)
        self.__doc__ = function.__doc__

    @property
    def model(self) -> nn.Module:
        return patched_model_of(self.model_reference, self.__name__)

    def __call__(self, *args, **kwargs):
        return self.function(self.model, *args, **self.bound, **kwargs)

    def __deepcopy__(self, memo: dict) -> StandIn:
        model = self.model
        if id(model) in memo:  # inside the model's deep copy: bound to the copy
            return StandIn(self.function, memo[id(model)], **self.bound)
        # a part copied on its own (the PEFT tuner, model.base_model): nothing else holds its copy of the model
        copied = copy.deepcopy(model, memo)
        return StandIn(self.function, copied, held=copied, **self.bound)

    def __reduce__(self):
        raise TypeError("a gatedlora-patched model cannot be pickled (torch.save(model), pickle, multiprocessing): "
                        "save it with model.save_pretrained(dir) (PEFT's files) and gatedlora.save_pretrained(model, "
                        "dir), then PeftModel.from_pretrained and gatedlora.load_pretrained; or call "
                        "gatedlora.unpatch_model(model) first")


def _peft_save_pretrained(model: nn.Module, *args, **kwargs):
    """PEFT's save_pretrained, on the model as PEFT built it. A state dict passed in (the Trainer gathers one under
    DeepSpeed or FSDP) loses gatedlora's own tensors, as the view does: with ``LoraConfig(bias="all")`` PEFT
    would save the router's and the token gates' biases with its own."""
    if isinstance(kwargs.get("state_dict"), dict):
        kwargs["state_dict"] = {k: v for k, v in kwargs["state_dict"].items() if not _gatedlora_key(k)}
    with peft_view(model) as view:
        return type(model).save_pretrained(view, *args, **kwargs)


def _gatedlora_key(key: str) -> bool:
    """Whether a state-dict key names a tensor of gatedlora's own: the router's, a token gate's."""
    return ROUTER_ATTRIBUTE in key.split(".") or key.endswith((".gate_weight", ".gate_bias"))


def _keep_peft_save_working(model: nn.Module) -> None:
    """PEFT's save_pretrained finds LoRA weights by visiting its own layer types; on a patched model it
    would find none and write an empty adapter over the user's. Save the model as PEFT built it (``peft_view``)."""
    stand_in = StandIn(_peft_save_pretrained, model)
    stand_in.__doc__ = type(model).save_pretrained.__doc__
    model.__dict__["save_pretrained"] = stand_in


def _refusal(method: str, reason: str):
    def refuse(model: nn.Module, *args, **kwargs):
        raise RuntimeError(f"{method}() on a gatedlora-patched model: {reason}")

    refuse.__name__ = method
    return refuse


MERGE_REFUSAL = ("merging folds the adapter into the base weights for every input, so the gates and the router "
                 "would be lost. To merge anyway (adapter always on): call gatedlora.unpatch_model(model), then "
                 "model.{method}(). For the base model alone use `with model.disable_adapter():`")
SWITCH_REFUSAL = ("PEFT's switch does not reach gatedlora's layers. Use `with model.disable_adapter():` or "
                  "`with gatedlora.force_gate(model, 0.0):` for the base model, and `with gatedlora.force_gate("
                  "model, 1.0):` for the adapter on every input")


@contextlib.contextmanager
def _disable_adapter(model: nn.Module) -> Iterator[None]:
    """The base model, bitwise, for the duration: every gate closed (gatedlora.force_gate(model, 0.0)) and, where
    GatedLoraConfig(target_modules=...) left some LoRA layers to PEFT, PEFT's own switch off on those, which
    would otherwise keep running their adapter. PEFT's switch is the layers' flag, so it holds for every thread:
    the first block open sets it and the last one to end restores it, whatever order blocks end in (a block that
    restored what it found would leave the flag set when an outer block ends before an inner one)."""
    state = patch_state(model)
    with force_gate(model, 0.0):
        with _PEFT_SWITCH:
            if state.peft_switch_depth == 0:
                left = [layer for _, layer in peft_lora_layers(model)]
                # the flag itself: PEFT's enable_adapters(True) would also make the adapter's weights require grad
                state.peft_switch_flags = [(layer, layer._disable_adapters) for layer in left]
                for layer in left:
                    layer._disable_adapters = True
            state.peft_switch_depth += 1
        try:
            yield
        finally:
            with _PEFT_SWITCH:
                state.peft_switch_depth -= 1
                if state.peft_switch_depth == 0:
                    for layer, flag in state.peft_switch_flags:
                        layer._disable_adapters = flag
                    state.peft_switch_flags = []


def _running_adapters(model: nn.Module) -> set[str]:
    """The adapters the patched layers run: the one each was patched with, or the routed ones."""
    return set(patch_state(model).config.adapters or (layer.adapter_name for _, layer in gated_layers(model)))


def _peft_method(model: nn.Module, owner: int, method: str, *args, **kwargs):
    """PEFT's own ``method`` of ``_peft_objects(model)[owner]``, run on the model as PEFT built it (``peft_view``):
    PEFT's layers share their weights (the LoRA ModuleDicts) with the gated layers, so what PEFT changes in them
    the gated layers see."""
    with peft_view(model) as view:
        target = _peft_objects(view)[owner]
        return getattr(type(target), method)(target, *args, **kwargs)


def _deferring(method: str):
    """A stand-in that runs PEFT's ``method`` on the view (``_peft_method``)."""
    def run(model: nn.Module, *args, owner: int = 0, **kwargs):
        return _peft_method(model, owner, method, *args, **kwargs)

    run.__name__ = method
    return run


PATCH_AGAIN = ("gatedlora.save_pretrained(model, dir) if the gates or router are trained, gatedlora.unpatch_model("
               "model), {step}, then patch_model(model, config) or gatedlora.load_pretrained(model, dir) again")


def _adapter_argument(args: tuple, kwargs: dict, position: int = 0) -> set[str] | None:
    """The adapter name(s) a PEFT method was called with (PEFT's ``adapter_name``, transformers' ``adapter_names``)."""
    names = args[position] if len(args) > position else kwargs.get("adapter_name", kwargs.get("adapter_names"))
    return None if names is None else {names} if isinstance(names, str) else set(names)


def _active_adapters(model: nn.Module, owner: int) -> set[str]:
    """The adapters PEFT has active on ``_peft_objects(model)[owner]``, read on the view (transformers' PEFT
    integration finds them by visiting PEFT's layers)."""
    with peft_view(model) as view:
        active = _peft_objects(view)[owner].active_adapters  # a property in PEFT, a method in transformers'
        return set(active() if callable(active) else active)


def _set_adapter(model: nn.Module, *args, owner: int = 0, **kwargs):
    """PEFT's set_adapter for the adapter already active (it sets which weights train), else a refusal: the
    gated layers keep the adapters they were patched with."""
    if _adapter_argument(args, kwargs) == _active_adapters(model, owner):
        return _peft_method(model, owner, "set_adapter", *args, **kwargs)
    routed = patch_state(model).config.adapters
    if routed:
        raise RuntimeError(
            f"set_adapter() on a gatedlora-patched model: its router chooses among {list(routed)} per sequence, "
            "and PEFT's switch does not reach the routed layers. To train some of them only: "
            "model.set_requires_grad([...]) (PEFT's method, on the patched model). To route among other adapters: "
            f"{PATCH_AGAIN.format(step='load or delete adapters with PEFT')}")
    raise RuntimeError(
        f"set_adapter() on a gatedlora-patched model: the gated layers run the adapters they were patched with "
        f"({sorted(_running_adapters(model))}), and PEFT's switch does not reach them. To run another adapter: "
        f"{PATCH_AGAIN.format(step='model.set_adapter(name)')}. To route each sequence among several adapters, "
        "patch with GatedLoraConfig(gate='sequence', adapters=[...])")


def _delete_adapter(model: nn.Module, *args, owner: int = 0, **kwargs):
    """PEFT's delete_adapter for an adapter nothing runs (its weights leave the shared ModuleDicts), else a
    refusal: the gated layers would keep running the weights PEFT no longer knows."""
    running = _running_adapters(model) | _active_adapters(model, owner)
    if not (_adapter_argument(args, kwargs) or set()) & running:
        return _peft_method(model, owner, "delete_adapter", *args, **kwargs)
    raise RuntimeError(
        f"delete_adapter() on a gatedlora-patched model: the patched model runs {sorted(running)}, and PEFT's "
        f"method does not reach the gated layers. To delete one: "
        f"{PATCH_AGAIN.format(step='model.delete_adapter(name)')}")


NEW_ADAPTER_REFUSAL = ("PEFT would wrap layers that gatedlora does not gate (they would run the new adapter on every "
                       "input) and cannot add it to the gated ones. Load every adapter before patching: {how}. "
                       "GatedLoraConfig(gate='sequence', adapters=[...]) routes among several")


def _load_adapter(model: nn.Module, *args, owner: int = 0, **kwargs):
    """PEFT's load_adapter into an adapter the model holds (new weights into the shared modules, as the Trainer
    does for its best checkpoint); a new adapter is refused."""
    names = _adapter_argument(args, kwargs, position=1) or {"default"}  # (transformers' default name)
    if names <= set(getattr(model, "peft_config", {})):
        return _peft_method(model, owner, "load_adapter", *args, **kwargs)
    raise RuntimeError(f"load_adapter() on a gatedlora-patched model: {sorted(names)} would be a new adapter. "
                       + NEW_ADAPTER_REFUSAL.format(how=PATCH_AGAIN.format(step="model.load_adapter(path, "
                                                                                "adapter_name=name)"))
                       + ". Loading new weights into an adapter the model holds (adapter_name=its name) works")


@contextlib.contextmanager
def _forward_hooks(model: nn.Module, *args, owner: int = 0, **kwargs) -> Iterator[None]:
    """PEFT's forward and generate enter this with their arguments. PEFT uses it only for ``adapter_names`` (a
    mixed batch) and ``alora_offsets`` (aLoRA, which patch_model refuses); neither reaches the gated layers."""
    if kwargs.get("adapter_names") is not None or kwargs.get("alora_offsets") is not None:
        raise RuntimeError(
            "forward(adapter_names=...) (PEFT's mixed batch) on a gatedlora-patched model: PEFT's choice of adapter "
            "per row does not reach the gated layers, which would run their own gates or routes instead. Let the "
            "router choose (GatedLoraConfig(gate='sequence', adapters=[...])), or use force_gate(model, 0.0 or 1.0) "
            "for the base model or the adapter on every row; for PEFT's mixed batch, gatedlora.unpatch_model(model) "
            "first")
    yield


# PEFT methods that look for PEFT's own layer types, so on a patched model they would find none and
# fail or silently do nothing. Each gets a stand-in on the patched model (and on a PeftModel's inner
# LoraModel) that does what a PEFT user expects, or says what to do instead. They are bound methods
# of the patched model, so that copy.deepcopy rebinds them to the copy; ``owner`` (0 the model, 1 its
# LoraModel) says which object's own method a stand-in that defers to PEFT calls.
PEFT_METHOD_STAND_INS = {
    "disable_adapter": _disable_adapter,
    **{m: _refusal(m, MERGE_REFUSAL.format(method=m)) for m in ("merge_and_unload", "merge_adapter")},
    "unload": _refusal("unload", "PEFT would remove only its own layer types. Call gatedlora.unpatch_model(model) "
                                 "first (that drops the gates and the router), then model.unload()"),
    **{m: _refusal(m, SWITCH_REFUSAL) for m in ("disable_adapter_layers", "enable_adapter_layers")},
    "set_adapter": _set_adapter,
    "delete_adapter": _delete_adapter,
    "load_adapter": _load_adapter,
    **{m: _refusal(m, NEW_ADAPTER_REFUSAL.format(how=PATCH_AGAIN.format(step=f"model.{m}(...)")))
       for m in ("add_adapter", "add_weighted_adapter")},
    "_enable_peft_forward_hooks": _forward_hooks,
}
# transformers' PEFT integration (a PreTrainedModel's load_adapter): its readers, which visit PEFT's layers, run on
# the view, and its switch, a flag on PEFT's layers, is refused as PEFT's is. Stood in only where the model's class
# defines them (a PeftModel would find them on the model it wraps, which has no adapter of transformers' own).
TRANSFORMERS_STAND_INS = {**{method: _deferring(method) for method in ("active_adapters", "get_adapter_state_dict")},
                          **{m: _refusal(m, SWITCH_REFUSAL) for m in ("disable_adapters", "enable_adapters")}}
PEFT_METHOD_STAND_INS.update(TRANSFORMERS_STAND_INS)
# PEFT's methods that visit its own layers to read or set what the gated layers share with them (the LoRA weights'
# requires_grad, the adapters' status): on the patched model they found no layer of PEFT's, so set_requires_grad
# did nothing without a word and the status readers said "no adapter layers found". They run on the view.
VIEW_STAND_INS = {method: _deferring(method) for method in ("set_requires_grad", "get_model_status",
                                                            "get_layer_status")}
PEFT_METHOD_STAND_INS.update(VIEW_STAND_INS)
DEFERRING_STAND_INS = (_set_adapter, _delete_adapter, _load_adapter, _forward_hooks,
                       *(TRANSFORMERS_STAND_INS[m] for m in ("active_adapters", "get_adapter_state_dict")),
                       *VIEW_STAND_INS.values())


def _peft_objects(model: nn.Module) -> list[nn.Module]:
    """The model and, for a PeftModel, its tuner (``model.base_model``), which has the same methods."""
    from peft import PeftModel

    return [model, model.base_model] if isinstance(model, PeftModel) else [model]


def _replace_peft_methods(model: nn.Module) -> None:
    for owner, target in enumerate(_peft_objects(model)):
        for method, stand_in in PEFT_METHOD_STAND_INS.items():
            if callable(getattr(type(target) if method in TRANSFORMERS_STAND_INS else target, method, None)):
                bound = {"owner": owner} if stand_in in DEFERRING_STAND_INS else {}
                target.__dict__[method] = StandIn(stand_in, model, **bound)


def _restore_peft_methods(model: nn.Module) -> None:
    for target in _peft_objects(model):
        for method in PEFT_METHOD_STAND_INS:
            target.__dict__.pop(method, None)


# Layers that take time-first x [T, B, K] in transformers: a row's sequence is its position only in batch-first x,
# and at T == B the two read alike, so the per-layer shape check cannot tell them apart (Longformer's attention
# projections at batch 4 and length 4: every row of a sequence-gated layer wrong by 0.2-0.4, no error). Every
# layer of these model types; the layers of these attention modules (Longformer's, LED's encoder's).
TIME_FIRST_MODEL_TYPES = ("fsmt", "xlnet")
TIME_FIRST_ATTENTION = ("LongformerSelfAttention", "LEDEncoderSelfAttention")


# Layers that project the relative-position embeddings in DeBERTa's disentangled attention (and SEW-D's copy of
# it): one [1, 2 * span, K] input for the whole batch, whose rows belong to no one sequence. With share_att_key
# the query and key projections take them as well as the hidden states. Refused at the first forward of a batch
# of two or more before; at batch 1 they ran with that one sequence's gate.
DISENTANGLED_ATTENTION = "DisentangledSelfAttention"
POSITION_PROJECTIONS = ("pos_proj", "pos_q_proj", "pos_key_proj", "pos_query_proj")
SHARED_KEY_PROJECTIONS = ("query_proj", "key_proj")


def _not_per_sequence(model: nn.Module, names: list[str]) -> list[str]:
    """The layers among ``names`` whose input rows are not each sequence's own, batch first: time-first inputs,
    and inputs shared by the whole batch."""
    if getattr(getattr(model, "config", None), "model_type", None) in TIME_FIRST_MODEL_TYPES:
        return names
    found = []
    for name in names:
        owner_path, _, child = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        kind = type(owner).__name__
        shared_keys = getattr(owner, "share_att_key", False)
        shared = kind == DISENTANGLED_ATTENTION and getattr(owner, "relative_attention", False) and (
            child in POSITION_PROJECTIONS or (child in SHARED_KEY_PROJECTIONS and shared_keys))
        if kind in TIME_FIRST_ATTENTION or shared:
            found.append(name)
    return found


def _prepare_sequence_routing(model, config, targets, fresh, state, adapters):
    blocks_path, blocks = find_blocks(model)
    n_blocks = len(blocks)
    check_router_layer(config.router_layer, n_blocks)
    # (with several adapters, a LoRA layer that holds none of them is patched to the base layer alone, wherever it is)
    held = [n for n, _ in targets if config.adapters is None or adapters[n]]
    in_blocks = [n for n in held if (i := block_index(n, blocks_path)) is not None and i <= config.router_layer]
    # Outside the blocks, a layer is gated only where the routes are in force: inside the forward of the backbone
    # that holds the blocks (install_routing wraps it), after the blocks. Transformers models register their
    # modules in the order they run, so a layer registered before the blocks runs before them (an encoder, an input
    # projection: no routes yet), and one outside the backbone runs outside its forward (lm_head, a task head: the
    # routes are over). (OPT's project_out, registered before its blocks but run after them, is refused too: an
    # error, where the other way round would compute something else.)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    backbone = _backbone(model, blocks_path)
    prefix = next(name for name, module in model.named_modules() if module is backbone)
    outside = [n for n in held if block_index(n, blocks_path) is None
               and not (n.startswith(prefix + "." if prefix else "") and order[n] > order[blocks_path])]
    if in_blocks and not fresh:
        first = min(block_index(n, blocks_path) for n in in_blocks)
        # (a router that reads an earlier block reads no adapted one; a later block reads more of them)
        lower = f", or lower router_layer below block {first}, the first adapted one" if first > 0 else ""
        raise ValueError(
            f"gate='sequence' with router_layer={config.router_layer}: the router's input must not depend on the "
            f"adapter, but LoRA covers layers at or before block {config.router_layer}: {in_blocks[:4]}"
            f"{' ...' if len(in_blocks) > 4 else ''}. Train the adapter with LoraConfig(layers_to_transform="
            f"list(range({config.router_layer + 1}, {n_blocks}))), as PRISM does{lower}")
    if outside and not fresh:
        raise ValueError(
            f"gate='sequence': LoRA covers layers outside the block list {blocks_path} that the routes do not reach: "
            f"{outside[:4]}{' ...' if len(outside) > 4 else ''}. The routes hold inside the forward of "
            f"{prefix or 'the model'} ({type(backbone).__name__}) from block {config.router_layer} on, so a layer "
            "that runs before the blocks (an encoder, an input projection: registered before them) or outside that "
            "forward (lm_head, a task head) cannot be gated per sequence. Train the adapter without LoRA there "
            "(LoraConfig(target_modules=...) on the blocks after router_layer), or use token gates "
            "(GatedLoraConfig(gate='token'))")
    # An expert of a mixture-of-experts block (SwitchTransformers' experts.expert_0, NLLB-MoE's, a numbered list)
    # gets the rows of the tokens sent to it, gathered from the whole batch ([n, K]): which sequence a row belongs
    # to is not in its input, and a gate taken from the row's position silently went to the wrong sequence's
    # rows. (A shared expert, which every token goes through in order, is "shared_expert(s)" and is gated, as is
    # a router under "experts", JetMoE's.)
    experts = [n for n in held if re.search(r"(^|\.)experts\.(\d+|expert_?\d+)\.", n)]
    if experts:
        raise ValueError(
            f"gate='sequence': LoRA covers experts of a mixture-of-experts block: {experts[:4]}"
            f"{' ...' if len(experts) > 4 else ''}. An expert gets the tokens routed to it gathered from the whole "
            "batch, so its rows cannot be traced to their sequences. Train the adapter without LoRA on the experts "
            "(LoraConfig(target_modules=...) on the attention projections), or use token gates "
            "(GatedLoraConfig(gate='token'))")
    not_per_sequence = _not_per_sequence(model, held)
    if not_per_sequence:
        raise ValueError(
            "gate='sequence': these layers take inputs whose rows cannot be traced to their sequences by position "
            "(time-first [T, B, ...], or shared by the whole batch, as DeBERTa's relative-position embeddings are): "
            f"{not_per_sequence[:4]}{' ...' if len(not_per_sequence) > 4 else ''}. Train the adapter without LoRA "
            "there (LoraConfig(target_modules=...)), or use token gates (GatedLoraConfig(gate='token'))")
    targets = [(n, m) for n, m in targets if n not in in_blocks and n not in outside]
    if not targets:
        raise ValueError(f"nothing to patch after router_layer={config.router_layer}")
    router = config.router
    if router is None:
        config_of_model = getattr(model, "config", None)
        hidden = getattr(text_config(config_of_model), "hidden_size", None) if config_of_model is not None else None
        if hidden is None:
            raise ValueError("gate='sequence': the model config has no hidden_size; pass GatedLoraConfig(router=...)")
        weight = next(blocks.parameters())
        router = (PrismRouter(hidden, threshold=config.threshold) if config.adapters is None
                  else PrismMultiRouter(hidden, len(config.adapters) + 1)).to(device=weight.device, dtype=weight.dtype)
    route = SequenceRouter(router, config)
    route.train(model.training)  # a router built in training mode must not keep its dropout on in eval
    setattr(model, ROUTER_ATTRIBUTE, route)
    install_routing(_backbone(model, blocks_path), blocks[config.router_layer], route, _generator(model, blocks_path))
    state.blocks_path = blocks_path
    return targets, route


def patch_state(model: nn.Module) -> PatchState:
    """The record of a patched model; raises ValueError if the model is not patched."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched: call gatedlora.patch_model(model) first")
    return state


def is_patched(model: nn.Module) -> bool:
    return getattr(model, STATE_ATTRIBUTE, None) is not None


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original modules back (same classes, same state_dict); gate and router parameters are dropped, and
    the parameters patch_model froze (a plain model's, for fresh adapters) train again."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        warnings.warn("unpatch_model: the model is not patched; nothing to do", stacklevel=2)
        return model
    for name, original in state.originals.items():
        _set_submodule(model, name, original)
    for parameter in state.frozen:
        parameter.requires_grad_(True)
    if state.blocks_path is not None:
        blocks = model.get_submodule(state.blocks_path)
        modules = [_backbone(model, state.blocks_path), blocks[state.config.router_layer],
                   _generator(model, state.blocks_path)]
        remove_routing([m for m in modules if m is not None], getattr(model, ROUTER_ATTRIBUTE))
    if ROUTER_ATTRIBUTE in model._modules:
        delattr(model, ROUTER_ATTRIBUTE)
    model.__dict__.pop("save_pretrained", None)
    _restore_peft_methods(model)
    object.__delattr__(model, STATE_ATTRIBUTE)
    return model


def gated_layers(model: nn.Module) -> Iterator[tuple[str, GatedLoRALinear]]:
    """(name, layer) for every GatedLoRALinear in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, GatedLoRALinear))


@contextlib.contextmanager
def force_gate(model: nn.Module, value: float) -> Iterator[nn.Module]:
    """Override every gate in ``model`` for the calling thread: 0.0 is the base model (bitwise), 1.0 plain
    LoRA, else soft ``g = value``. With several adapters (``GatedLoraConfig.adapters``): 0.0 is the base
    model, 1.0 leaves the routes as the router decides them (a sequence on the base model stays there).

    Per thread: forwards that other threads run meanwhile keep their own gates. Blocks nest (the
    innermost wins) and each restores exactly what was in force before it, in whatever order they end;
    a block left in another thread (a generator resumed elsewhere) ends in the thread it began in.
    The router still runs, so the routes of a forced forward are still decided and readable.
    """
    if not is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"force_gate: value must be a number in [0, 1], got {value!r}")
    value = float(value)
    layers = [m for _, m in gated_layers(model)]
    if not layers:
        raise ValueError(f"force_gate: {type(model).__name__} has no GatedLoRALinear layers; call patch_model first")
    if value not in (0.0, 1.0) and any(isinstance(m, RoutedLoRALinear) for m in layers):
        raise ValueError(f"force_gate: with several adapters the routes are hard: value must be 0.0 (the base "
                         f"model) or 1.0 (the routed adapters), got {value!r}")
    with forcing(layers, value):
        yield model


def get_router(model: nn.Module) -> SequenceRouter:
    """The model's SequenceRouter: ``.router`` is the router network, ``.threshold`` its threshold (settable).

    ``.last_probabilities`` [B] (with several adapters [B, N + 1]), ``.last_decisions`` [B] and
    ``.last_routes`` [B] (0 the base model, i ``adapters[i - 1]``) describe each sequence of the last forward
    that completed in the calling thread; ``.routes_of(cache)`` gives the decision a generation made
    at its prefill, from its KV cache or an output that holds one (``generate(...,
    return_dict_in_generate=True)``).
    """
    state = patch_state(model)
    if state.config.gate != "sequence":
        raise ValueError(f"get_router: the model is patched with gate={state.config.gate!r}; routers exist only "
                         "with gate='sequence'")
    return getattr(model, ROUTER_ATTRIBUTE)
