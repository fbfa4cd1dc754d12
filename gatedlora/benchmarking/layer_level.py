"""Layer level: one projection's base layer against each adapter path, side by side (``gpu_check`` stage c).

Per (K, N, M, open fraction) every provider runs on the same weights and inputs:

* ``base``: the base ``nn.Linear``;
* ``peft``: PEFT's unmerged ``lora.Linear`` (the adapter on every row);
* ``peft mixed``: PEFT's mixed batch (``adapter_names``, ``"__base__"`` for closed rows);
* ``gatedlora <backend>``: ``base(x)`` then ``gated_lora(..., inplace=True)`` (exact mode);
* ``gatedlora cuda fused``: ``gated_lora_fused`` (one pass for base and adapter; M <= 16).

Times come from ``device_timing.time_call``: ``eager`` for every provider (L2 flushed), ``graph``
(CUDA-graph replay, weights rotated past L2) for the providers that can be captured at decode sizes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .device_timing import rotating, rotation_count, time_call

# Llama-3-8B projections as label -> (K, N, LoRA weight dtype): q/o, k/v (GQA 8 of 32 heads), gate/up, down,
# with the adapter weights PEFT creates on a bf16 model (fp32, None here); q/o also with bf16 adapter weights.
LLAMA3_8B_SHAPES = {"q_proj/o_proj": (4096, 4096, None), "q_proj/o_proj bf16 lora": (4096, 4096, torch.bfloat16),
                    "down_proj": (14336, 4096, None), "gate_proj/up_proj": (4096, 14336, None),
                    "k_proj/v_proj": (4096, 1024, None)}  # in the order a time budget should cut them
ROWS = (1, 8, 64, 512, 4096)
OPEN_FRACTIONS = (0.0, 0.06, 0.75, 1.0)  # PRISM's routing rates: closed, MMLU (6%), safety (75%), all
GRAPH_MAX_ROWS = 64  # decode sizes: host time dominates eager calls there, so they are also timed as graph replays
FUSED_MAX_ROWS = 16  # the cuda backend's one-pass GEMV


@dataclass(frozen=True)
class LayerCase:
    k: int
    n: int
    m: int
    r: int
    dtype: torch.dtype
    open_fraction: float
    lora_dtype: torch.dtype

    @property
    def open_rows(self) -> int:
        return round(self.open_fraction * self.m)

    @property
    def name(self) -> str:
        x, lora = (str(d).replace("torch.", "") for d in (self.dtype, self.lora_dtype))
        return f"K={self.k} N={self.n} M={self.m} r={self.r} x {x} lora {lora} open {self.open_rows}/{self.m}"


class LayerCopies:
    """``count`` independent PEFT LoRA layers of one shape (random weights, B non-zero) and their inputs.

    ``lora_dtype`` None keeps PEFT's own choice: on a bf16/fp16 model it creates fp32 adapter weights
    (``autocast_adapter_dtype``), the case most users run."""

    def __init__(self, k: int, n: int, r: int, dtype: torch.dtype, device: torch.device, count: int, seed: int = 0,
                 lora_dtype: torch.dtype | None = None):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        self.layers = []
        for _ in range(count):
            holder = nn.Sequential()
            holder.add_module("proj", nn.Linear(k, n, bias=False))
            peft = get_peft_model(holder.to(device, dtype), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
            layer = peft.eval().base_model.model.proj
            nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
            if lora_dtype is not None:
                layer.lora_A.to(lora_dtype)
                layer.lora_B.to(lora_dtype)
            self.layers.append(layer)
        self.lora_dtype = self.layers[0].lora_A["default"].weight.dtype
        self.device = device
        self.dtype = dtype
        self.k = k

    def providers(self, m: int, open_fraction: float, backends: list[str],
                  triton_paths: bool = False) -> dict[str, tuple[Callable, bool]]:
        """name -> (function that runs one call, capturable in a CUDA graph). ``triton_paths`` adds the
        triton backend's one-pass and two-pass paths, each forced, beside the one its dispatch picks."""
        from ..ops import gated_lora, gated_lora_fused
        from ..ops import triton_backend as tb
        from ..ops.args import make_args

        open_rows = round(open_fraction * m)
        gen = torch.Generator().manual_seed(m * 1000 + open_rows)
        gate = torch.zeros(m)
        gate[torch.randperm(m, generator=gen)[:open_rows]] = 1.0
        gate = gate.to(self.device)
        names = ["default" if g else "__base__" for g in gate.tolist()]
        xs = [torch.randn(m, self.k, device=self.device, dtype=self.dtype) for _ in self.layers]

        def per_copy(make: Callable) -> Callable:
            return rotating([make(layer, x) for layer, x in zip(self.layers, xs)])

        def adapter(backend: str) -> Callable:
            def make(layer, x):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                scaling = layer.scaling["default"]
                return lambda: gated_lora(x, layer.base_layer(x), a, b, scaling, gate=gate, backend=backend,
                                          inplace=True)
            return per_copy(make)

        def fused(layer, x):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            weight = layer.base_layer.weight
            return lambda: gated_lora_fused(x, weight, None, a, b, layer.scaling["default"], gate=gate, backend="cuda")

        out = {
            "base": (per_copy(lambda layer, x: lambda: layer.base_layer(x)), True),
            "peft": (per_copy(lambda layer, x: lambda: layer(x)), True),
            "peft mixed": (per_copy(lambda layer, x: lambda: layer(x, adapter_names=names)), False),
        }
        for backend in backends:
            # every backend reads nothing on the host on a GPU (the torch backend folds the gate into its
            # matmuls there), so each is captured at decode sizes
            out[f"gatedlora {backend}"] = (adapter(backend), True)
        if "cuda" in backends and m <= FUSED_MAX_ROWS:
            out["gatedlora cuda fused"] = (per_copy(fused), True)
        if triton_paths and "triton" in backends:
            def forced(two_pass: bool) -> Callable:
                def make(layer, x):
                    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                    args = make_args(x, b.shape[0], a, b, layer.scaling["default"], gate, None, None, 0.5, True)
                    if two_pass:
                        tiles, split_k = tb.two_pass_launch(args)
                        return lambda: tb.launch_two_pass(layer.base_layer(x), args, tiles, split_k)
                    tiles, n_split = tb.heuristic_launch(args)
                    return lambda: tb.launch(layer.base_layer(x), args, tiles, n_split)
                return per_copy(make)
            out["gatedlora triton one-pass"] = (forced(False), True)
            out["gatedlora triton two-pass"] = (forced(True), True)
        return out


def unconditional(name: str) -> bool:
    """Providers whose work does not depend on the open fraction (timed once per shape and M)."""
    return name in ("base", "peft")


def run_layer_benchmark(device: torch.device, backends: list[str], shapes: dict[str, tuple] | None = None,
                        rows: tuple[int, ...] = ROWS, fractions: tuple[float, ...] = OPEN_FRACTIONS, r: int = 16,
                        dtype: torch.dtype = torch.bfloat16, budget_s: float = 150.0, rep_ms: float = 40,
                        log: Callable[[str], None] = print,
                        on_case: Callable[[dict], None] = lambda record: None) -> dict:
    """Time every provider of every case; stops (and says so) when ``budget_s`` is spent. ``on_case`` gets each
    case's record as it is done (a caller killed at its time limit keeps those).

    shapes: label -> (K, N, LoRA weight dtype or None for PEFT's default). Fractions that open the same
    number of rows at some M (6% of 8 rows is none) are timed once.

    Returns {"cases": [...], "incomplete": reason or None}; each case holds per provider and mode
    the median, quartiles and ratio to the base layer timed in the same mode and run.
    """
    shapes = shapes or LLAMA3_8B_SHAPES
    started = time.perf_counter()
    cases, incomplete = [], None
    with torch.inference_mode():
        for label, (k, n, lora_dtype) in shapes.items():
            copy_bytes = (k * n + r * (k + n)) * torch.finfo(dtype).bits // 8
            copies = LayerCopies(k, n, r, dtype, device, rotation_count(copy_bytes, device), lora_dtype=lora_dtype)
            for m in rows:
                shared: dict[str, dict] = {}
                seen_open_rows = set()
                for fraction in fractions:
                    if time.perf_counter() - started > budget_s:
                        incomplete = f"time budget of {budget_s:.0f} s spent before {label} M={m}"
                        break
                    case = LayerCase(k, n, m, r, dtype, fraction, copies.lora_dtype)
                    if case.open_rows in seen_open_rows:
                        continue
                    seen_open_rows.add(case.open_rows)
                    both_paths = label.startswith(("q_proj", "tiny"))  # time the triton paths side by side
                    providers = copies.providers(m, fraction, backends, triton_paths=both_paths)
                    timings = {}
                    for name, (fn, capturable) in providers.items():
                        if unconditional(name) and name in shared:
                            timings[name] = shared[name]
                            continue
                        timings[name] = _time_modes(fn, capturable and m <= GRAPH_MAX_ROWS, device, rep_ms)
                        if unconditional(name):
                            shared[name] = timings[name]
                    cases.append(_case_record(label, case, timings))
                    log(_case_line(cases[-1]))
                    on_case(cases[-1])
                if incomplete:
                    break
            del copies
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if incomplete:
                break
    return {"cases": cases, "incomplete": incomplete}


def _time_modes(fn: Callable, capturable: bool, device: torch.device, rep_ms: float) -> dict:
    result = {}
    for mode in ("eager", "graph") if capturable else ("eager",):
        try:
            t = time_call(fn, device, mode, rep_ms=rep_ms)
        except Exception as exc:  # a provider that fails is reported with its reason; the sweep goes on
            result[mode] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            continue
        result[mode] = {"median_us": t.median_s * 1e6, "q1_us": t.q1_s * 1e6, "q3_us": t.q3_s * 1e6, "runs": t.runs}
    return result


def _case_record(label: str, case: LayerCase, timings: dict) -> dict:
    for mode in ("eager", "graph"):
        base = timings.get("base", {}).get(mode, {}).get("median_us")
        for entry in timings.values():
            stats = entry.get(mode)
            if base and stats and "median_us" in stats:
                stats["ratio_to_base"] = stats["median_us"] / base
    return {"projection": label, "name": case.name, "k": case.k, "n": case.n, "m": case.m, "r": case.r,
            "dtype": str(case.dtype).replace("torch.", ""), "lora_dtype": str(case.lora_dtype).replace("torch.", ""),
            "open_fraction": case.open_fraction,
            "open_rows": case.open_rows, "providers": timings}


def _case_line(record: dict) -> str:
    parts = []
    for name, entry in record["providers"].items():
        mode = "graph" if "median_us" in entry.get("graph", {}) else "eager"
        stats = entry.get(mode, {})
        if "median_us" in stats:
            parts.append(f"{name} {stats['median_us']:.1f}us ({stats.get('ratio_to_base', float('nan')):.2f}x {mode})")
        else:
            parts.append(f"{name} failed")
    return f"{record['name']}: " + ", ".join(parts)
