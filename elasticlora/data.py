"""Evaluation data: rows of text, prompt/completion or chat messages -> padded batches with loss masks.

Row formats (one JSON object per line of a `.jsonl` file, a list of dicts, or a Hugging Face `datasets.Dataset`):

- `{"text": ...}`: loss on every token;
- `{"prompt": ..., "completion": ...}`: loss on the completion (and the EOS token that ends it) only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: loss on assistant turns, through the tokenizer's chat template.

Labels follow the transformers convention: -100 marks tokens that are not scored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


def load_rows(source: str | Path | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows from a `.jsonl` path, a list of dicts or a `datasets.Dataset`; raises on an empty or unreadable file."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"eval data file not found: {path}")
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON: {err}") from err
        where = str(path)
    else:
        rows = [dict(row) for row in source]
        where = "the eval data"
    if not rows:
        raise ValueError(f"{where} has no rows: give at least one text, prompt/completion or messages row")
    return rows


def _row_format(row: dict[str, Any], index: int) -> str:
    if not isinstance(row, dict):
        raise ValueError(f"eval row {index} must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise ValueError(
        f"eval row {index} has keys {sorted(row)}; expected 'text', 'prompt' + 'completion', or 'messages'"
    )


def _encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _chat_example(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels scoring assistant turns only."""
    ids = _as_ids(tokenizer.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(_as_ids(tokenizer.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)))
        end = len(_as_ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True)))
        labels[start:end] = ids[start:end]
    return ids, labels


def _as_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def tokenize_rows(tokenizer, rows: Sequence[dict[str, Any]], max_length: int = 1024) -> list[dict[str, list[int]]]:
    """Token ids and labels for every row; rows are truncated to `max_length` tokens from the right."""
    examples = []
    eos = tokenizer.eos_token_id
    for index, row in enumerate(rows):
        kind = _row_format(row, index)
        if kind == "text":
            ids = _encode(tokenizer, str(row["text"]))
            labels = list(ids)
        elif kind == "prompt_completion":
            if not str(row["completion"]).strip():
                raise ValueError(f"eval row {index} has no tokens to score: its completion is empty; fix or remove it")
            prompt_ids = _encode(tokenizer, str(row["prompt"]))
            ids = _encode(tokenizer, str(row["prompt"]) + str(row["completion"]))
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
        else:
            ids, labels = _chat_example(tokenizer, row["messages"])
        ids, labels = ids[:max_length], labels[:max_length]
        # the first token is never predicted, so it cannot be scored
        if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
            raise ValueError(
                f"eval row {index} has no tokens to score (empty text/completion/assistant turn, or cut off by "
                f"max_length={max_length}); fix or remove it"
            )
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def make_batches(
    examples: Sequence[dict[str, list[int]]], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches, grouped by length so little compute goes to padding; deterministic order."""
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ex["input_ids"]) for ex in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ex in enumerate(chunk):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"])
            labels[row, :n] = torch.tensor(ex["labels"])
            attention_mask[row, :n] = 1
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def eval_batches(tokenizer, source, batch_size: int = 8, max_length: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Load, tokenize and batch eval data in one call."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; set `tokenizer.pad_token`")
    return make_batches(tokenize_rows(tokenizer, load_rows(source), max_length), batch_size, pad)
