"""The ``gatedlora`` command. ``gatedlora bench``: base path against adapter path on a model.
``gatedlora train-router``: train a PRISM router from labelled prompts (JSONL).
``gatedlora route``: each prompt's route (JSONL), from the blocks the router reads and the router alone."""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

DTYPES = ("float32", "float16", "bfloat16")
LOAD_DTYPES = ("auto",) + DTYPES  # "auto": Transformers' from_pretrained default, the checkpoint's dtype


def load_dtype(name: str):
    """``--dtype`` as from_pretrained takes it: "auto", or a torch dtype."""
    import torch

    return name if name == "auto" else getattr(torch, name)


# What loading --model, --adapter or --router raises for files that are missing, unreadable or made for another
# model: Transformers an OSError for a directory without weights, PEFT a RuntimeError ("size mismatch") for an
# adapter of another model, gatedlora a ValueError. Each becomes one line, not a traceback.
LOAD_ERRORS = (OSError, RuntimeError, ValueError)


def _load_failed(parser: argparse.ArgumentParser, err: Exception, hint: str = "") -> NoReturn:
    message = " ".join(str(err).split())  # PEFT's size mismatch spans lines, one per tensor
    if "size mismatch" in message:
        hint += " (an adapter trained on another model?)"
    parser.error((message if len(message) <= 600 else message[:600] + " ...") + hint)


def _check_writable(parser: argparse.ArgumentParser, flag: str, path: str, directory: bool = False) -> None:
    """The place --flag's output goes (``path`` itself with ``directory``, else its parent, or the nearest existing
    ancestor of either, where a save creates the rest) takes a new file: checked before the work."""
    place = Path(path).resolve() if directory else Path(path).resolve().parent
    while not place.exists():
        place = place.parent
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as err:
        parser.error(f"--{flag} {path}: cannot write in {place} ({err.strerror or err})")


class _Parser(argparse.ArgumentParser):
    """Errors as one line with a hint; the usage block only with --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _silence_progress_bars() -> None:
    """--no-progress: no bar from gatedlora, Transformers (model loading) or the Hugging Face hub."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    disable_progress_bars()


def _bench_parser(sub) -> None:
    from .benchmarking.timing import MIN_ROUNDS

    p = sub.add_parser("bench", help="time the base model against each adapter path (PEFT, PEFT mixed batch, "
                                     "PRISM two-pass, gatedlora per backend), side by side",
                       description="Model-level comparison of the base path and the adapter paths.")
    p.add_argument("--model", metavar="PATH", help="local causal LM directory (default: a built-in "
                   "Llama-architecture config sized for the device)")
    p.add_argument("--adapter", metavar="PATH", help="local PEFT LoRA adapter for --model (default: a fresh "
                   "PRISM-style adapter on the layers after --router-layer)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--backends", help="comma-separated gatedlora backends to time (default: all available)")
    p.add_argument("--router-layer", type=int, default=0, help="router tap layer (default 0)")
    p.add_argument("--budget", type=float, default=1.0, metavar="SECONDS",
                   help=f"timing budget per scenario (default 1.0; at least {MIN_ROUNDS} rounds each)")
    p.add_argument("--quick", action="store_true", help="a few small scenarios (a smoke run, seconds)")
    p.add_argument("--adapters", type=int, metavar="N", help="several adapters, one router: N fresh PEFT adapters "
                   "and each batch's routes spread over them (25%% base), against PEFT's mixed batch, one PEFT "
                   "forward per route group and (decode) PEFT with one adapter on every sequence")
    p.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_bench_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    if args.adapter and not args.model:
        parser.error("--adapter needs --model (an adapter belongs to the model it was trained on)")
    for flag in ("model", "adapter"):
        path = getattr(args, flag)
        if path and not Path(path).is_dir():
            parser.error(f"--{flag} {path}: no such directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if not math.isfinite(args.budget) or args.budget <= 0:  # inf would time the first scenario forever
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.router_layer < 0:
        parser.error(f"--router-layer must be >= 0, got {args.router_layer}")
    if args.adapters is not None and args.adapters < 1:
        parser.error(f"--adapters must be >= 1, got {args.adapters}")
    if args.adapters and args.adapter:
        parser.error("--adapters makes its own fresh adapters; it does not take --adapter")
    if args.adapter is not None:
        _check_adapter_directory(parser, args.adapter)
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is None:
            continue
        if not Path(path).parent.resolve().is_dir():
            parser.error(f"--{flag} {path}: the directory {Path(path).parent} does not exist")
        if Path(path).is_dir():  # checked now: the write comes after the whole run
            parser.error(f"--{flag} {path} is a directory: expected a file name")
        if Path(path).exists() and not args.overwrite:
            parser.error(f"--{flag} {path} exists; pass --overwrite to replace it")
        _check_writable(parser, flag, path)
    if args.plot and not args.plot.endswith(".png"):
        parser.error(f"--plot {args.plot}: expected a .png file name")
    if args.plot:  # checked now, not after minutes of timing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib (or the bench extra)")
    if args.backends:
        from .ops.backends import PREFERENCE

        names = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in names if b not in PREFERENCE]
        if unknown or not names:
            parser.error(f"--backends {args.backends!r}: expected names from {PREFERENCE}")
        args.backends = names
    from .benchmarking.runner import choose_backends

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runnable, reasons = choose_backends(device, args.backends)
    if not runnable:
        parser.error("no gatedlora backend can run here: " + "; ".join(reasons))
    blocks = _bench_model_blocks(parser, args)  # checked now, not after the model is built
    from .config import check_router_layer

    try:
        check_router_layer(args.router_layer, blocks)
    except ValueError as err:
        parser.error(f"--router-layer: {err}")


def _bench_model_blocks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The number of blocks of the model ``gatedlora bench`` will time: --model's config (an error where that
    directory holds no Transformers model), else the built-in default's."""
    if not args.model:
        from .benchmarking.models import CPU_DEFAULT, GPU_DEFAULT

        return min(CPU_DEFAULT.num_hidden_layers, GPU_DEFAULT.num_hidden_layers)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: not a Transformers model directory ({str(err).splitlines()[0]})")
    blocks = getattr(config, "num_hidden_layers", None)
    if not isinstance(blocks, int):
        parser.error(f"--model {args.model}: its config names no num_hidden_layers (a decoder's block count)")
    return blocks


def _run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch

    from .benchmarking.report import format_table, plot, write_json
    from .benchmarking.runner import run_model_benchmark

    if args.no_progress:
        _silence_progress_bars()
        progress = lambda items, **kw: items  # noqa: E731
    else:
        from tqdm.auto import tqdm as progress
    try:
        result = run_model_benchmark(
            model_path=args.model, adapter_path=args.adapter, device=args.device,
            dtype=getattr(torch, args.dtype) if args.dtype else None, quick=args.quick, backends=args.backends,
            router_layer=args.router_layer, budget_s=args.budget, progress=progress, adapters=args.adapters)
    except (OSError, ValueError) as err:  # the model or adapter refused at set-up (a scenario's failure is in the
        _load_failed(parser, err)       # table; any other error is a defect, with its traceback)
    print(format_table(result))
    for flag, write in (("json", write_json), ("plot", plot)):
        if getattr(args, flag):
            try:
                write(result, getattr(args, flag))
            except OSError as err:  # the disk filled, or the directory changed since the check
                parser.error(f"--{flag} {getattr(args, flag)}: {err}")
            print(f"wrote {getattr(args, flag)}")
    failed = [s["name"] for s in result["scenarios"] if s["check"].startswith("FAILED")]
    if failed:
        print(f"error: gatedlora outputs did not match the base model / PEFT in {failed}", file=sys.stderr)
        return 1
    return 0


def _train_router_parser(sub) -> None:
    p = sub.add_parser("train-router", help="train a PRISM router (which prompts go to the adapter) from a JSONL "
                                            "of {\"prompt\": ..., \"label\": 0|1}",
                       description="PRISM step A: hidden states after --router-layer at each prompt's last token "
                                   "(adapter off), a class-weighted router on them, accuracy on a held-out split. "
                                   "With several --adapter NAME=PATH, a router among them and the base model "
                                   "(labels 0..N).")
    p.add_argument("--model", metavar="PATH", required=True, help="local model directory (with its tokenizer)")
    p.add_argument("--data", metavar="FILE.jsonl", required=True,
                   help="one {\"prompt\": str, \"label\": 0|1} per line; 1 = the adapter should answer (with "
                        "several adapters: 0..N, i = the i-th --adapter)")
    p.add_argument("--out", metavar="DIR", help="save the router here (gatedlora.save_pretrained)")
    p.add_argument("--adapter", metavar="PATH | NAME=PATH", action="append",
                   help="local PEFT LoRA adapter for --model (default: a fresh adapter on --target-modules after "
                        "--router-layer, rank 16, alpha 32, as PRISM). Several adapters, one router: repeat as "
                        "--adapter NAME=PATH, in route order (label i is the i-th)")
    p.add_argument("--target-modules",
                   help="fresh adapter: comma-separated module names (default: every linear layer of the model's "
                        "blocks; on Llama q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, as PRISM)")
    p.add_argument("--router", choices=("prism", "two-class"), default="prism",
                   help="prism: Linear(H,128)-GELU-Linear(128,64)-GELU-Linear(64,1), sigmoid (default); "
                        "two-class: Linear(H,256)-GELU-Dropout-Linear(256,2), argmax")
    p.add_argument("--router-layer", type=int, default=0, help="router tap layer (default 0)")
    p.add_argument("--epochs", type=int, default=100, help="passes over the training split (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=64, help="router training minibatch (default 64)")
    p.add_argument("--heldout", type=float, default=0.2, help="held-out fraction per label (default 0.2)")
    p.add_argument("--max-length", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the router's initial weights (and a fresh adapter's), the held-out split, the "
                        "shuffle and dropout: one seed, one router (default 0)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                   help="dtype the model is loaded in (default auto: the checkpoint's, as from_pretrained and "
                        "route load it); train in the dtype the model will run in")
    p.add_argument("--overwrite", action="store_true", help="replace gatedlora files already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_adapter_directory(parser: argparse.ArgumentParser, path: str) -> None:
    """--adapter PATH must be a PEFT adapter directory ("" is not: it would name the current directory)."""
    if not path or not (Path(path) / "adapter_config.json").is_file():
        parser.error(f"--adapter {path!r}: not a PEFT adapter directory (no adapter_config.json)")


def _check_data_file(parser: argparse.ArgumentParser, path: str) -> None:
    """--data PATH must be a regular file (read twice where a prompt has no tokens: a pipe could not be)."""
    data = Path(path)
    if not path or not data.is_file():  # ("" would name the current directory)
        kind = ("no such file" if not path or not data.exists() else "is a directory" if data.is_dir()
                else "is not a regular file (a pipe or a device)")
        parser.error(f"--data {path!r}: {kind}; expected a JSONL file")


def _check_train_router_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    from .router_training import read_router_data

    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such directory")
    args.adapters = _named_adapters(parser, args.adapter or [])
    for path in ([args.adapter[0]] if args.adapter and args.adapters is None else list((args.adapters or {}).values())):
        _check_adapter_directory(parser, path)
    if args.adapters is not None and args.router == "two-class":
        parser.error("--router two-class routes between the base model and one unnamed --adapter DIR; named adapters "
                     "(--adapter NAME=DIR, one or several) are routed by --router prism")
    _check_data_file(parser, args.data)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if args.router_layer < 0:
        parser.error(f"--router-layer must be >= 0, got {args.router_layer}")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be >= 1, got {args.max_length}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive finite number, got {args.lr}")
    if not 0 <= args.heldout < 1:
        parser.error(f"--heldout must be in [0, 1), got {args.heldout}")
    if args.out:
        from .io import CONFIG_NAME, WEIGHTS_NAME

        if Path(args.out).exists() and not Path(args.out).is_dir():
            parser.error(f"--out {args.out} is a file: expected a directory for the router's save")
        existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (Path(args.out) / name).exists()]
        if existing and not args.overwrite:
            parser.error(f"--out {args.out} already holds {existing}; pass --overwrite to replace them")
        _check_writable(parser, "out", args.out, directory=True)
    if args.target_modules is not None:
        args.target_modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
        if not args.target_modules:
            parser.error("--target-modules: expected comma-separated module names")
    classes = 2 if args.adapters is None else len(args.adapters) + 1
    try:
        args.prompts, args.labels = read_router_data(args.data, classes)
    except (ValueError, UnicodeDecodeError) as err:
        parser.error(f"--data: {err}")
    counts = [args.labels.count(c) for c in range(classes)]
    if min(counts) == 0:
        found = ", ".join(f"{n} with {c}" for c, n in enumerate(counts))
        parser.error(f"--data {args.data}: every label 0..{classes - 1} is needed, got rows {found}")


def _named_adapters(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str] | None:
    """--adapter NAME=PATH given (several adapters, one router): {name: path} in order; one --adapter PATH: None."""
    named = [v for v in values if "=" in v]
    if not named:
        if len(values) > 1:
            parser.error("several --adapter values need names: --adapter NAME=PATH for each (label i is the i-th)")
        return None
    if len(named) != len(values):
        parser.error("--adapter: give every adapter as NAME=PATH, or one adapter as PATH")
    from .route_only import BASE_ROUTE

    adapters = dict(v.split("=", 1) for v in values)
    if len(adapters) != len(values) or not all(adapters):
        parser.error(f"--adapter: the names must be distinct and non-empty, got {[v.split('=', 1)[0] for v in values]}")
    if BASE_ROUTE in adapters:  # `gatedlora route` names the base model's route so
        parser.error(f"--adapter: an adapter cannot be named {BASE_ROUTE!r}, the name of the base model's route")
    dotted = [name for name in adapters if "." in name]
    if dotted:  # (torch raised KeyError from inside PEFT's load_adapter)
        parser.error(f"--adapter: adapter names cannot contain '.' (PEFT keeps each adapter as a submodule, whose "
                     f"name cannot), got {dotted}")
    return adapters


def _load_tokenizer(parser: argparse.ArgumentParser, path: str):
    """--model's tokenizer, or a one-line error naming --model (before the model is loaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as err:  # no tokenizer files: transformers' message is about backends
        parser.error(f"--model {path}: no tokenizer could be loaded from it (transformers said: "
                     f"{' '.join(str(err).split())})")


def _load_for_routing(args: argparse.Namespace):
    """The model from --model (causal LM head if the checkpoint has one), patched for sequence gates."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .config import GatedLoraConfig
    from .patching import block_linear_names, patch_model
    from .routing import prism_two_class_router

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_config = AutoConfig.from_pretrained(args.model)
    architectures = getattr(model_config, "architectures", None) or []
    # (the mapping names the causal LM of a type whose class is not "...ForCausalLM": GPT-2's GPT2LMHeadModel, loaded
    # as the bare GPT2Model before, whose module names no adapter or save of the causal LM matched)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(model_config, "model_type", None))
    loader = AutoModelForCausalLM if any(a.endswith("ForCausalLM") or a == causal for a in architectures) else AutoModel
    model = loader.from_pretrained(args.model, dtype=load_dtype(args.dtype)).to(device).eval()
    torch.manual_seed(args.seed)  # the router's (and a fresh adapter's) initial weights, made below
    router = None
    if args.router == "two-class":
        router = prism_two_class_router(model.config.hidden_size).to(device)
    if args.adapters:
        from peft import PeftModel

        (first, path), *others = args.adapters.items()
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, path in others:
            model.load_adapter(path, adapter_name=name)
        config = GatedLoraConfig(gate="sequence", router_layer=args.router_layer, adapters=list(args.adapters))
        model = model.eval()
    elif args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter[0]).eval()
        config = GatedLoraConfig(gate="sequence", router_layer=args.router_layer, router=router)
    else:
        # fresh adapters go only on the blocks after the router's tap layer (patch_model drops the
        # earlier ones), as PRISM trains them
        config = GatedLoraConfig(gate="sequence", router_layer=args.router_layer, router=router, r=16,
                                 lora_alpha=32, target_modules=args.target_modules or block_linear_names(model))
    return patch_model(model, config)


def _run_train_router(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .prompts import PromptsWithoutTokens
    from .router_training import train_router

    if args.no_progress:
        _silence_progress_bars()
    if not args.out:
        print("gatedlora train-router: no --out given: the router is trained and evaluated but not saved "
              "(pass --out DIR to keep it)", file=sys.stderr)
    tokenizer = _load_tokenizer(parser, args.model)
    try:
        model = _load_for_routing(args)
    except LOAD_ERRORS as err:  # e.g. no module matches --target-modules
        _load_failed(parser, err, " (choose some with --target-modules)" if "target_modules" in str(err) else "")
    try:
        result = train_router(model, args.prompts, args.labels, tokenizer, epochs=args.epochs, lr=args.lr,
                              batch_size=args.batch_size, heldout=args.heldout, seed=args.seed,
                              max_length=args.max_length, progress=not args.no_progress, save_to=args.out,
                              overwrite=args.overwrite)
    except PromptsWithoutTokens as err:
        parser.error(_without_tokens(args.data, err))
    except ValueError as err:  # e.g. a training that diverged at this --lr: nothing was saved
        parser.error(str(err))
    except OSError as err:  # the save failed (the disk filled); a save that fails leaves what was there
        parser.error(f"--out {args.out}: the router was trained but not saved: {err}")
    print(result.summary())
    if not args.out:
        print("router not saved: no --out was given", file=sys.stderr)
    return 0


def _route_parser(sub) -> None:
    p = sub.add_parser("route", help="decide each prompt's route (the adapter or the base model) with a trained "
                                     "router, loading only the blocks it reads",
                       description="Route prompts before serving: embeddings, blocks 0..router_layer and the router "
                                   "of a gatedlora save, nothing else. Writes each input row with \"route\" (the "
                                   "adapter's name, or \"base\") and \"probability\" (the router's probability "
                                   "of the adapter) added.")
    p.add_argument("--model", metavar="PATH", required=True, help="local model directory (with its tokenizer)")
    p.add_argument("--router", metavar="DIR", required=True, help="gatedlora save with the trained router "
                   "(gatedlora train-router --out, or gatedlora.save_pretrained)")
    p.add_argument("--data", metavar="FILE.jsonl", required=True, help="one {\"prompt\": str, ...} per line")
    p.add_argument("--out", metavar="FILE.jsonl", required=True, help="the routes, one line per prompt, in order")
    p.add_argument("--adapter-name", default="adapter",
                   help="the route name of prompts sent to the adapter: the name your serving engine knows it "
                        "by (default: adapter). A router for several adapters names them itself (the names it was "
                        "saved with) and writes \"probabilities\" per route instead of \"probability\"")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward (default 32)")
    p.add_argument("--max-length", type=int, help="truncate prompts to this many tokens (as in train-router)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto",
                   help="dtype the model is loaded in (default auto: the checkpoint's, as from_pretrained and "
                        "train-router load it); route in the dtype the full model runs in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--prism-two-class", action="store_true",
                   help="the save names its router TwoClassRouter and it is PRISM's two-class router (as "
                        "train-router --router two-class saved it before that router had a class of its own, "
                        "PrismTwoClassRouter); only for such a save")


def _check_route_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import torch

    from .io import CONFIG_NAME
    from .prompts import prompt_problem, read_jsonl
    from .route_only import BASE_ROUTE

    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if not (Path(args.router) / CONFIG_NAME).is_file():
        parser.error(f"--router {args.router}: not a gatedlora save ({CONFIG_NAME} not found)")
    _check_data_file(parser, args.data)
    if Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory: expected the JSONL file to write the routes to")
    if Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if not Path(args.out).resolve().parent.is_dir():
        parser.error(f"--out {args.out}: the directory {Path(args.out).parent} does not exist")
    _check_writable(parser, "out", args.out)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be >= 1, got {args.max_length}")
    if args.adapter_name == BASE_ROUTE or not args.adapter_name.strip():
        parser.error(f"--adapter-name must be a non-empty name other than {BASE_ROUTE!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    try:
        args.rows = read_jsonl(args.data, prompt_problem)
    except (ValueError, UnicodeDecodeError) as err:
        parser.error(f"--data: {err}")


def _run_route(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json
    import math
    import os
    import secrets

    import torch

    from .prompts import PromptsWithoutTokens
    from .route_only import RouteOnlyModel, route_prompts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _load_tokenizer(parser, args.model)
    try:
        router = _earlier_prism_two_class(parser, args.router) if args.prism_two_class else None
        model = RouteOnlyModel.from_pretrained(args.model, args.router, adapter_name=args.adapter_name,
                                               device=device, dtype=load_dtype(args.dtype), router=router)
    except LOAD_ERRORS as err:
        _load_failed(parser, err)
    try:
        probabilities, indices = route_prompts(model, [row["prompt"] for row in args.rows], tokenizer,
                                               args.batch_size, args.max_length, progress=not args.no_progress)
    except PromptsWithoutTokens as err:
        parser.error(_without_tokens(args.data, err))
    except ValueError as err:  # e.g. a prompt longer than the model takes
        parser.error(str(err))
    routes = model.routes(indices)

    def finite(p: float) -> float | None:  # strict JSON has no NaN: a NaN (routed to the base model) is written null
        return None if math.isnan(p) else p

    if model.route.adapters is None:
        columns = [{"probability": finite(p)} for p in probabilities.tolist()]
    else:
        columns = [{"probabilities": {name: finite(p) for name, p in zip(model.route_names, ps)}}
                   for ps in probabilities.tolist()]
    lines = "".join(json.dumps({**row, "route": route, **column}) + "\n"
                    for row, route, column in zip(args.rows, routes, columns))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:  # a run that fails part way leaves no half-written --out
        tmp.write_text(lines, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as err:  # the disk filled, or the directory changed since the check
        parser.error(f"--out {args.out}: {err}")
    finally:
        tmp.unlink(missing_ok=True)
    counts = {name: routes.count(name) for name in model.route_names[1:]}
    taken = ", ".join(f"{count} to {name!r} ({count / len(routes):.1%})" for name, count in counts.items())
    print(f"routed {len(routes)} prompts: {taken}, {routes.count('base')} to the base model; wrote {args.out}")
    return 0


def _earlier_prism_two_class(parser: argparse.ArgumentParser, path: str):
    """--prism-two-class: a PrismTwoClassRouter shaped as the router saved at ``path``, for RouteOnlyModel to fill."""
    from .io import read_saved, router_state, saved_router_module

    meta, tensors = read_saved(path)
    if meta["config"].get("gate") != "sequence":
        return None  # (RouteOnlyModel names what the save holds instead of a router)
    router = saved_router_module("PrismTwoClassRouter", router_state(tensors))
    if router is None:
        parser.error(f"--prism-two-class: the router saved in {path} is not shaped as prism_two_class_router's "
                     "(net.0 and net.3 Linear layers)")
    return router


def _without_tokens(path: str, err) -> str:
    """The error for prompts of the JSONL file ``path`` that have no tokens (``prompts.PromptsWithoutTokens``),
    named by their lines."""
    from .prompts import jsonl_lines

    lines = [number for number, _ in jsonl_lines(path)]
    named = [lines[row] for row in err.rows[:8] if row < len(lines)]
    more = f" and {len(err.rows) - len(named)} more" if len(err.rows) > len(named) else ""
    return f"--data {path}: the prompts on lines {named}{more} have no tokens (the tokenizer gives none)"


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = _Parser(prog="gatedlora", description="Gated LoRA kernels and tools.")
    parser.add_argument("--version", action="version", version=f"gatedlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _bench_parser(sub)
    _train_router_parser(sub)
    _route_parser(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "bench":
        _check_bench_args(sub.choices["bench"], args)
        return _run_bench(sub.choices["bench"], args)
    if args.command == "train-router":
        _check_train_router_args(sub.choices["train-router"], args)
        return _run_train_router(sub.choices["train-router"], args)
    if args.command == "route":
        _check_route_args(sub.choices["route"], args)
        return _run_route(sub.choices["route"], args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
