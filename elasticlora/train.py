"""A minimal training loop for demos and benchmarks (real projects use transformers' Trainer or TRL, unchanged)."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .evaluate import model_device


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
) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches (cycling through shuffled `batches`), linear decay.

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
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
