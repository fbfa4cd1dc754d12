"""Routers whose decisions a test chooses, for the tiny models of tiny_models.py."""
from __future__ import annotations

import torch
from torch import nn


class LinearRouter(nn.Module):
    """sigmoid(w . h + b): a router whose decisions we can steer."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, 1)

    def forward(self, h):
        return torch.sigmoid(self.proj(h)).squeeze(-1)


class PatternRouter(nn.Module):
    """Returns ``pattern`` [B] (set by the test) in the dtype of its parameter, whatever the hidden states."""

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = nn.Linear(hidden, 1, dtype=dtype)
        self.pattern: torch.Tensor | None = None

    def forward(self, h):
        return self.proj(h).squeeze(-1) * 0 + self.pattern.to(self.proj.weight.dtype)


def last_real_hidden(model, ids, mask, layer):
    """Hidden state after block ``layer`` at each sequence's last real token (adapter off)."""
    with torch.no_grad(), model.disable_adapter():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return states[torch.arange(ids.shape[0]), last]


def splitting_router(model, batches, layer):
    """A LinearRouter that opens exactly the sequences marked in each ``(ids, mask, want_open)`` of ``batches``
    (logits +-4, solved by least squares over the batches' hidden states: fewer sequences than hidden units)."""
    hidden = torch.cat([last_real_hidden(model, ids, mask, layer) for ids, mask, _ in batches])
    want = torch.tensor([o for _, _, want_open in batches for o in want_open])
    router = LinearRouter(hidden.shape[1])
    target = torch.where(want, 4.0, -4.0)
    w = torch.linalg.lstsq(hidden, target[:, None]).solution[:, 0]
    with torch.no_grad():
        router.proj.weight.copy_(w[None])
        router.proj.bias.zero_()
    assert torch.equal(router(hidden) >= 0.5, want)
    return router


class RoutePatternRouter(nn.Module):
    """Logits [B, routes] whose argmax is ``pattern`` [B] (set by the test), whatever the hidden states."""

    def __init__(self, hidden: int, routes: int):
        super().__init__()
        self.proj = nn.Linear(hidden, routes)
        self.pattern: torch.Tensor | None = None

    def forward(self, h):
        return self.proj(h) * 0 + 5.0 * torch.nn.functional.one_hot(self.pattern, self.proj.out_features)


def route_splitting_router(model, batches, layer, routes: int):
    """A linear router [H -> routes] that sends each sequence of each ``(ids, mask, want_routes)`` of ``batches``
    to its route (logits +4 on it, -4 elsewhere, by least squares over the batches' hidden states at the last
    real tokens: fewer sequences than hidden units)."""
    hidden = torch.cat([last_real_hidden(model, ids, mask, layer) for ids, mask, _ in batches])
    want = torch.tensor([r for _, _, want_routes in batches for r in want_routes])
    target = 8.0 * torch.nn.functional.one_hot(want, routes) - 4.0
    router = nn.Linear(hidden.shape[1], routes)
    with torch.no_grad():
        router.weight.copy_(torch.linalg.lstsq(hidden, target).solution.T)
        router.bias.zero_()
    assert torch.equal(router(hidden).argmax(-1), want)
    return router
