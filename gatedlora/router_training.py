"""Router training, PRISM step A: features at block ``router_layer``, then a class-weighted classifier.

The router of a model patched with ``gate="sequence"`` reads the hidden state after block
``router_layer`` at each prompt's last real token. ``train_router`` computes exactly those
features once (adapter off, the forward stopped right after that block, batched), trains the
router on them with class-weighted cross-entropy (PRISM's routing rates are skewed: about 6% of
MMLU queries go to the adapter), reports accuracy on a held-out split and can save the router with
``gatedlora.save_pretrained``. Labels are routes: 0 the base model, 1 the adapter, or with several
adapters (``GatedLoraConfig.adapters``) i the adapter ``adapters[i - 1]``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .block_capture import capture_and_stop, output_of_block
from .io import check_save_target, save_pretrained
from .ops.args import is_real
from .patching import force_gate, get_router, patch_state
from .prompts import explain_failed_forward, prompt_problem, read_jsonl, right_padded_batches, token_ids
from .routing import (PrismRouter, TwoClassRouter, check_route_logits, last_real_positions, router_output,
                      routes_from_logits)


@dataclass
class RouterTrainingResult:
    """What ``train_router`` measured. Accuracies are fractions in [0, 1]; held-out ones are NaN
    when ``heldout=0``. ``heldout_class_accuracy`` is the recall of each route (label 0, label 1, ...);
    ``heldout_open_rate`` the fraction of held-out prompts routed to an adapter (any of them);
    ``class_counts`` the prompts per label."""

    train_accuracy: float
    heldout_accuracy: float
    heldout_class_accuracy: tuple[float, ...]
    heldout_open_rate: float
    train_size: int
    heldout_size: int
    class_counts: tuple[int, ...]
    threshold: float
    losses: list[float] = field(default_factory=list)
    saved_to: str | None = None

    def summary(self) -> str:
        """One line for logs and the CLI."""
        per_label = ", ".join(f"label {i} {a:.3f}" for i, a in enumerate(self.heldout_class_accuracy))
        labels = "/".join(map(str, range(len(self.class_counts))))
        heldout = (f"held-out accuracy {self.heldout_accuracy:.3f} ({self.heldout_size} prompts; {per_label}; "
                   f"adapter used for {self.heldout_open_rate:.1%})" if self.heldout_size else
                   "no held-out prompts (heldout=0)")  # (not "nan%")
        return (f"router: train accuracy {self.train_accuracy:.3f} ({self.train_size} prompts), {heldout}; labels "
                f"{labels}: {'/'.join(map(str, self.class_counts))}"
                + (f"; saved to {self.saved_to}" if self.saved_to else ""))


def extract_router_features(model: nn.Module, prompts: Sequence[Any], tokenizer: Any = None, batch_size: int = 32,
                            max_length: int | None = None, progress: bool = True) -> torch.Tensor:
    """The router's input for each prompt: hidden state after block ``router_layer`` at the last token.

    model: patched with ``gate="sequence"``. prompts: n strings (with ``tokenizer``) or n token-id
    sequences. One forward per batch, adapter off, stopped after block ``router_layer``; prompts are
    batched by length (less padding) and padded on the right. Returns [n, H] float32 on the CPU.

    An encoder-decoder routes in its decoder: the prompt goes to the encoder, and the feature is the decoder's
    hidden state at the token ``generate()`` starts it with, which reads the prompt through cross-attention.
    """
    from tqdm.auto import tqdm

    state = patch_state(model)
    get_router(model)  # raises unless gate="sequence"
    block = model.get_submodule(state.blocks_path)[state.config.router_layer]
    ids = token_ids(prompts, tokenizer, max_length, "train_router")
    device = next(model.parameters()).device
    decoder_start = _decoder_start(model, state.blocks_path)
    features = torch.empty(len(ids), 0)
    was_training = model.training
    handle = block.register_forward_hook(capture_and_stop, prepend=True)  # before the routing hook
    try:
        model.eval()
        with torch.no_grad(), force_gate(model, 0.0):
            batches = right_padded_batches(ids, batch_size)
            for rows, input_ids, mask in tqdm(batches, total=math.ceil(len(ids) / batch_size), desc="router features",
                                              unit="batch", disable=not progress):
                inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
                if decoder_start is not None:
                    inputs["decoder_input_ids"] = torch.full((len(rows), 1), decoder_start, device=device)
                try:
                    hidden = output_of_block(partial(model, **inputs))
                except (RuntimeError, IndexError) as err:
                    explain_failed_forward(tokenizer, ids, rows, "train_router", err, getattr(model, "config", None))
                    raise
                if hidden is None:
                    raise RuntimeError(f"train_router: block {state.config.router_layer} did not run in the forward")
                if decoder_start is None:
                    positions = last_real_positions(mask, len(rows), input_ids.shape[1]).to(hidden.device)
                else:
                    positions = torch.zeros(len(rows), dtype=torch.long, device=hidden.device)
                last = hidden[torch.arange(len(rows), device=hidden.device), positions].float().cpu()
                if features.shape[1] == 0:
                    features = torch.empty(len(ids), last.shape[1])
                features[torch.tensor(rows)] = last
    finally:
        handle.remove()
        model.train(was_training)
    return features


def _decoder_start(model: nn.Module, blocks_path: str) -> int | None:
    """The token ``generate()`` starts the decoder with, for an encoder-decoder whose blocks are its decoder's
    (at prefill the router reads the decoder there); None for other models."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "decoder" not in blocks_path.split("."):
        return None
    for source in (getattr(model, "generation_config", None), config):
        for name in ("decoder_start_token_id", "bos_token_id"):
            token = getattr(source, name, None)
            if isinstance(token, int):
                return token
    raise ValueError(f"train_router: {type(model).__name__} is an encoder-decoder whose router reads its decoder at "
                     "the token generate() starts it with, but neither its generation config nor its config names "
                     "a decoder_start_token_id (or bos_token_id): set model.generation_config.decoder_start_token_id")


def router_logits(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A one-adapter router's decision as one logit per row (>= logit(threshold) opens). hidden: [B, H] -> [B].

    PrismRouter: the logit before its sigmoid; TwoClassRouter: l1 - l0 (softmax(l)[1] = sigmoid(l1 - l0));
    any other router: the logit of its probability. (A router for several adapters returns logits [B, N + 1]
    itself.)
    """
    if isinstance(router, PrismRouter):
        return router.net(hidden).squeeze(-1)
    if isinstance(router, TwoClassRouter):
        logits = router.net(hidden)
        return (logits[:, 1] - logits[:, 0]).float()
    return torch.logit(router_output(router, hidden, "train_router").float(), eps=1e-6)


def _split(labels: torch.Tensor, classes: int, heldout: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: a ``heldout`` fraction of each class (at least one where it has two or more)."""
    train, test = [], []
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = min(len(idx) - 1, max(1, round(heldout * len(idx)))) if heldout > 0 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train), torch.cat(test)


def _label_meaning(classes: int) -> str:
    """What the labels of a router with ``classes`` routes may be, for error messages."""
    if classes == 2:
        return "0 (base model) or 1 (adapter)"
    return f"0 (base model) to {classes - 1} (adapter i is adapters[i - 1])"


def _check_labels(prompts: Sequence[Any], labels: Any, classes: int) -> torch.Tensor:
    """labels (a sequence, numpy array or tensor of n integers in [0, classes)) as a long tensor [n]."""
    values = labels.tolist() if hasattr(labels, "tolist") else list(labels) if isinstance(labels, Sequence) else None
    if not isinstance(values, list) or len(values) != len(prompts) or any(isinstance(v, list) for v in values):
        got = f"shape {list(labels.shape)}" if hasattr(labels, "shape") else \
            f"{len(values)} values" if isinstance(values, list) else type(labels).__name__
        raise ValueError(f"train_router: labels must have one value per prompt ({len(prompts)}), got {got}")
    values = [v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for v in values]  # (0-dim tensors)
    # (each value looked at: a bool, a float 1.0 or a string among integers is named, not the whole list)
    bad = [i for i, v in enumerate(values)
           if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < classes]
    if bad:
        raise ValueError(f"train_router: labels must be integers {_label_meaning(classes)}; bad at {bad[:8]} "
                         f"({', '.join(repr(values[i]) for i in bad[:3])}{' ...' if len(bad) > 3 else ''})")
    labels = torch.tensor(values, dtype=torch.long)
    counts = [int((labels == c).sum()) for c in range(classes)]
    if min(counts) == 0:
        every = "both labels are" if classes == 2 else "every label is"
        raise ValueError(f"train_router: {every} needed to train a router, got counts "
                         f"{'/'.join(map(str, range(classes)))} = {counts}")
    return labels.long()


def train_router(model: nn.Module, prompts: Sequence[Any], labels: Sequence[int] | torch.Tensor, tokenizer: Any = None,
                 *, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 64,
                 heldout: float = 0.2, seed: int = 0, max_length: int | None = None, feature_batch_size: int = 32,
                 progress: bool = True, save_to: str | Path | None = None, overwrite: bool = False,
                 ) -> RouterTrainingResult:
    """Train the router of ``model`` (patched with ``gate="sequence"``) on labelled prompts, in place.

    prompts: n strings (with ``tokenizer``) or token-id sequences; labels: n values, 1 where the
    adapter should answer, 0 where the base model should; with several adapters (``GatedLoraConfig.adapters``)
    i where ``adapters[i - 1]`` should. The features come from ``extract_router_features`` (one pass,
    adapter off); a stratified ``heldout`` fraction is kept out of training. Loss: cross-entropy (binary on
    a one-adapter router's logit, over the N + 1 logits of a router for N adapters), each class weighted by
    n / (C n_class) (C classes) so a rare route counts as much as a common one; AdamW, ``epochs`` passes of
    shuffled minibatches. The router is left in eval mode; ``save_to``: written with
    ``gatedlora.save_pretrained`` (``overwrite`` as there). Returns a ``RouterTrainingResult``.
    """
    if not (isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool) and epochs >= 1):
        raise ValueError(f"train_router: epochs must be an int >= 1, got {epochs!r}")
    if not (is_real(heldout) and 0 <= heldout < 1):
        raise ValueError(f"train_router: heldout must be a fraction in [0, 1), got {heldout!r}")
    if not (is_real(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"train_router: lr must be a positive finite number, got {lr!r}")
    epochs, heldout, lr = int(epochs), float(heldout), float(lr)  # (NumPy scalars, say)
    for name, value in (("batch_size", batch_size), ("feature_batch_size", feature_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # < 1 would train on nothing
            raise ValueError(f"train_router: {name} must be an int >= 1, got {value!r}")
    if len(prompts) == 0:
        raise ValueError("train_router: no prompts to train on (prompts and labels are empty)")
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        raise TypeError(f"train_router: seed must be an int, got {seed!r}")
    if save_to is not None:  # before the work: a save refused at the end lost the training and its result
        check_save_target(save_to, overwrite, "train_router")
    route = get_router(model)  # raises unless the model is patched with gate="sequence"
    classes = 2 if route.adapters is None else len(route.adapters) + 1
    y = _check_labels(prompts, labels, classes)
    router = route.router
    threshold = float(route.threshold)
    features = extract_router_features(model, prompts, tokenizer, feature_batch_size, max_length, progress)
    param = next(router.parameters(), None)
    if param is None:
        raise ValueError(f"train_router: the router {type(router).__name__} has no parameters to train")
    features = features.to(device=param.device, dtype=param.dtype)
    y = y.to(param.device)
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = _split(y.cpu(), classes, heldout, generator)
    train_idx, test_idx = train_idx.to(param.device), test_idx.to(param.device)
    counts = [int((y[train_idx] == c).sum()) for c in range(classes)]
    class_weight = torch.tensor([len(train_idx) / (classes * c) for c in counts], device=param.device)

    if route.adapters is not None:  # the width the model's forward will ask for, before any training
        router.eval()  # (a router with batch norm: no update of its running statistics from this look)
        with torch.no_grad():
            check_route_logits(router_output(router, features[:batch_size], "train_router"),
                               min(len(features), batch_size), route.adapters, "train_router")
    flags = [p.requires_grad for p in router.parameters()]
    before = {k: v.detach().clone() for k, v in router.state_dict().items()}
    router.requires_grad_(True)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    router.train()
    try:
        with torch.enable_grad(), _seeded_global_generator(seed, param.device) if _has_dropout(router) \
                else contextlib.nullcontext():
            for _ in range(epochs):
                perm = train_idx[torch.randperm(len(train_idx), generator=generator).to(param.device)]
                total = torch.zeros((), device=param.device)
                for start in range(0, len(perm), batch_size):
                    rows = perm[start:start + batch_size]
                    target = y[rows]
                    if route.adapters is None:
                        loss = F.binary_cross_entropy_with_logits(router_logits(router, features[rows]).float(),
                                                                  target.float(), weight=class_weight[target])
                    else:  # weighted per sample and averaged, as the binary loss is
                        loss = (F.cross_entropy(router(features[rows]).float(), target, reduction="none")
                                * class_weight[target]).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    try:
                        optimizer.step()
                    except RuntimeError as err:  # an lr so large that AdamW's step overflows a float
                        if "overflow" not in str(err):
                            raise
                        total = torch.full((), math.inf)
                        break
                    total += loss.detach() * len(rows)
                losses.append(float(total) / len(perm))
                if not math.isfinite(losses[-1]):
                    break
    finally:
        router.eval()
        for p, flag in zip(router.parameters(), flags):
            p.requires_grad_(flag)
    if not math.isfinite(losses[-1]) or any(
            bool((~p.isfinite() & before[name].isfinite()).any()) for name, p in router.named_parameters()):
        with torch.no_grad():
            router.load_state_dict(before)
        last = losses[-1]  # epochs >= 1: every epoch records its loss
        what = (f"the loss reached {last}" if not math.isfinite(last)
                else f"a parameter became NaN or infinite, the loss at {last:.3g}")
        raise ValueError(f"train_router: training diverged ({what} in epoch {len(losses)}); the router is left as "
                         f"it was before training. Train with a smaller lr (got {lr})")

    with torch.no_grad():
        if route.adapters is None:
            predicted = (router(features).float() >= threshold).long()  # NaN compares False: closed, as in routing
        else:
            predicted = routes_from_logits(router(features).float())  # as the model routes
    correct = predicted == y

    def accuracy(idx: torch.Tensor) -> float:
        return float(correct[idx].float().mean()) if len(idx) else math.nan

    result = RouterTrainingResult(
        train_accuracy=accuracy(train_idx), heldout_accuracy=accuracy(test_idx),
        heldout_class_accuracy=tuple(accuracy(test_idx[y[test_idx] == c]) for c in range(classes)),
        heldout_open_rate=float((predicted[test_idx] != 0).float().mean()) if len(test_idx) else math.nan,
        train_size=len(train_idx), heldout_size=len(test_idx),
        class_counts=tuple(int((y == c).sum()) for c in range(classes)), threshold=threshold, losses=losses)
    if save_to is not None:
        save_pretrained(model, save_to, overwrite=overwrite)
        result.saved_to = str(save_to)
    return result


def _has_dropout(router: nn.Module) -> bool:
    """Whether training ``router`` draws from the global generator (dropout: PRISM's two-class router)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in router.modules())


@contextlib.contextmanager
def _seeded_global_generator(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators of the CPU and of ``device`` seeded with ``seed`` inside, their state restored after:
    what a router's dropout draws repeats with ``seed``, and the caller's random stream is as it was. Only for
    routers that draw (``_has_dropout``): the global generator is the process's, and another thread drawing from it
    meanwhile would see it reseeded, then set back."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def read_router_data(path: str | Path, classes: int = 2) -> tuple[list[str], list[int]]:
    """Prompts and labels from a JSONL file of ``{"prompt": str, "label": 0 | 1}`` (blank lines skipped); with
    ``classes`` routes, labels 0 to ``classes - 1``.

    Raises ValueError naming the file and line of the first bad row.
    """
    def problem(row: dict) -> str | None:
        missing = [key for key in ("prompt", "label") if key not in row]
        if missing:
            return f"missing {' and '.join(repr(k) for k in missing)}"
        label = row["label"]
        if isinstance(label, bool) or label not in range(classes) or isinstance(label, float):
            allowed = "0 or 1" if classes == 2 else f"an integer from 0 to {classes - 1}"
            return f"\"label\" must be {allowed}, got {label!r:.60}"
        return prompt_problem(row)

    rows = read_jsonl(path, problem)
    return [row["prompt"] for row in rows], [int(row["label"]) for row in rows]
