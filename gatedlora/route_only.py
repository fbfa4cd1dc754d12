"""A route-only model: the embeddings, blocks ``0..router_layer`` and the trained router, nothing else.

PRISM's router reads the hidden state after block ``router_layer``, and those blocks carry no adapter,
so a prompt's route can be decided before the request reaches a serving engine. The model is built from
the checkpoint's config cut to ``router_layer + 1`` blocks, and Transformers then loads only the weights
that model has: the later blocks and the LM head are never read. Numbers a block derives from the depth
are set to the full model's (``constants_of_depth``). The
router comes from a gatedlora save (``gatedlora.save_pretrained`` or ``gatedlora train-router``).

Its decisions are the full patched model's, bitwise, for the same batch: the same modules run on the
same inputs, and ``SequenceRouter.decide`` turns the block's output into routes in both.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .block_capture import capture_and_stop, output_of_block
from .call_state import RouteDecision
from .config import check_router_layer
from .io import (DEFAULT_ROUTERS, REBUILT_ROUTERS, ROUTER_PREFIX, check_model_type, config_of_save, fills_saved_router,
                 read_saved, router_state, router_to_pass, saved_router_class, saved_router_module)
from .patching import find_blocks, text_config
from .prompts import explain_failed_forward, right_padded_batches, token_ids
from .routing import SequenceRouter

BASE_ROUTE = "base"  # the route name of prompts the base model answers

class RouteOnlyModel(nn.Module):
    """Embeddings + blocks ``0..router_layer`` (``backbone``) and the router (``route``): prompts in, routes out.

    ``forward(input_ids [B, T], attention_mask [B, T])`` returns the ``RouteDecision`` the full patched
    model makes at prefill: ``probabilities`` [B] (fp32) and ``decisions`` [B] (bool: ``p >= threshold``;
    NaN goes to the base model), ``routes`` [B] (long). ``route_names`` lists the routes by index: 0 is
    ``"base"``, 1 the adapter (``adapter_name``), or with a router for several adapters i is ``adapters[i - 1]``
    (the save's names; ``probabilities`` is then [B, N + 1]).
    """

    def __init__(self, backbone: nn.Module, route: SequenceRouter, adapter_name: str = "adapter") -> None:
        super().__init__()
        router_layer = route.config.router_layer
        _check_decoder_only(getattr(backbone, "config", None))
        _, blocks = find_blocks(backbone)
        if len(blocks) != router_layer + 1:
            raise ValueError(f"RouteOnlyModel: the backbone must end at block router_layer={router_layer}, "
                             f"it has {len(blocks)} blocks")
        adapters = route.adapters or [adapter_name]
        if BASE_ROUTE in adapters:
            raise ValueError(f"RouteOnlyModel: an adapter cannot be named {BASE_ROUTE!r} (the base model's route)")
        self.backbone = backbone
        self.route = route
        self.route_names = (BASE_ROUTE, *adapters)
        blocks[router_layer].register_forward_hook(capture_and_stop)

    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike, router_path: str | os.PathLike, *,
                        router: nn.Module | None = None, adapter_name: str = "adapter",
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                        ) -> RouteOnlyModel:
        """Load blocks ``0..router_layer`` of the Hugging Face model at ``model_path`` and the router saved in
        ``router_path``. ``router``: a module of the saved class, for routers other than gatedlora's own.

        ``dtype`` goes to Transformers' ``from_pretrained`` as it is (None: its default, ``"auto"``, the
        checkpoint's dtype), so the blocks hold the numbers of a full model loaded with the same ``dtype``. The
        router takes the dtype the full patched model gives it: gatedlora's default router the blocks' weight
        dtype (as ``patch_model`` builds it), a two-class router the dtype it was saved in, a ``router`` passed
        in its own."""
        from transformers import AutoConfig, AutoModel

        meta, tensors = read_saved(router_path)
        saved = meta["config"]
        if saved.get("gate") != "sequence":
            raise ValueError(f"RouteOnlyModel: {router_path} holds gate={saved.get('gate')!r} gates; "
                             "a route-only model needs a router (gate='sequence')")
        if router is not None and not fills_saved_router(router, saved):
            # (a router of another class may hold the same parameters for another function)
            raise ValueError(f"RouteOnlyModel: the router in {router_path} is a {saved_router_class(saved)}, "
                             f"router= a {type(router).__name__}: pass a module of the saved class")
        default_router = router is None and saved.get("router") in DEFAULT_ROUTERS
        # gatedlora's own router classes, rebuilt or passed (--prism-two-class), read through net.0
        reads_net_0 = router is None or type(router).__name__ in REBUILT_ROUTERS
        router = router_from_state(saved.get("router"), tensors, router)
        config = config_of_save(saved, router_path, "RouteOnlyModel", router)
        model_config = AutoConfig.from_pretrained(model_path)
        _check_decoder_only(model_config)
        check_model_type(meta, model_config, Path(router_path), "RouteOnlyModel")
        hidden = getattr(text_config(model_config), "hidden_size", None)
        width = tensors[f"{ROUTER_PREFIX}net.0.weight"].shape[1] if reads_net_0 else None
        if hidden is not None and width is not None and width != hidden:  # (it failed at the first batch)
            raise ValueError(f"RouteOnlyModel: the router in {router_path} reads hidden states of width {width}, "
                             f"but the model in {model_path} has hidden_size {hidden}: it was trained on another "
                             "model")
        full_config, model_config = model_config, cut_config(model_config, config.router_layer + 1)
        depth_constants = constants_of_depth(full_config, model_config)
        with _quiet_transformers():
            backbone = AutoModel.from_pretrained(model_path, config=model_config,
                                                 **({} if dtype is None else {"dtype": dtype}))
        for (name, attribute), value in depth_constants.items():
            setattr(backbone.get_submodule(name), attribute, value)
        model = cls(backbone, SequenceRouter(router, config), adapter_name).eval()
        if default_router:
            # Only the router is cast: casting the loaded backbone again would round the buffers Transformers
            # keeps in fp32 (the rotary inv_freq), which a full model loaded with the same dtype keeps.
            model.route.to(dtype=next(find_blocks(backbone)[1].parameters()).dtype)
        return model.to(device=device) if device is not None else model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **backbone_kwargs: Any) -> RouteDecision:
        """input_ids, attention_mask: [B, T] -> the prompts' routes (``RouteDecision``, batch B).

        Pad on the right (``route_prompts`` does), or pass what the backbone needs for left padding
        (``position_ids``, as ``generate`` derives them from the mask) in ``backbone_kwargs``.
        """
        # No KV cache: nothing continues from this pass, and a hybrid model whose blocks 0..router_layer hold no
        # attention layer (LFM2, Jamba, Zamba2) fails to make one for the cut model.
        backbone_kwargs.setdefault("use_cache", False)
        hidden = output_of_block(lambda: self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                                       **backbone_kwargs))
        if hidden is None:
            raise RuntimeError(f"RouteOnlyModel: block {self.route.config.router_layer} did not run in the "
                               "backbone's forward")
        return self.route.decide(hidden, attention_mask)

    def routes(self, routes: torch.Tensor) -> list[str]:
        """The name of each route [B] (a route index, or a one-adapter decision as bool)."""
        return [self.route_names[int(r)] for r in routes.tolist()]


def route_prompts(model: RouteOnlyModel, prompts: Sequence[Any], tokenizer: Any = None, batch_size: int = 32,
                  max_length: int | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's probabilities (fp32: [n], the adapter's; with several adapters [n, N + 1], each route's)
    and route [n] (long: 0 the base model, i ``model.route_names[i]``), in input order, on the CPU.

    prompts: n strings (with ``tokenizer``) or token-id sequences, tokenized as ``train_router`` does;
    batched by length and padded on the right, ``batch_size`` at a time.
    """
    from tqdm.auto import tqdm

    ids = token_ids(prompts, tokenizer, max_length, "route_prompts")
    device = next(model.parameters()).device
    shape = (len(ids),) if model.route.adapters is None else (len(ids), len(model.route_names))
    probabilities, routes = torch.empty(shape), torch.empty(len(ids), dtype=torch.long)
    batches = right_padded_batches(ids, batch_size)
    with torch.no_grad():
        for rows, input_ids, mask in tqdm(batches, total=math.ceil(len(ids) / batch_size), desc="routing",
                                          unit="batch", disable=not progress):
            try:
                decision = model(input_ids.to(device), mask.to(device))
            except (RuntimeError, IndexError) as err:
                explain_failed_forward(tokenizer, ids, rows, "route_prompts", err,
                                       getattr(model.backbone, "config", None))
                raise
            probabilities[torch.tensor(rows)] = decision.probabilities.float().cpu()
            routes[torch.tensor(rows)] = decision.routes.cpu()
    return probabilities, routes


def _check_decoder_only(config: Any) -> None:
    """Refuse an encoder-decoder: its router reads the decoder, after the whole encoder, so blocks 0..router_layer
    of one list are not enough (and its num_hidden_layers counts the encoder's)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"RouteOnlyModel: {type(config).__name__} is an encoder-decoder, whose router reads its "
                         "decoder after the whole encoder; a route-only model is built for decoder-only models. Route "
                         "with the full patched model (get_router(model).last_routes after a forward)")


def cut_config(config: Any, blocks: int) -> Any:
    """A copy of a Transformers config with only the first ``blocks`` blocks (per-block lists cut too)."""
    config = config.__class__.from_dict(config.to_dict())
    total = config.num_hidden_layers
    check_router_layer(blocks - 1, total)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, value[:blocks])  # e.g. layer_types (sliding or full attention per block)
    config.num_hidden_layers = blocks
    return config


def constants_of_depth(full_config: Any, cut: Any) -> dict[tuple[str, str], Any]:
    """What the cut model's modules must be given to compute what the full model's do: {(module name, attribute):
    the full model's value} for each plain number or flag a module derives from the model's depth (MiniCPM3's
    residual scale ``scale_depth / sqrt(num_hidden_layers)``). Both models are built on the meta device to
    compare them (no memory; 0.09 s for Llama-3-8B's config). Raises where the cut model is built differently
    (a parameter or buffer the full model lacks or holds in another shape: GPT-NeoX-Japanese's last block's
    bias, Gemma 4's per-layer embeddings), since no attribute makes up for that."""
    from transformers import AutoModel

    try:
        with torch.device("meta"), _quiet_transformers():
            full, small = AutoModel.from_config(full_config), AutoModel.from_config(cut)
    except Exception as err:  # a model whose construction reads tensor values (.item()) cannot be built there
        warnings.warn(f"RouteOnlyModel: could not build {type(full_config).__name__}'s model on the meta device "
                      f"to compare it with the cut one ({type(err).__name__}: {err}); its blocks are loaded as a "
                      f"model of {cut.num_hidden_layers} blocks builds them", RuntimeWarning, stacklevel=3)
        return {}
    full_tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    built_otherwise = [f"{name} {list(tensor.shape)}" for name, tensor in
                       [*small.named_parameters(), *small.named_buffers()]
                       if name not in full_tensors or full_tensors[name].shape != tensor.shape]
    if built_otherwise:
        raise ValueError(f"RouteOnlyModel: {type(small).__name__} builds its first {cut.num_hidden_layers} blocks "
                         f"differently in a model of that depth ({', '.join(built_otherwise[:4])} are not the full "
                         "model's), so they would not compute the full model's hidden states. Route with the full "
                         "patched model (get_router(model).last_routes after a forward)")
    full_modules = dict(full.named_modules())
    constants = {}
    for name, module in small.named_modules():
        twin_module = full_modules.get(name)
        if type(twin_module) is not type(module):
            continue
        twin = vars(twin_module)
        for attribute, value in vars(module).items():
            if type(value) in (bool, int, float) and type(twin.get(attribute)) is type(value) \
                    and twin[attribute] != value:
                constants[(name, attribute)] = twin[attribute]
    return constants


def router_from_state(class_name: str | None, tensors: dict[str, torch.Tensor], router: nn.Module | None
                      ) -> nn.Module:
    """The router saved under ``gate_router.*`` in ``tensors``, filled with those tensors.

    ``PrismRouter``, ``PrismMultiRouter`` and ``PrismTwoClassRouter`` (``prism_two_class_router``) are rebuilt from
    the saved shapes; any other class needs ``router``, a module of that class.
    """
    state = router_state(tensors)
    if not state:
        raise ValueError(f"the gatedlora save holds no router tensors ({ROUTER_PREFIX}*)")
    if router is None:
        router = saved_router_module(class_name, state)
        if router is None:
            raise ValueError(f"the save used a custom router ({class_name}); {router_to_pass(class_name, state)}")
    expected = {key: value.shape for key, value in router.state_dict().items()}
    got = {key: value.shape for key, value in state.items()}
    if expected != got:
        raise ValueError(f"the saved router does not fit {type(router).__name__}: saved {got}, module {expected}")
    router.load_state_dict(state)
    return router.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Transformers reports the checkpoint's later blocks as unused weights: expected here, so not shown
    (nor its progress bar over a handful of tensors)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()

