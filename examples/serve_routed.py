"""Route with gatedlora, generate with a serving engine: one request per prompt, the route as the model.

    gatedlora route --model BASE_DIR --router ROUTER_DIR --data prompts.jsonl --out routes.jsonl \\
        --adapter-name ADAPTER
    python examples/serve_routed.py --routes routes.jsonl --url http://127.0.0.1:8000 \\
        --base-model BASE_NAME --out answers.jsonl

or in one step, routing in this process with ``gatedlora.route_only.RouteOnlyModel``:

    python examples/serve_routed.py --model BASE_DIR --router ROUTER_DIR --data prompts.jsonl \\
        --adapter-name ADAPTER --url http://127.0.0.1:8000 --base-model BASE_NAME

Each routed prompt (``{"prompt": ..., "route": "base" or an adapter name, ...}``) becomes one
request to the engine's OpenAI-compatible server: ``POST /v1/completions`` (``/v1/chat/completions`` with
``--chat``) whose ``model`` is the adapter's name when routed to an adapter and ``--base-model`` when routed
to the base model. The engine must serve the adapter under that name:

- vLLM: ``vllm serve BASE --enable-lora --lora-modules ADAPTER=PATH``; the base model is BASE (or its
  ``--served-model-name``);
- SGLang: ``--enable-lora --lora-paths ADAPTER=PATH``, with ``--adapter-model "{base}:{adapter}"``;
- TGI: ``LORA_ADAPTERS=ADAPTER`` (the adapter's id), and ``--base-model tgi`` (TGI reads any other
  ``model`` as an adapter id).

Requests go out ``--concurrency`` at a time, so the engine can batch them, base and adapter requests
together. Answers are written in input order, each line the route row plus ``"answer"``.
Standard library only (urllib).
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE_ROUTE = "base"


def engine_model(route: str, base_model: str, adapter_model: str = "{adapter}") -> str:
    """The ``model`` field for a route: ``base_model`` for the base route, else ``adapter_model`` filled in."""
    if route == BASE_ROUTE:
        return base_model
    return adapter_model.format(adapter=route, base=base_model)


def request_body(prompt: str, model: str, chat: bool, sampling: dict) -> dict:
    """An OpenAI completions (or chat completions) request for one prompt."""
    if chat:
        return {"model": model, "messages": [{"role": "user", "content": prompt}], **sampling}
    return {"model": model, "prompt": prompt, **sampling}


def answer_text(response: dict, chat: bool) -> str:
    """The generated text of an OpenAI (chat) completions response."""
    choice = response["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def post_json(url: str, body: dict, timeout: float, api_key: str | None = None) -> dict:
    """POST ``body`` as JSON to ``url``; the decoded JSON reply. An HTTP error raises with the server's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{url} answered {err.code} for model {body.get('model')!r}: {detail}") from None


def read_routes(path: str) -> list[dict]:
    """The rows of a ``gatedlora route`` output; each needs a string ``prompt`` and ``route``."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                    row.get("route"), str):
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": str, \"route\": str, ...}}, "
                                 f"got {line[:80]!r}")
            rows.append(row)
    return rows


def route_here(model: str, router: str, data: str, adapter_name: str, batch_size: int) -> list[dict]:
    """Route the prompts of ``data`` in this process: each row with ``route`` and ``probability`` added."""
    from transformers import AutoTokenizer

    from gatedlora.prompts import prompt_problem, read_jsonl
    from gatedlora.route_only import RouteOnlyModel, route_prompts

    rows = read_jsonl(data, prompt_problem)
    route_only = RouteOnlyModel.from_pretrained(model, router, adapter_name=adapter_name)
    probabilities, decisions = route_prompts(route_only, [row["prompt"] for row in rows],
                                             AutoTokenizer.from_pretrained(model), batch_size, progress=False)
    return [{**row, "route": route, "probability": p}
            for row, route, p in zip(rows, route_only.routes(decisions), probabilities.tolist())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", help="JSONL written by `gatedlora route`")
    parser.add_argument("--model", help="or route here: the model directory (blocks 0..router_layer are loaded)")
    parser.add_argument("--router", help="... the gatedlora save with the router")
    parser.add_argument("--data", help="... the prompts, one {\"prompt\": str, ...} per line")
    parser.add_argument("--adapter-name", default="adapter", help="... the adapter's route name (default adapter)")
    parser.add_argument("--batch-size", type=int, default=32, help="... prompts per routing forward")
    parser.add_argument("--url", required=True, help="the engine's server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--base-model", required=True, help="the `model` to send when routed to the base model")
    parser.add_argument("--adapter-model", default="{adapter}",
                        help="the `model` to send when routed to an adapter; {adapter} and {base} are filled in "
                             "(default {adapter}; SGLang: {base}:{adapter})")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions (one user message)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--api-key", help="sent as a Bearer token")
    parser.add_argument("--out", help="write the answers here (JSONL); default: stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a directory: expected the JSONL file for the answers")
    if args.out and Path(args.out).exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.out and not Path(args.out).resolve().parent.is_dir():  # checked before any request is sent
        parser.error(f"--out {args.out}: the directory {Path(args.out).parent} does not exist")
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    here = (args.model, args.router, args.data)
    if bool(args.routes) == any(here) or (any(here) and not all(here)):
        parser.error("give either --routes, or --model, --router and --data to route here")
    try:
        rows = read_routes(args.routes) if args.routes else route_here(*here, args.adapter_name, args.batch_size)
    except (OSError, ValueError) as err:
        parser.error(str(err))

    endpoint = args.url.rstrip("/") + ("/v1/chat/completions" if args.chat else "/v1/completions")
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}

    def generate(row: dict) -> dict:
        model = engine_model(row["route"], args.base_model, args.adapter_model)
        reply = post_json(endpoint, request_body(row["prompt"], model, args.chat, sampling), args.timeout,
                          args.api_key)
        return {**row, "answer": answer_text(reply, args.chat)}

    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            answers = list(pool.map(generate, rows))
    except (RuntimeError, OSError, KeyError, IndexError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lines = "".join(json.dumps(answer) + "\n" for answer in answers)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
