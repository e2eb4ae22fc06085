"""What the examples, scripts and tests share: the WordNet sample, `--model tiny`, and a minimal training loop.

Real projects use transformers' Trainer or TRL unchanged; `train_steps` is the few lines the demo and the studies
need. `--model tiny` is `elasticlora.testing`'s random Llama and character tokenizer, built offline in milliseconds
(it learns nothing useful).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from elasticlora.evaluate import model_device
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.testing import char_tokenizer, tiny_llama

DATA = Path(__file__).resolve().parent / "data"  # wordnet_train.jsonl, wordnet_eval.jsonl (WordNet 3.0 licence)
TINY_MODEL = "tiny"


def base_model_dir(model: str) -> str:
    """`model` as `shrink_adapter` takes it: the name itself, or for "tiny" a directory the tiny model is saved to."""
    if model != TINY_MODEL:
        return model
    path = tempfile.mkdtemp(prefix="elasticlora-tiny-")
    lm, tokenizer = load_model(TINY_MODEL)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_model(model: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """`elasticlora.loading.load_model_and_tokenizer`, or a random Llama and a character tokenizer for `"tiny"`."""
    if model != TINY_MODEL:
        return load_model_and_tokenizer(model, **kwargs)
    if kwargs.get("load_in_4bit") or kwargs.get("load_in_8bit"):
        raise ValueError("the 'tiny' model is built in memory: save it first to load it quantized")
    # rows of 128 and 192: whole 4-bit blocks of 64 weights, double quantization included
    return tiny_llama(hidden=128), char_tokenizer()


def train_steps(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "train",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    grad_norms: list[float] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches (cycling through shuffled `batches`), linear decay;
    with `max_grad_norm`, the gradient is clipped to that total norm first (Trainer's default is 1.0) and each step's
    norm before clipping is appended to `grad_norms` if given. `on_step(step)` runs after each optimizer step
    (numbered from 1), as a Trainer callback's `on_step_end`.

    Returns the training loss of every step.
    """
    torch.manual_seed(seed)
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, warmup_steps)) * max(0.0, 1.0 - step / steps),
    )
    device = model_device(model)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    model.train()
    losses = []
    bar = tqdm(itertools.islice(itertools.cycle(order), steps), total=steps, desc=desc, disable=not progress)
    for index in bar:
        batch = {k: v.to(device) for k, v in batches[index].items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if grad_norms is not None:
                grad_norms.append(norm.item())
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(len(losses))
    model.eval()
    return losses
