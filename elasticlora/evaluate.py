"""Token-level eval loss of a causal LM over prepared batches (see `data.py`)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE_INDEX


def model_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes transformers' `logits_to_keep` (it then projects only those positions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(base))


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the scored tokens of one batch, and how many tokens were scored.

    Position t predicts token t + 1. Only the positions some row scores go through the output head (transformers'
    `logits_to_keep`), and only scored logits are upcast: for a 262k-token vocabulary (Gemma 3) the head over every
    position is most of an eval pass."""
    targets = batch["labels"].to(device)[:, 1:]
    scored = targets != IGNORE_INDEX  # (B, T - 1)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if _keeps_logits(model):
        positions = scored.any(0).nonzero().squeeze(1)  # (P,)
        logits = model(**inputs, logits_to_keep=positions).logits  # (B, P, V)
        scored, targets = scored[:, positions], targets[:, positions]
    else:
        logits = model(**inputs).logits[:, :-1]
    loss = F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum")
    return loss, int(scored.sum())


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    progress: bool = False,
    desc: str = "eval",
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean cross-entropy over every scored token of every batch (not a mean of per-batch means).

    The model runs in eval mode (restored afterwards), so elastic layers use their fixed ranks rather than draws.
    Raises `FloatingPointError` when the loss is NaN or infinite.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            with autocast:
                loss_sum, n_tokens = batch_loss_sum(model, batch, device)
            total += loss_sum.item()
            count += n_tokens
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the eval batches hold no tokens to score")
    loss = total / count
    if not math.isfinite(loss):
        raise FloatingPointError(f"eval loss is {loss}: the model or adapter produces non-finite logits")
    return loss
