"""CPU diagnostic probe: where gatedlora's decode step with several adapters spends what PEFT's one-adapter step
does not (docs/design.md, "Several adapters, one router"). Not part of the package.

    python benchmarks/probes/multi_decode_probe.py [--rounds 15] [--steps 50]
    python benchmarks/probes/multi_decode_probe.py --callgrind OUT [--steps 10] [--l2-bytes 2097152]

The bench model (``models.CPU_DEFAULT``, hidden 256, adapters in blocks 1-3: 21 projections), four rank-16
adapters, 8 sequences routed as ``gatedlora bench --adapters 4`` routes them, one decode step at a fixed context
(the bench's ``decode_stepper``), one thread, wall time, providers interleaved over ``--rounds`` rounds, medians
over base. Providers:

* ``base``, ``peft one adapter``, ``gatedlora``: as in the bench.
* ``gatedlora, concatenation kept``: the layers before they kept a record of their last call (``kept_call``
  declining): every call reads the routing state, the adapters' weights through the modules and the settings,
  then adds with the concatenation the layer kept (``RoutedLoRALinear._add_kept_on_cpu``).
* ``gatedlora through the op``: the layers' mixed-batch path before they kept a concatenation each
  (``RoutedLoRALinear._add_kept_on_cpu`` declining too: the base layer and dropout through their methods, then
  ``add_lora_multi_``).
* ``peft floor``: PEFT's layer forward replaced by its arithmetic alone (base linear, A, B, scale, add), no host code.
* ``floor``: gatedlora's layer forward replaced by its arithmetic alone (base linear; ``x A_cat^T``; the column
  mask; ``addmm_`` with ``B_cat^T``), each layer's concatenation and mask looked up once, before timing.
* ``floor +routing``: + the reads every call makes of the routing state (forced gate, the decision in force, its
  uniform route, grad mode).
* ``floor +weights``: + reading the adapters' weight objects through the modules (``_adapter_weight_tuples``).
* ``floor +versions``: + each weight's version counter and data pointer (what keeps the concatenation in sync).
* ``floor, step reads``: ``floor +routing`` in the layers, with the reads that keep every layer's concatenation
  current made once per step for all 21 layers in one loop before the step (``multi_weights.concatenated`` on
  the weights read through the modules): whether the reads cost less together, outside the layer calls. That
  loop's time before each step, and repeated on its own, are printed too.

The stripped forwards are correct only for this model and this batch (they skip every check); they bound what
host code can give. Also printed: the KV cache's ``torch.cat`` time per step in each of the three real providers
(a wrapper around transformers' cache code, in steps apart from the timed rounds), the same work in every model.

``--callgrind OUT`` counts instead of timing, because wall time on a shared machine moves these ratios by more
than the differences they are asked about: the probe reruns itself under valgrind's callgrind (``apt install
valgrind``; it needs ``cc`` for the client requests), instrumented only while each variant runs ``--steps`` decode
steps (after 3 uninstrumented and 3 instrumented warm-up steps), with the caches simulated (the last level set to
``--l2-bytes``, 16-way, as the per-core L2 of the machine measured, so that a last-level miss is an L2 miss). The
dumps go to ``OUT.<n>``; the probe then prints per step: instructions, L1 misses, L2 misses and mispredicted
branches, split into MKL's BLAS kernels, ATen's other CPU kernels and the rest (the interpreter, the dispatcher,
allocation: host code). Near deterministic: two runs gave the same instruction counts to within 0.5% (0.2% a
step), the BLAS kernels' misses to within 2%, the host code's to within 4%, the ATen loops' (mostly the KV cache's
copy) to within 10%, up to 13K lines a step (where allocations land moves them). It takes about 30 minutes, most
of it setting up the model under valgrind. Both modes print the bytes of the weights a step reads in the patched
projections.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from operator import attrgetter
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers.cache_utils as cache_utils

import gatedlora.routed_layer as routed_layer
from gatedlora.benchmarking.models import CPU_DEFAULT, build_llama
from gatedlora.benchmarking.multi_adapter import (MultiScenario, build_multi_setup, make_multi_batch,
                                                  multi_decode_providers)
from gatedlora.call_state import forced_gate
from gatedlora.ops import multi_weights

_version = attrgetter("_version")


def stripped_forward(level: int, kept: dict):
    """A RoutedLoRALinear forward doing the arithmetic and the host work up to ``level`` (0 floor, 1 routing,
    2 weights, 3 versions)."""
    def forward(self, x, *args, **kwargs):
        base_weight, a_t, b_t, not_owned = kept[id(self)]
        if level >= 1:
            decision = self.route.in_force()
            if forced_gate(self) == 0.0 or decision.uniform_route is not None or torch.is_grad_enabled():
                raise AssertionError("the probe's batch is mixed and runs without grad")
        if level >= 2:
            lora_a, lora_b = self._adapter_weight_tuples()
            if level >= 3:
                weights = lora_a + lora_b
                (multi_weights._epoch, tuple(map(torch.Tensor.data_ptr, weights)), tuple(map(_version, weights)))
        out = F.linear(x, base_weight)
        u = torch.mm(x.view(-1, x.shape[-1]), a_t)
        u.masked_fill_(not_owned, 0)
        out.view(-1, out.shape[-1]).addmm_(u, b_t)
        return out
    return forward


def declined(*args):  # RoutedLoRALinear._add_kept_on_cpu, or routed_layer.kept_output, declining every call
    return None


def peft_floor(self, x, *args, **kwargs):
    name = self.active_adapters[0]
    out = F.linear(x, self.base_layer.weight)
    return out + F.linear(F.linear(x, self.lora_A[name].weight), self.lora_B[name].weight) * self.scaling[name]


CALLGRIND_REQUESTS = """#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; }
void zero(void) { CALLGRIND_ZERO_STATS; }
void dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
void stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""
REQUESTS_LIBRARY = "GATEDLORA_PROBE_CALLGRIND_REQUESTS"  # set by the probe for its own run under valgrind
EVENTS = ("Ir", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bcm", "Bim")
# Function names that are computation rather than host code: MKL's BLAS kernels, and ATen's loops over elements
# (TensorIterator's callbacks, the CPU flash attention, the vectorized reductions).
BLAS = re.compile(r"mkl_")
ATEN_LOOPS = re.compile(r"callback_fn<|cpu_flash_attention<.*lambda|vectorized_inner_sum")


def run_under_callgrind(options) -> None:
    """Rerun this probe under callgrind, then print the counts from its dumps."""
    taken = [path for path in Path(options.callgrind).parent.glob(Path(options.callgrind).name + "*")]
    if taken:
        raise SystemExit(f"--callgrind {options.callgrind}: {taken[0]} exists; give a new prefix")
    with tempfile.TemporaryDirectory() as directory:
        source, library = Path(directory, "requests.c"), Path(directory, "requests.so")
        source.write_text(CALLGRIND_REQUESTS)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library), str(source)], check=True)
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes", "--branch-sim=yes",
                        f"--LL={options.l2_bytes},16,64", f"--callgrind-out-file={options.callgrind}",
                        sys.executable, __file__, "--steps", str(options.steps)],
                       env=dict(os.environ, **{REQUESTS_LIBRARY: str(library)}), check=True)
    print_callgrind_counts(options.callgrind, options.steps)


def dump_counts(path: Path) -> tuple[str, dict]:
    """A dump's label and its events summed over all functions, BLAS kernels and ATen loops."""
    text = path.read_text()
    label = re.search(r"^desc: Trigger: Client Request: (.+)$", text, re.M).group(1)
    events = re.search(r"^events: (.+)$", text, re.M).group(1).split()
    totals = dict(zip(events, map(int, re.search(r"^totals: (.+)$", text, re.M).group(1).split())))
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100",
                                "--show=" + ",".join(EVENTS), str(path)],
                               capture_output=True, text=True, check=True).stdout
    parts = {"all": [totals.get(event, 0) for event in EVENTS], "blas": [0] * len(EVENTS),
             "aten loops": [0] * len(EVENTS)}
    for line in annotated.splitlines():
        part = "blas" if BLAS.search(line) else "aten loops" if ATEN_LOOPS.search(line) else None
        if part is None or "PROGRAM TOTALS" in line:
            continue
        values = [0 if token == "." else int(token.replace(",", "")) for token in line.split()
                  if token == "." or re.fullmatch(r"[\d,]+", token)][:len(EVENTS)]
        parts[part] = [total + value for total, value in zip(parts[part], values)]
    parts["host"] = [whole - blas - loops for whole, blas, loops in zip(parts["all"], parts["blas"],
                                                                          parts["aten loops"])]
    return label, parts


def print_callgrind_counts(prefix: str, steps: int) -> None:
    dumps = sorted(Path(prefix).parent.glob(Path(prefix).name + ".*"), key=lambda path: int(path.suffix[1:]))
    counts = dict(dump_counts(path) for path in dumps)
    per_step = {label: {part: dict(zip(EVENTS, (value / steps for value in values))) for part, values in parts.items()}
                for label, parts in counts.items()}
    base = per_step["base"]
    l2 = lambda event: event["ILmr"] + event["DLmr"] + event["DLmw"]  # noqa: E731
    print(f"callgrind, per decode step ({steps} steps a variant). L1 miss: I1mr+D1mr+D1mw; L2 miss: the simulated "
          "last level, ILmr+DLmr+DLmw; mispredicted: Bcm+Bim; over base: the part's instructions and L2 misses minus "
          "base's same part, over base's whole step (the parts' figures add up to the step's)")
    print(f"  {'variant':18s} {'part':10s} {'instructions':>12s} {'L1 miss':>9s} {'L2 miss':>9s} {'mispred':>9s}"
          f"  {'Ir over base':>12s} {'L2 over base':>12s}")
    for label, parts in per_step.items():
        for part in ("blas", "aten loops", "host", "all"):
            event, base_event = parts[part], base[part]
            print(f"  {label:18s} {part:10s} {event['Ir']:12.0f} {event['I1mr'] + event['D1mr'] + event['D1mw']:9.0f}"
                  f" {l2(event):9.0f} {event['Bcm'] + event['Bim']:9.0f}"
                  f"  {(event['Ir'] - base_event['Ir']) / base['all']['Ir']:+12.3f}"
                  f" {(l2(event) - l2(base_event)) / l2(base['all']):+12.3f}")


def print_weight_bytes(lora_layers) -> None:
    """What a decode step's arithmetic has to read in the patched projections: base and adapter weights."""
    nbytes = lambda tensor: tensor.numel() * tensor.element_size()  # noqa: E731
    base = sum(nbytes(layer.base_layer.weight) for layer in lora_layers)
    adapters = [sum(nbytes(layer.lora_A[name].weight) + nbytes(layer.lora_B[name].weight) for layer in lora_layers)
                for name in lora_layers[0].lora_A]
    print(f"weights of the {len(lora_layers)} patched projections: base {base / 2**20:.2f} MiB; adapters "
          f"{', '.join(f'{size / 2**20:.2f}' for size in adapters)} MiB, together {sum(adapters) / 2**20:.2f} MiB "
          f"({sum(adapters) / base:.0%} of base; one adapter {adapters[0] / base:.0%})", flush=True)


def count_steps(step, steps: int, label: str, requests) -> None:
    """``steps`` calls of ``step`` counted by callgrind into a dump labelled ``label``."""
    for _ in range(3):  # uninstrumented: fill the lazy caches of the Python and torch code
        step()
    requests.start()
    for _ in range(3):  # instrumented, not counted: fill the simulated caches, which start empty
        step()
    requests.zero()
    for _ in range(steps):
        step()
    requests.dump(label.encode())
    requests.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps a measurement (default 50 timed, 10 under --callgrind)")
    parser.add_argument("--callgrind", metavar="OUT", help="count under callgrind into OUT.<n> instead of timing")
    parser.add_argument("--l2-bytes", type=int, default=2 * 1024 * 1024,
                        help="the simulated last-level cache: the L2 per core (2 MiB on the machine measured)")
    options = parser.parse_args()
    requests_library = os.environ.get(REQUESTS_LIBRARY)
    options.steps = options.steps or (10 if options.callgrind or requests_library else 50)
    if options.callgrind:
        return run_under_callgrind(options)
    requests = ctypes.CDLL(requests_library) if requests_library else None
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    setup = build_multi_setup(build_llama(CPU_DEFAULT, torch.device("cpu"), torch.float32), 0, ["torch"], 4)
    ids, mask, routes = make_multi_batch(MultiScenario("decode", 8, 128, 4), setup.vocab_size, torch.device("cpu"))
    layer_class = routed_layer.RoutedLoRALinear
    peft_class = type(next(m for m in setup.peft.modules() if hasattr(m, "lora_A")))
    print_weight_bytes([m for m in setup.peft.modules() if isinstance(m, peft_class)])
    real_forward, real_peft_forward = layer_class.forward, peft_class.forward
    real_kept_path, real_kept_call = layer_class._add_kept_on_cpu, routed_layer.kept_output
    kept: dict = {}
    indices: dict = {}  # each layer's row index: what the step's loop passes to concatenated

    def keep_concatenation(layer, index):  # what the stripped forwards look up
        a_t, b_t, not_owned, *_ = multi_weights.concatenated(*layer._adapter_weight_tuples(), layer.scalings, index,
                                                             True)
        kept[id(layer)] = (layer.base_layer.weight, a_t, b_t, not_owned)

    def keep(self, x, *args, **kwargs):  # one real call per layer
        index = indices[self] = self.route.in_force().row_adapters(x, self._buffers["route_slot_table"])
        keep_concatenation(self, index)
        return real_forward(self, x, *args, **kwargs)

    variants = {"base": ("base", None, None), "peft one adapter": ("peft one adapter", None, None),
                "peft floor": ("peft one adapter", None, peft_floor), "gatedlora": ("gatedlora torch", None, None)}
    for level, name in enumerate(("floor", "floor +routing", "floor +weights", "floor +versions")):
        variants[name] = ("gatedlora torch", stripped_forward(level, kept), None)
    variants["floor, step reads"] = ("gatedlora torch, step reads", stripped_forward(1, kept), None)
    variants["gatedlora, concatenation kept"] = ("gatedlora torch", None, None)
    variants["gatedlora through the op"] = ("gatedlora torch", None, None)
    seconds = {name: [] for name in variants}
    cat_seconds = {name: 0.0 for name in ("base", "peft one adapter", "gatedlora")}
    real_cat = torch.cat

    class TimedTorch:  # transformers' cache code calls torch.cat through its module's ``torch``
        def __getattr__(self, attribute):
            return getattr(torch, attribute)

        @staticmethod
        def cat(*args, **kwargs):
            started = time.perf_counter()
            result = real_cat(*args, **kwargs)
            current[0] += time.perf_counter() - started
            return result

    current = [0.0]
    with torch.inference_mode():
        providers = multi_decode_providers(setup, ids, mask, routes)[0]
        loop_seconds = []

        def read_every_layer():
            for layer, index in indices.items():
                keep_concatenation(layer, index)

        def step_reads(step=providers["gatedlora torch"]):
            started = time.perf_counter()
            read_every_layer()
            loop_seconds.append(time.perf_counter() - started)
            return step()

        providers["gatedlora torch, step reads"] = step_reads

        def select(name):  # a variant's forwards put in place; its step
            provider, forward, peft_forward = variants[name]
            layer_class.forward = forward or real_forward
            peft_class.forward = peft_forward or real_peft_forward
            layer_class._add_kept_on_cpu = declined if name == "gatedlora through the op" else real_kept_path
            routed_layer.kept_output = declined if name in ("gatedlora through the op",
                                                            "gatedlora, concatenation kept") else real_kept_call
            return providers[provider]

        layer_class.forward = keep
        providers["gatedlora torch"]()
        layer_class.forward = real_forward
        try:
            if requests is not None:
                for name in variants:
                    count_steps(select(name), options.steps, name, requests)
                return
            for _ in range(options.rounds):
                for name in variants:
                    step = select(name)
                    for _ in range(5):
                        step()
                    started = time.perf_counter()
                    for _ in range(options.steps):
                        step()
                    seconds[name].append((time.perf_counter() - started) / options.steps)
            layer_class.forward, peft_class.forward = real_forward, real_peft_forward
            layer_class._add_kept_on_cpu, routed_layer.kept_output = real_kept_path, real_kept_call
            alone = []
            for _ in range(200):
                started = time.perf_counter()
                read_every_layer()
                alone.append(time.perf_counter() - started)
            cache_utils.torch = TimedTorch()  # apart from the timed rounds: the wrapper costs host time
            for name in cat_seconds:
                step = providers[variants[name][0]]
                step()
                current[0] = 0.0
                for _ in range(options.steps):
                    step()
                cat_seconds[name] = current[0] / options.steps
        finally:
            layer_class.forward, peft_class.forward, cache_utils.torch = real_forward, real_peft_forward, torch
            layer_class._add_kept_on_cpu, routed_layer.kept_output = real_kept_path, real_kept_call
    base = statistics.median(seconds["base"])
    print(f"decode step, batch 8, 4 adapters (routes {routes.tolist()}), {options.rounds} rounds x {options.steps} "
          f"steps, one thread; median time / base ({base * 1e3:.3f} ms):")
    for name, values in seconds.items():
        print(f"  {name:29s} {statistics.median(values) / base:.3f}")
    print(f"the step reads' loop: {statistics.median(loop_seconds) * 1e6:.0f} us a step, "
          f"{statistics.median(alone) * 1e6:.0f} us repeated on its own (medians)")
    print("KV cache torch.cat per step (ms):", ", ".join(f"{name} {value * 1e3:.3f}"
                                                     for name, value in cat_seconds.items()))


if __name__ == "__main__":
    main()
