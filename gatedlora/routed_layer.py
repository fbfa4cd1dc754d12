"""RoutedLoRALinear: a base layer and several LoRA adapters, one chosen per sequence by the model's router."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .call_state import RouteDecision, forced_gate
from .kept_call import forget_call, keep_call, kept_output
from .layers import GatedLoRALinear, linear_features
from .ops import add_lora_, add_lora_multi_, gated_lora, gated_lora_multi
from .module_hooks import plain_linear
from .ops.args import check_loaded
from .ops.multi_weights import forget_kept_copies
from .ops.torch_multi import add_kept_concatenation_
from .routing import SequenceRouter


class RoutedLoRALinear(GatedLoRALinear):
    """``y[m] = base_layer(x)[m] + s_i * B_i(A_i(dropout_i(x[m])))`` with i the adapter the router chose for
    row m's sequence; a sequence routed to the base model (or to an adapter this layer does not hold) gets
    the base layer's output, bitwise.

    Submodules are PEFT's (``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``: the same module objects,
    every adapter kept), so state_dict keys and PEFT's ``save_pretrained`` are unchanged and training
    updates the weights the kernels read. ``adapter_names`` lists the adapters this layer holds, in route
    order; ``route_slots[r]`` is the position of route r's adapter among them, -1 for route 0 (the base
    model) and for an adapter this layer does not hold. ``scalings`` are PEFT's, per adapter.

    x: [B, ..., K] -> [B, ..., N].
    """

    def __init__(self, base_layer: nn.Module, lora_A: nn.ModuleDict, lora_B: nn.ModuleDict,
                 lora_dropout: nn.ModuleDict, scalings: dict[str, float], adapters: Sequence[str],
                 route: SequenceRouter, backend: str = "auto") -> None:
        nn.Module.__init__(self)  # GatedLoRALinear's __init__ sets up one adapter and its gate: not these
        self.base_layer = base_layer
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.lora_dropout = lora_dropout
        self.adapter_names = tuple(a for a in adapters if a in lora_A)
        self.scalings = tuple(float(scalings[a]) for a in self.adapter_names)
        self.route_slots = (-1,) + tuple(self.adapter_names.index(a) if a in self.adapter_names else -1
                                         for a in adapters)
        # The slots on the device the layer runs on (a buffer moves with the model), so that turning routes into
        # row adapters needs no host-to-device copy at a decode step (none may happen in a CUDA graph capture).
        self.register_buffer("route_slot_table", torch.tensor(self.route_slots, dtype=torch.int64,
                                                              device=base_layer.weight.device), persistent=False)
        self.gate_mode = "sequence"
        self.threshold = route.threshold
        self.hard = True
        self.train_hard = None
        self.straight_through = False
        self.backend = backend
        self.base_mode = "exact"
        self.adapter_name = None  # no single adapter: see adapter_names
        self.in_features, self.out_features = linear_features(base_layer)
        self.__dict__["route"] = route  # a plain attribute, not a submodule: the router is registered once

    @classmethod
    def from_peft(cls, layer: nn.Module, adapters: Sequence[str], **options: Any) -> "RoutedLoRALinear":
        """Wrap a ``peft.tuners.lora.Linear`` that holds some of ``adapters`` (the same modules and scalings)."""
        return cls(layer.base_layer, layer.lora_A, layer.lora_B, layer.lora_dropout, layer.scaling, adapters,
                   **options)

    @property
    def rank(self) -> int:
        """The largest rank of the adapters here (0 with none); ``ranks()`` gives each."""
        return max(self.ranks().values(), default=0)

    def ranks(self) -> dict[str, int]:
        """Each adapter's rank in this layer, by name."""
        return {name: self.lora_A[name].weight.shape[0] for name in self.adapter_names}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        kept_calls = self.__dict__.get("_kept_calls")
        if kept_calls and not (args or kwargs):
            result = kept_output(self, kept_calls, x)
            if result is not None:
                return result
        names = self.adapter_names
        if not names or forced_gate(self) == 0.0:
            return self._base(x, args, kwargs)
        decision = self.route.in_force()
        if decision is None:
            decision = self.route.decision()  # raises: not decided yet
        route = decision.uniform_route
        slot = -1 if route is None else self.route_slots[route]
        lora_a, lora_b = self._adapter_weight_tuples()
        if route is not None and not self._records_gradients(lora_a + lora_b):  # one route for every sequence
            if slot < 0:
                return self._base(x, args, kwargs)  # the base model, or an adapter this layer lacks
            # one adapter (host-visible): plain LoRA with it, as PEFT computes
            if lora_a[slot].is_meta or lora_b[slot].is_meta:
                check_loaded((lora_a[slot], lora_b[slot]), x, "gatedlora")
            lora_x = self._dropout(x, (names[slot],))
            if not torch.is_grad_enabled():
                result, lora_x = self._writable_base_output(x, lora_x, args, kwargs)
                return add_lora_(result, lora_x, lora_a[slot], lora_b[slot], self.scalings[slot], self.backend)
            result, lora_x, inplace = self._base_output(x, lora_x, args, kwargs)
            return gated_lora(lora_x, result, lora_a[slot], lora_b[slot], self.scalings[slot], backend=self.backend,
                              inplace=inplace, validate=False)
        index = decision.row_adapters(x, self._buffers["route_slot_table"])
        if not torch.is_grad_enabled():
            if x.is_cpu and not (args or kwargs):
                result = self._add_kept_on_cpu(x, lora_a, lora_b, index, decision)
                if result is not None:
                    return result
            lora_x = self._dropout(x, names, index)
            result, lora_x = self._writable_base_output(x, lora_x, args, kwargs)
            # (the decision's index never changes: its column mask is kept)
            return add_lora_multi_(result, lora_x, lora_a, lora_b, self.scalings, index, self.backend, True)
        lora_x = self._dropout(x, names, index)
        result, lora_x, inplace = self._base_output(x, lora_x, args, kwargs)
        return gated_lora_multi(lora_x, result, lora_a, lora_b, self.scalings, index, backend=self.backend,
                                inplace=inplace, validate=False)

    def _add_kept_on_cpu(self, x: torch.Tensor, lora_a: tuple, lora_b: tuple, index: torch.Tensor,
                         decision: RouteDecision) -> torch.Tensor | None:
        """The output for a mixed batch on the CPU outside autograd where the base layer is a plain ``nn.Linear``
        and dropout is off, through ``add_kept_concatenation_`` with the concatenation this layer kept from its
        last call with this decision; None, before any work, where those do not hold. Keeps the call's record
        (``KeptLayerCall``), which the next call with the same everything runs through.

        What ``add_lora_multi_`` computes after the base layer, in fewer Python functions and fewer objects read:
        at decode each is a cache miss (a step streams megabytes of weights between two calls of a layer), and
        together they cost more than the arithmetic (docs/design.md, "What it costs on the CPU")."""
        base = self._modules["base_layer"]
        # (autocast would change the base output's dtype; under torch.compile no Python state is kept)
        if not plain_linear(base) or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() \
                or _active_dropouts(self._modules["lora_dropout"]._modules, self.adapter_names):
            return None
        parameters = base._parameters
        result = F.linear(x, parameters["weight"], parameters["bias"])
        calls = self.__dict__.get("_kept_calls")
        before = calls.get(id(decision)) if calls else None
        concatenation = add_kept_concatenation_(result, x, before and before.concatenation, lora_a, lora_b,
                                                self.scalings, index, self.backend) if result.is_contiguous() else None
        if concatenation is None:
            forget_call(calls, decision)
            return add_lora_multi_(result, x, lora_a, lora_b, self.scalings, index, self.backend, True)
        updated = keep_call(calls, self, x, decision, concatenation)
        if updated is not calls:
            self.__dict__["_kept_calls"] = updated
        return result

    def _forget_kept_calls(self) -> None:
        self.__dict__.pop("_kept_calls", None)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "RoutedLoRALinear":
        # model.to / .half / .cpu: a weight's storage may come back at an address a kept copy was keyed by, with
        # new values and its old version (param.data = ...), so every kept copy is rebuilt at its next use
        self._forget_kept_calls()
        forget_kept_copies()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:
        # (pickle and copy.deepcopy: the kept records are derived from these weights, and keyed by their addresses,
        # which a copy's weights do not share)
        state = dict(super().__getstate__())  # (object's default is the live __dict__ itself)
        state.pop("_kept_calls", None)
        return state

    def _adapter_weight_tuples(self) -> tuple[tuple, tuple]:
        """(every adapter's lora_A weight, every lora_B weight), in ``adapter_names`` order, read through the
        module dicts (``nn.Module.__getattr__`` costs about 0.4 us a lookup on this hot path)."""
        a_modules, b_modules = self._modules["lora_A"]._modules, self._modules["lora_B"]._modules
        names = self.adapter_names
        try:
            return (tuple([a_modules[n]._parameters["weight"] for n in names]),
                    tuple([b_modules[n]._parameters["weight"] for n in names]))
        except KeyError:  # a weight that is not a registered parameter (torch's parametrize): the attribute computes it
            return tuple([a_modules[n].weight for n in names]), tuple([b_modules[n].weight for n in names])

    @staticmethod
    def _records_gradients(weights: tuple) -> bool:
        """Whether autograd records this call for some adapter weight: then a batch on the base model or on one
        adapter still runs the multi-adapter op, so every adapter's weights get a gradient, zero where no row
        took it, rather than none (as ``GatedLoRALinear`` does; DDP without ``find_unused_parameters`` needs
        one, and optimizers skip a parameter whose gradient is None)."""
        return torch.is_grad_enabled() and any(w.requires_grad for w in weights)

    def _dropout(self, x: torch.Tensor, names: Sequence[str], index: torch.Tensor | None = None) -> torch.Tensor:
        """x after the LoRA dropout of the adapters ``names``; x itself where dropout is off (eval, p=0).

        Each row takes one adapter, so one dropout over every row is each adapter's dropout on its own rows
        when they share one module setting. Where they differ (in training), each row takes its adapter's
        dropout of x: one pass per adapter with dropout on, selected by ``index`` [M] (each row's position in
        ``names``), as PEFT's mixed batch runs each adapter's dropout on its own sub-batch."""
        modules = self._modules["lora_dropout"]._modules
        active = _active_dropouts(modules, names)
        if not active:
            return x
        if len(active) == len(names) and len({(type(modules[n]), getattr(modules[n], "p", None)) for n in active}) == 1:
            return modules[active[0]](x)
        rows = index.view(x.shape[:-1] + (1,))
        lora_x = x
        for slot, name in enumerate(names):
            if name in active:
                lora_x = torch.where(rows == slot, modules[name](x), lora_x)
        return lora_x

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.ranks().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}]"


def _active_dropouts(modules: dict[str, nn.Module], names: Sequence[str]) -> list[str]:
    """The adapters among ``names`` whose LoRA dropout module changes x: all but PEFT's nn.Identity for p = 0 and
    dropout in eval (one call for every adapter: this runs in every layer call at decode)."""
    active = []
    for name in names:
        module = modules[name]
        if not (isinstance(module, nn.Identity) or (type(module) is nn.Dropout and not module.training)):
            active.append(name)
    return active
