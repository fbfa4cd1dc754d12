"""Prompts in, token batches out: what router training and routing read the same way.

The router learns from the hidden state at each prompt's last token as ``train_router`` tokenized and
batched it; routing later must read prompts the same way, so both use these functions.
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch


# Where a model config says how many positions the model takes (learned position embeddings of that size)
POSITION_LIMITS = ("max_position_embeddings", "n_positions")


def explain_failed_forward(tokenizer: Any, ids: list[list[int]], rows: Sequence[int], caller: str,
                           error: BaseException, model_config: Any = None) -> None:
    """Called where a forward over the prompts ``rows`` (token ids ``ids``) failed with ``error``: a ValueError
    naming those with a token id outside the model's vocabulary (an IndexError from the embedding), or those longer
    than the model takes, by the tokenizer's ``model_max_length``, or, for an IndexError (a learned position table
    read past its end, as GPT-2's), the model config's position count; nothing where none is, and the caller
    re-raises its own error. Not checked before the forward: RoPE models run past the limits many tokenizers and
    configs declare, so another error there (out of memory, say) is left as it is."""
    vocab = getattr(model_config, "vocab_size", None)
    if isinstance(error, IndexError) and isinstance(vocab, int):
        outside = [row for row in rows if any(not 0 <= t < vocab for t in ids[row])]
        if outside:
            raise ValueError(f"{caller}: the forward failed on prompts {outside[:8]}, which hold token ids outside "
                             f"the model's vocabulary [0, {vocab}) (vocab_size in its config)") from error
    limits = [(getattr(tokenizer, "model_max_length", None), "the tokenizer says the model takes (model_max_length)")]
    if isinstance(error, IndexError):
        limits += [(getattr(model_config, key, None), f"the model's config gives ({key})") for key in POSITION_LIMITS]
    for limit, source in limits:
        too_long = [row for row in rows if isinstance(limit, int) and len(ids[row]) > limit]
        if too_long:
            raise ValueError(f"{caller}: the forward failed on prompts {too_long[:8]}, longer "
                             f"({len(ids[too_long[0]])}{' ...' if len(too_long) > 1 else ''} tokens) than the {limit} "
                             f"{source}; pass max_length (--max-length) to truncate them") from error


class PromptsWithoutTokens(ValueError):
    """Prompts that the tokenizer (or ``max_length`` 0) left without a token: ``rows``, their indices."""

    def __init__(self, caller: str, rows: list[int]) -> None:
        super().__init__(f"{caller}: prompts {rows[:8]} have no tokens")
        self.rows = rows


def token_ids(prompts: Sequence[Any], tokenizer: Any, max_length: int | None, caller: str) -> list[list[int]]:
    """Token ids per prompt: strings go through ``tokenizer`` (truncated to ``max_length``), token-id lists
    and 1-D integer tensors are taken as they are. ``caller`` names the function in error messages."""
    if max_length is not None:
        if not isinstance(max_length, numbers.Integral) or isinstance(max_length, bool) or max_length < 1:
            # (a negative one would cut each prompt from its end, and the router reads the last token kept)
            raise ValueError(f"{caller}: max_length must be None or an int >= 1, got {max_length!r}")
        max_length = int(max_length)  # (a NumPy integer, say)
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError(f"{caller}: prompts are strings, so a tokenizer is needed (tokenizer=...)")
        encoded = tokenizer(list(prompts), truncation=max_length is not None, max_length=max_length)["input_ids"]
    else:
        encoded = []
        for i, p in enumerate(prompts):
            given = p
            if hasattr(p, "__array__") and not isinstance(p, torch.Tensor):  # a NumPy array of token ids
                try:
                    p = torch.as_tensor(p)
                except (TypeError, ValueError, RuntimeError):
                    pass  # (strings, objects: the error below names the type)
            if isinstance(p, torch.Tensor) and p.dim() == 1 and not p.is_floating_point() and p.dtype != torch.bool:
                encoded.append(p.tolist())
            elif isinstance(p, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                      for t in p):
                encoded.append([int(t) for t in p])  # (NumPy integers too)
            else:
                kinds = sorted({type(t).__name__ for t in p}) if isinstance(p, (list, tuple)) else None
                got = f"a {type(p).__name__} of {', '.join(kinds)}" if kinds else \
                    f"{type(given).__name__}" + (f" of {p.dtype} with shape {list(p.shape)}"
                                                 if isinstance(p, torch.Tensor) else "")
                raise TypeError(f"{caller}: prompts[{i}] must be a string (with a tokenizer), a list of int token "
                                f"ids or a 1-D integer tensor, got {got}")
        if max_length is not None:
            encoded = [ids[:max_length] for ids in encoded]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise PromptsWithoutTokens(caller, empty)
    return encoded


def right_padded_batches(ids: list[list[int]], batch_size: int
                         ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Batches of prompts of similar length (less padding), padded on the right with token 0 (masked).

    Yields (the prompts' indices in ``ids``, input_ids [b, T], attention_mask [b, T]). Right padding keeps
    each prompt's positions 0..n-1, as ``generate`` gives a left-padded prompt from its mask.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = max(len(ids[i]) for i in rows)
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for j, i in enumerate(rows):
            input_ids[j, :len(ids[i])] = torch.tensor(ids[i])
            mask[j, :len(ids[i])] = 1
        yield rows, input_ids, mask


def read_jsonl(path: str | Path, check: Callable[[dict], str | None]) -> list[dict]:
    """The objects of a JSONL file (blank lines skipped). ``check(row)`` returns what is wrong with a row, or
    None. Raises ValueError naming the file and line of the first bad row."""
    rows: list[dict] = []
    for number, line in jsonl_lines(path):
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        problem = f"expected an object, got {type(row).__name__}" if not isinstance(row, dict) else check(row)
        if problem:
            raise ValueError(f"{where}: {problem}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) for each line of a JSONL file that is not blank: the rows, in order. UTF-8 (a
    byte-order mark at the start is skipped); a line that is not raises ValueError naming the file and line."""
    with open(path, "rb") as handle:
        data = handle.read()
    # (bytes.splitlines: \n, \r\n and a lone \r end a line, as text mode read them; not U+2028 inside a string)
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the "
                             "line); save the file as UTF-8") from None
        if line.strip():
            yield number, line


def prompt_problem(row: dict) -> str | None:
    """What is wrong with a row's ``"prompt"`` (missing, not a non-empty string), or None."""
    if "prompt" not in row:
        return "missing 'prompt'"
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        return f"\"prompt\" must be a non-empty string, got {prompt!r:.60}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON may escape a lone surrogate, which no tokenizer takes
        return f"\"prompt\" is not valid Unicode text: {err.reason} at character {err.start} ({prompt!r:.60})"
    return None
