"""GatedLoRALinear: a base layer plus a LoRA adapter that runs only where its gate is open."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .call_state import RouteDecision, forced_gate
from .config import check_gate_options
from .module_hooks import plain_linear
from .ops import add_lora_, gated_lora, gated_lora_fused, warn_fused_fallback_once
from .ops.args import check_loaded, is_threshold
from .ops.gates import cpu_scalar, gate_is_open, open_rows, token_gate_probabilities
from .ops.torch_backend import GATHER_MIN_ROWS
from .routing import SequenceRouter, open_logit

# Token gates on fewer rows than this are decided on the host, in the layer (_host_token_gate): below
# GATHER_MIN_ROWS the op folds a given gate in without counting its open rows again
HOST_GATE_ROWS = GATHER_MIN_ROWS


def linear_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of an nn.Linear or a transformers Conv1D (weight [K, N])."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if type(base_layer).__name__ == "Conv1D" and hasattr(base_layer, "nf"):
        k, n = base_layer.weight.shape
        return k, n
    raise TypeError(f"unsupported base layer {type(base_layer).__name__}: expected nn.Linear or transformers Conv1D")


class GatedLoRALinear(nn.Module):
    """``y = base_layer(x) + s * g * B(A(dropout(x)))`` with one gate value g per row of x.

    Submodules keep PEFT's names (``base_layer``, ``lora_A[adapter]``, ``lora_B[adapter]``,
    ``lora_dropout[adapter]``), so state_dict keys and PEFT's ``save_pretrained`` are unchanged;
    for a PEFT layer they are the same module objects (shared, not copied). Token gates add
    ``gate_weight`` [K] and ``gate_bias`` [1]; sequence gates read the model's ``SequenceRouter``.
    In training mode the gates are ``train_hard`` (when set) instead of ``hard``; hard gates pass
    the gradient of a soft gate to the gate when ``straight_through`` (see ``ops/autograd.py``).

    x: [..., K] -> [..., N].
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lora_A: nn.ModuleDict,
        lora_B: nn.ModuleDict,
        lora_dropout: nn.ModuleDict,
        scaling: float,
        adapter_name: str,
        gate: str,
        threshold: float = 0.5,
        hard: bool = True,
        backend: str = "auto",
        route: SequenceRouter | None = None,
        straight_through: bool = False,
        train_hard: bool | None = None,
        base_mode: str = "exact",
    ) -> None:
        super().__init__()
        check_gate_options("GatedLoRALinear", gate, threshold, hard, straight_through, backend, base_mode)
        if train_hard is not None and not isinstance(train_hard, bool):
            raise ValueError(f"GatedLoRALinear.train_hard must be a bool or None, got {train_hard!r}")
        if gate == "sequence" and route is None:
            raise ValueError("GatedLoRALinear: gate='sequence' needs the model's SequenceRouter (route=...)")
        self.base_layer = base_layer
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.lora_dropout = lora_dropout
        self.adapter_name = adapter_name
        self.scaling = float(scaling)
        self.gate_mode = gate
        self.threshold = float(threshold)
        self.hard = hard
        self.train_hard = train_hard  # gates in training mode; None: as in eval (``hard``)
        self.straight_through = straight_through
        self.backend = backend
        self.base_mode = base_mode
        self.in_features, self.out_features = linear_features(base_layer)
        # a plain attribute, not a submodule: the router is registered once, on the model
        self.__dict__["route"] = route
        if gate == "token":
            weight = self.lora_A[adapter_name].weight
            # On the LoRA weights' device, unless they are not loaded yet (PEFT's low_cpu_mem_usage leaves them on
            # meta until load_adapter): then on the base layer's, where load_adapter puts them, and initialised.
            device = weight.device
            if weight.is_meta:
                device = getattr(getattr(base_layer, "weight", None), "device", device)
            self.gate_weight = nn.Parameter(torch.zeros(self.in_features, dtype=weight.dtype, device=device))
            # [1], not 0-dim: FSDP2's fully_shard refuses scalar parameters (the file keeps it 0-dim, see io.py)
            self.gate_bias = nn.Parameter(torch.full((1,), open_logit(threshold), dtype=weight.dtype, device=device))

    @classmethod
    def fresh(cls, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float, **gate_options: Any
              ) -> "GatedLoRALinear":
        """A new adapter on ``base_layer``, initialised as PEFT does: A Kaiming-uniform, B zeros."""
        k, n = linear_features(base_layer)
        weight = base_layer.weight
        lora_a = nn.Linear(k, r, bias=False, device=weight.device, dtype=weight.dtype)
        lora_b = nn.Linear(r, n, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        name = "default"
        return cls(base_layer, nn.ModuleDict({name: lora_a}), nn.ModuleDict({name: lora_b}),
                   nn.ModuleDict({name: dropout}), lora_alpha / r, name, **gate_options)

    @classmethod
    def from_peft(cls, layer: nn.Module, adapter_name: str, **gate_options: Any) -> "GatedLoRALinear":
        """Wrap a ``peft.tuners.lora.Linear``: the same base layer, LoRA modules and scaling."""
        return cls(layer.base_layer, layer.lora_A, layer.lora_B, layer.lora_dropout,
                   layer.scaling[adapter_name], adapter_name, **gate_options)

    @property
    def gates_are_hard(self) -> bool:
        """Whether this forward uses 0/1 gates: ``train_hard`` in training mode when set, else ``hard``."""
        if self.training and self.train_hard is not None:
            return self.train_hard
        return self.hard

    @property
    def forced_gate(self) -> float | None:
        """The value ``force_gate`` imposes on this layer in the calling thread, or None."""
        return forced_gate(self)

    @property
    def rank(self) -> int:
        return self._modules["lora_A"]._modules[self.adapter_name].weight.shape[0]

    # The base layer's weight and bias, read-only, as PEFT's lora.Linear forwards them: models read them from
    # the layers they own (T5's feed-forward reads wo.weight.dtype, Mamba's generate lm_head.weight). Properties,
    # not registered parameters, so state_dict keys stay PEFT's (base_layer.weight).
    @property
    def weight(self) -> torch.Tensor:
        return self._modules["base_layer"].weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._modules["base_layer"].bias

    def _gate_arguments(self, x: torch.Tensor, lora_x: torch.Tensor, forced: float | None,
                        decision: RouteDecision | None) -> dict[str, Any]:
        if forced is not None:
            if forced == 1.0:
                return {}
            return {"gate": torch.full(x.shape[:-1], forced, device=x.device, dtype=torch.float32), "hard": False}
        if self.gate_mode == "token":
            if lora_x is not x:  # dropout is active: the gate reads the clean input
                rows = x.reshape(-1, x.shape[-1])
                return {"gate": token_gate_probabilities(rows, self.gate_weight, self.gate_bias)}
            return {"gate_weight": self.gate_weight, "gate_bias": self.gate_bias}
        if self.gate_mode == "sequence":
            if decision is None:
                decision = self.route.decision()  # raises: not decided yet
            if self.gates_are_hard and not (self.training and self.straight_through):
                if decision.all_open:
                    return {}  # the host saw every gate open (CPU): plain LoRA, no gate gather or row selection
                if x.is_cpu:  # decisions, which the torch backend uses without comparing (the kernels would cast)
                    return {"gate": decision.row_decisions(x)}
            gate = decision.row_gates(x)
            if self.training and not gate.requires_grad and torch.is_grad_enabled():
                self._warn_if_router_cut_off()
            return {"gate": gate, "threshold": decision.threshold}
        return {}

    def _warn_if_router_cut_off(self) -> None:
        """A trainable router whose gate reached this layer without a graph: it ran under no_grad, as
        reentrant gradient checkpointing runs block ``router_layer`` (its recomputation in the
        backward comes after the later layers have already used the gate). Warn once per layer."""
        wants_gradient = not self.gates_are_hard or self.straight_through
        if not wants_gradient or self.__dict__.get("_warned_router_cut_off"):
            return
        if any(p.requires_grad for p in self.route.router.parameters()):
            self.__dict__["_warned_router_cut_off"] = True
            warnings.warn("gatedlora: the router is trainable but its gate reaches the adapter layers without a "
                          "gradient (reentrant gradient checkpointing runs block router_layer under no_grad); "
                          "the router will not learn from this loss. Use gradient_checkpointing_kwargs="
                          "{'use_reentrant': False}, or train the router separately (gatedlora.train_router).",
                          stacklevel=3)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        hard = self.gates_are_hard
        forced = forced_gate(self)
        decision = self.route.in_force() if self.gate_mode == "sequence" else None  # this call's routes
        # The router's all_closed is decided with the configured ``hard``; it also holds for hard
        # gates when the router used soft ones (p == 0 is below any threshold), not the other way round.
        skip_closed = decision is not None and decision.all_closed and (hard or not self.route.hard)
        # No skip while autograd records the adapter: its weights then get a zero gradient rather than
        # none (a loss over a batch routed entirely to base still backpropagates), and straight-through
        # gates learn to open from the closed rows.
        if skip_closed and torch.is_grad_enabled():
            skip_closed = not (self.lora_A[self.adapter_name].weight.requires_grad
                               or self.lora_B[self.adapter_name].weight.requires_grad
                               or (self.straight_through and self.training))
        if forced == 0.0 or (forced is None and skip_closed):
            return self._base(x, args, kwargs)
        host_gate = None
        if self.gate_mode == "token" and forced is None and x.is_cpu and 0 < x.numel() < HOST_GATE_ROWS * x.shape[-1] \
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
                and not torch.is_autocast_enabled("cpu"):
            # (not while compiling: a host read breaks the graph; not under autocast, where the op reads the gate
            # from x in the base output's dtype, at every row count)
            host_gate = self._host_token_gate(x, hard)
            if host_gate is None:
                return self._base(x, args, kwargs)
        lora_x = self._lora_input(x)
        if decision is not None and (decision.open_span is not None or decision.scattered) \
                and self._plain_lora_applies(x, hard, forced, decision):
            if decision.open_span is not None:
                return self._add_to_span(x, lora_x, decision.open_span, args, kwargs)
            if x.numel() < GATHER_MIN_ROWS * x.shape[-1]:
                return self._add_to_open_rows(x, lora_x, decision, args, kwargs)
        # the gate arguments may override hard (a forced gate is a soft one)
        options = host_gate if host_gate is not None else \
            {"threshold": self.threshold, "hard": hard, **self._gate_arguments(x, lora_x, forced, decision)}
        lora_a, lora_b = self._adapter_weights(x)
        if self.base_mode == "fused":
            reason = self._fused_layer_reason(x, lora_x, args, kwargs)
            if reason is None:
                # the op decides (once per configuration) whether its one-pass kernel can run, and warns if not
                return gated_lora_fused(x, self.base_layer.weight, self.base_layer.bias, lora_a, lora_b, self.scaling,
                                        **options, backend=self.backend, straight_through=self.straight_through,
                                        validate=False, warn_fallback=True)
            warn_fused_fallback_once(reason, stacklevel=3)
        if "gate" not in options and "gate_weight" not in options and not torch.is_grad_enabled():
            # plain LoRA outside autograd: no gate, every sequence open, a forced gate of 1, one open row
            result, lora_x = self._writable_base_output(x, lora_x, args, kwargs)
            return add_lora_(result, lora_x, lora_a, lora_b, self.scaling, self.backend)
        result, lora_x, inplace = self._base_output(x, lora_x, args, kwargs)
        # Arguments valid by construction (the layer's own shapes and gates): the op's checks are skipped.
        return gated_lora(lora_x, result, lora_a, lora_b, self.scaling, **options, backend=self.backend,
                          inplace=inplace, straight_through=self.straight_through, validate=False)

    def _plain_lora_applies(self, x: torch.Tensor, hard: bool, forced: float | None, decision: RouteDecision
                            ) -> bool:
        """Whether this call may add plain LoRA to the open sequences' rows (no gate through the op): hard
        gates, nothing forced, no autograd, exact base mode, x batch first."""
        return (forced is None and hard and not torch.is_grad_enabled() and self.base_mode == "exact"
                and x.dim() >= 2 and x.shape[0] == decision.batch)

    def _add_to_span(self, x: torch.Tensor, lora_x: torch.Tensor, span: tuple[int, int], args: tuple, kwargs: dict
                     ) -> torch.Tensor:
        """The base output with plain LoRA added to the sequences ``span[0]..span[1]-1`` (views of x and of
        the output: at decode this costs what every sequence open costs, where masking the closed rows of a
        mixed batch cost 0.04-0.06x the step more; docs/design.md, "Sequence gates on the CPU")."""
        lora_a, lora_b = self._adapter_weights(x)
        result, lora_x = self._writable_base_output(x, lora_x, args, kwargs)
        lo, hi = span  # (slicing costs 1.3 us a view where narrow costs 2.1)
        add_lora_(result[lo:hi], lora_x[lo:hi], lora_a, lora_b, self.scaling, self.backend)
        return result

    def _add_to_open_rows(self, x: torch.Tensor, lora_x: torch.Tensor, decision: RouteDecision, args: tuple,
                          kwargs: dict) -> torch.Tensor:
        """The base output with plain LoRA added to x whose closed sequences' rows are zeroed first (a where: an
        inf or NaN there stays out). A closed row then gets ``+0.0`` added, as in the op's folded strategy (an
        exact -0.0 comes back +0.0). For few rows on the CPU, where the decisions are on the host, when the
        open sequences are not one slice: one where and plain LoRA cost less than the op's way with a gate
        (docs/design.md, "Sequence gates on the CPU")."""
        lora_a, lora_b = self._adapter_weights(x)
        result, lora_x = self._writable_base_output(x, lora_x, args, kwargs)
        opened = decision.open_rows_column(x)
        return add_lora_(result, torch.where(opened, lora_x, cpu_scalar(0.0, lora_x.dtype)), lora_a, lora_b,
                         self.scaling, self.backend)

    def _base(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The base layer's output for x. A plain ``nn.Linear`` that nothing hooks or replaces is ``F.linear``
        with its weight and bias, which is what its forward runs: called directly, without the three
        Python frames of a module call (about 3 us a layer at decode sizes, 0.01x of a decode step here)."""
        base = self._modules["base_layer"]
        if not (args or kwargs) and plain_linear(base):
            parameters = base._parameters
            return F.linear(x, parameters["weight"], parameters["bias"])
        return base(x, *args, **kwargs)

    def _base_output(self, x: torch.Tensor, lora_x: torch.Tensor, args: tuple, kwargs: dict
                     ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(the base layer's output, the LoRA input in its dtype, whether the term may be added in place)."""
        modules = self._modules
        result = self._base(x, args, kwargs)
        if not isinstance(result, torch.Tensor):  # (a subclass with a forward of its own: an MoE router's tuple)
            raise TypeError(
                f"gatedlora: this layer's base layer ({type(modules['base_layer']).__name__}) returned a "
                f"{type(result).__name__}, not a tensor, so there is no output to add an adapter's term to; leave "
                "it out of target_modules")
        if lora_x.dtype != result.dtype:  # autocast: the base ran in a lower precision than x
            lora_x = lora_x.to(result.dtype)
        # In place unless someone else may hold the base output: a forward hook on the base layer sees (and
        # may keep) that very tensor, which an in-place add would change under it.
        inplace = not (modules["base_layer"]._forward_hooks or nn.modules.module._global_forward_hooks)
        return result, lora_x, inplace

    def _writable_base_output(self, x: torch.Tensor, lora_x: torch.Tensor, args: tuple, kwargs: dict
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the base layer's output, or a copy where someone else may hold it; the LoRA input in its dtype):
        for the paths that add plain LoRA outside autograd."""
        result, lora_x, inplace = self._base_output(x, lora_x, args, kwargs)
        return (result if inplace else result.clone()), lora_x

    def _host_token_gate(self, x: torch.Tensor, hard: bool) -> dict[str, Any] | None:
        """A few rows on the CPU without autograd: the token gates decided on the host (no device to sync with),
        from x itself (as the op would: LoRA dropout does not reach the gate), before the base layer and the
        rest of the layer's work. Every row closed: None (the caller runs the base layer alone). Else the op's
        options: plain LoRA for hard gates all open, the decisions as a given gate for a mix (which the op
        folds in without counting again, below GATHER_MIN_ROWS rows), the probabilities for soft gates.

        Why before the base layer: every op right after a large memory-bound GEMV costs about 13 us more than
        before it (one core, K=N=2048: x.sum() 13 us, the gate's ops 27 us against a 680 us GEMV); a closed
        row costs 1.04-1.06x the base layer this way, 1.07-1.09x with the gate decided after it. Why not in the
        op: at M=8 the op's frames around the same count and matmuls cost more than the arithmetic (one core,
        K=N=64 r=8, every gate open: 66 us a layer call through the op against PEFT's 50)."""
        threshold, parameters = self.threshold, self._parameters
        rows = x.reshape(-1, x.shape[-1])
        p = token_gate_probabilities(rows, parameters["gate_weight"], parameters["gate_bias"])
        if rows.shape[0] == 1:  # (one read of the value)
            if not gate_is_open(p, threshold, hard):
                return None
            return {"threshold": threshold, "hard": True} if hard else \
                {"threshold": threshold, "hard": False, "gate": p}
        if hard:
            # the common cases, every row open or every row closed, from the smallest and the largest
            # probability: one reduction, where comparing and counting are two calls and a frame (host time at
            # M=8, K=N=64 on one core: a layer call 44-49 us against 50-55). A NaN makes both NaN: then counted.
            lowest, highest = torch.aminmax(p)
            if gate_is_open(lowest, threshold, True):
                return {"threshold": threshold, "hard": True}
            if not gate_is_open(highest, threshold, True) and highest.item() == highest.item():
                return None
        is_open = open_rows(p, threshold, hard)
        opened = is_open.count_nonzero().item()
        if opened == 0:
            return None
        if not hard:
            return {"threshold": threshold, "hard": False, "gate": p}
        return {"threshold": threshold, "hard": True, "gate": is_open}

    # Host time matters here (docs/design.md, "The hot path"): each nn.Module attribute lookup costs about
    # 0.4 us (Module.__getattr__), so the helpers below read the submodule and parameter dicts directly.

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """x after LoRA dropout; x itself when dropout is off (eval, p=0), without calling the module."""
        dropout = self._modules["lora_dropout"]._modules[self.adapter_name]
        if isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and not dropout.training):
            return x
        return dropout(x)

    def _adapter_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A weight [r, K], lora_B weight [N, r]) of the adapter, for the call on x."""
        modules = self._modules
        lora_a = modules["lora_A"]._modules[self.adapter_name]
        lora_b = modules["lora_B"]._modules[self.adapter_name]
        weight_a, weight_b = lora_a._parameters.get("weight"), lora_b._parameters.get("weight")
        if weight_a is None or weight_b is None:  # not registered parameters (a parametrization): the attribute
            weight_a, weight_b = lora_a.weight, lora_b.weight
        if weight_a.is_meta or weight_b.is_meta:  # (0.2 us a call; check_loaded says why)
            check_loaded((weight_a, weight_b), x, "gatedlora")
        return weight_a, weight_b

    def _fused_layer_reason(self, x: torch.Tensor, lora_x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """Why base_mode="fused" cannot hand this call to ``gated_lora_fused`` (None: it can)."""
        if type(self.base_layer) is not nn.Linear:
            return f"the base layer is a {type(self.base_layer).__name__}, not an nn.Linear"
        if args or kwargs:
            return "the base layer was called with extra arguments"
        if lora_x is not x:
            return "LoRA dropout is active (training)"
        return None

    def __setstate__(self, state: dict) -> None:
        if "threshold" in state:  # a layer pickled before the threshold was checked on assignment
            state["_threshold"] = state.pop("threshold")
        super().__setstate__(state)

    @property
    def threshold(self) -> float:
        """Where hard token gates open (``p >= threshold``); sequence gates use their router's."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        # (GatedLoraConfig's rule: a threshold of 1e-46 is 0 in fp32, where the kernels compare, and opens p = 0)
        if not is_threshold(value):
            raise ValueError(f"{type(self).__name__}.threshold must be a number in (0, 1), above 0 in fp32, "
                             f"got {value!r}")
        self._threshold = float(value)

    def extra_repr(self) -> str:
        # (sequence gates: the router's, which the routes use and get_router(model).threshold sets)
        threshold = self.route.threshold if self.gate_mode == "sequence" else self.threshold
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.rank}, "
                f"gate={self.gate_mode!r}, threshold={threshold}, hard={self.hard}"
                + (f", train_hard={self.train_hard}" if self.train_hard is not None else "")
                + (", straight_through=True" if self.straight_through else "")
                + (f", base_mode={self.base_mode!r}" if self.base_mode != "exact" else ""))
