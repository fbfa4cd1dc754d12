"""GatedLoraConfig: how layers are gated and, for fresh adapters, which layers get one."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from torch import nn

from .ops.args import is_real, is_threshold

GATE_MODES = ("sequence", "token", "none")
TRAIN_GATES = (None, "soft", "hard")
BASE_MODES = ("exact", "fused")
BACKENDS = ("auto", "torch", "triton", "cuda")
DEFAULT_THRESHOLD = 0.5


def check_router_layer(router_layer: int, blocks: int) -> None:
    """ValueError unless block ``router_layer`` leaves at least one of the model's ``blocks`` blocks after it for
    the adapter (the router reads block router_layer's output; the adapter runs in the blocks after it)."""
    if router_layer >= blocks - 1:
        raise ValueError(f"router_layer={router_layer} leaves no block for the adapter: the model has {blocks} "
                         f"blocks, so router_layer must be below {blocks - 1}")


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_gate_options(owner: str, gate: Any, threshold: Any, hard: Any, straight_through: Any, backend: Any,
                       base_mode: Any) -> None:
    """The rules for the options a gated layer takes, shared by ``GatedLoraConfig`` and ``GatedLoRALinear`` (which
    may be built without a config): a ValueError naming ``owner.name``, what it must be and what it got."""
    def bad(name: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{owner}.{name} must be {expected}, got {value!r}")

    if gate not in GATE_MODES:
        raise bad("gate", gate, f"one of {GATE_MODES}")
    if not is_threshold(threshold):
        raise bad("threshold", threshold, "a number in (0, 1), above 0 in fp32")
    if not isinstance(hard, bool):
        raise bad("hard", hard, "a bool")
    if not isinstance(straight_through, bool):
        raise bad("straight_through", straight_through, "a bool")
    if backend not in BACKENDS:
        raise bad("backend", backend, f"one of {BACKENDS}")
    if base_mode not in BASE_MODES:
        raise bad("base_mode", base_mode, f"one of {BASE_MODES}")


@dataclass
class GatedLoraConfig:
    """Configuration of a gated LoRA patch (validated on construction).

    The defaults keep the drop-in promise: ``patch_model(model)`` uses token gates and every
    fresh gate (and the default router) starts open, so a freshly patched model computes
    what the PEFT model computed until gates or a router are trained or loaded.
    """

    gate: str = field(default="token", metadata={"help": "Gate source: 'sequence' (one router decision per sequence, "
                      "PRISM), 'token' (sigmoid(w_g . x + b_g) per row and layer), or 'none' (plain LoRA)."})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={"help": "Hard gates open where the probability "
                             "is >= threshold; a NaN probability closes the gate. In (0, 1). Several adapters route "
                             "by argmax: there it stays 0.5."})
    hard: bool = field(default=True, metadata={"help": "0/1 gates (inference) if True; g = p (soft) if False."})
    router_layer: int = field(default=0, metadata={"help": "Sequence gates: the router reads the hidden state after "
                              "this transformer block; the adapter runs only in later layers."})
    router: Optional[nn.Module] = field(default=None, metadata={"help": "Sequence gates: a module mapping hidden "
                                        "states [B, H] to probabilities [B]. Default: PRISM MLP H-128-64-1, GELU, "
                                        "sigmoid, starting open."})
    adapters: Optional[list[str]] = field(default=None, metadata={"help": "Several adapters, one router (gate="
                                          "'sequence', a PEFT model): the names of the PEFT adapters the router "
                                          "chooses among. The router maps hidden states [B, H] to logits "
                                          "[B, len(adapters) + 1]: class 0 the base model, class i adapters[i - 1]; "
                                          "one route per sequence by argmax. Default router: PrismMultiRouter, "
                                          "starting with every sequence on adapters[0]. None: one adapter."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Fresh adapters on a "
                                                            "plain model: module names (suffix match) or a regex "
                                                            "(full match). On a PEFT model: restricts which LoRA "
                                                            "layers are patched."})
    r: int = field(default=16, metadata={"help": "Fresh adapters: LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "Fresh adapters: scaling is lora_alpha / r."})
    lora_dropout: float = field(default=0.0,
                                metadata={"help": "Fresh adapters: dropout on the LoRA input in training."})
    backend: str = field(default="auto", metadata={"help": "Kernel backend: auto, torch, triton or cuda."})
    base_mode: str = field(default="exact", metadata={"help": "'exact': the base layer computes the base output and "
                           "closed rows are bitwise the base model. 'fused': one pass for base matmul and "
                           "adapter where the cuda backend's decode GEMV applies (M <= 16 rows on a GPU); closed "
                           "rows then equal the base model only to rounding; elsewhere exact mode, said once."})
    straight_through: bool = field(default=False, metadata={"help": "Training with hard gates: the gate (token "
                                   "gate weights, router, given gate) gets the gradient of a soft gate (forward hard, "
                                   "backward as g = p). Without it hard gates get no gradient; soft gates always do."})
    train_gate: Optional[str] = field(default=None, metadata={"help": "Gates in training mode (model.train()): "
                                      "'soft' (g = p) or 'hard' (0/1); None follows `hard`. model.eval() always "
                                      "follows `hard`."})

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"GatedLoraConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        check_gate_options("GatedLoraConfig", self.gate, self.threshold, self.hard, self.straight_through, self.backend,
                           self.base_mode)
        self.threshold = float(self.threshold)  # (a NumPy scalar, say: saved as JSON, compared on the host)
        if self.train_gate not in TRAIN_GATES:
            raise bad("train_gate", f"one of {TRAIN_GATES}")
        if not _whole(self.router_layer):
            raise bad("router_layer", "an int >= 0")
        self.router_layer = int(self.router_layer)
        if self.router is not None and not isinstance(self.router, nn.Module):
            raise bad("router", "an nn.Module mapping [B, H] hidden states to [B] probabilities, or None")
        if self.router is not None and self.gate != "sequence":
            raise ValueError(f"GatedLoraConfig.router is used only with gate='sequence', got gate={self.gate!r}")
        if self.router_layer and self.gate != "sequence":
            # token gates sit in every gated layer and no router reads a block: the value would be silently ignored
            raise ValueError(f"GatedLoraConfig.router_layer is used only with gate='sequence' (token gates are in "
                             f"every gated layer), got router_layer={self.router_layer} with gate={self.gate!r}")
        if self.adapters is not None:
            self._check_adapters()
        if self.target_modules is not None:
            ok = isinstance(self.target_modules, str) or (
                isinstance(self.target_modules, (list, tuple)) and self.target_modules
                and all(isinstance(t, str) for t in self.target_modules))
            if not ok:
                raise bad("target_modules", "a non-empty list of module names, a regex string, or None")
            if not isinstance(self.target_modules, str):
                self.target_modules = list(self.target_modules)
        if not _whole(self.r) or self.r < 1:
            raise bad("r", "an int >= 1")
        if not is_real(self.lora_alpha) or not math.isfinite(self.lora_alpha):
            raise bad("lora_alpha", "a finite number")
        if not is_real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        self.r, self.lora_dropout = int(self.r), float(self.lora_dropout)
        alpha = self.lora_alpha
        self.lora_alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)

    def _check_adapters(self) -> None:
        names = self.adapters
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names or not all(
                isinstance(a, str) and a for a in names) or len(set(names)) != len(names):
            raise ValueError(f"GatedLoraConfig.adapters must be a non-empty list of distinct adapter names, got "
                             f"{names!r}")
        self.adapters = list(names)
        if self.gate != "sequence":
            raise ValueError(f"GatedLoraConfig.adapters needs gate='sequence' (one router chooses per sequence), got "
                             f"gate={self.gate!r}")
        soft = [name for name, bad in (("hard=False", not self.hard), ("train_gate='soft'", self.train_gate == "soft"),
                                       ("straight_through=True", self.straight_through),
                                       (f"threshold={self.threshold!r}", self.threshold != DEFAULT_THRESHOLD)) if bad]
        if soft:
            raise ValueError(f"GatedLoraConfig: routes among several adapters are hard (argmax), so {', '.join(soft)} "
                             "does not apply; train the router with gatedlora.train_router")
        if self.base_mode != "exact":
            raise ValueError("GatedLoraConfig: base_mode='fused' is for one adapter; several adapters run in exact "
                             "mode (base_mode='exact')")
        if self.backend == "cuda":
            raise ValueError("GatedLoraConfig: backend='cuda' has no kernel for several adapters; use 'torch', "
                             "'triton' or 'auto' (which chooses between them)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; the router module is recorded by class name only."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "router"}
        out["router"] = None if self.router is None else type(self.router).__name__
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], router: Optional[nn.Module] = None) -> "GatedLoraConfig":
        """Inverse of ``to_dict``; a custom router module must be passed back in by the caller."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GatedLoraConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        values = {k: v for k, v in data.items() if k != "router"}
        # saves from before these were refused where they never had an effect (a value that is bad in itself is
        # left for the checks to name)
        if values.get("gate", "token") != "sequence" and _whole(values.get("router_layer", 0)):
            values["router_layer"] = 0
        if values.get("adapters") is not None and is_threshold(values.get("threshold", DEFAULT_THRESHOLD)):
            values["threshold"] = DEFAULT_THRESHOLD
        return cls(**values, router=router)

    def same_behaviour(self, other: "GatedLoraConfig") -> bool:
        """True when both configs would patch a model the same way (routers compared by identity)."""
        return self.to_dict() == other.to_dict() and self.router is other.router
