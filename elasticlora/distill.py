"""In-place distillation: a slice of each training batch re-run at drawn truncations, learning the full rank's output.

With `distill_fraction > 0` a training forward pass of the hooked model (the one whose forward starts a pass, see
`sampler.py`) runs every example at full rank: its loss is plain LoRA's, from the labels. Then, inside the same
forward, `distill_fraction` of the batch's rows run again at truncation ranks drawn from the truncations alone, and
the returned loss gains the KL divergence from the full rank's detached output distribution to theirs, over the
tokens the labels score (the sandwich rule with in-place distillation of universally slimmable networks, arXiv
1903.05134, with one random width instead of the smallest and random ones). So the full adapter trains on every
example and the truncations learn to imitate it instead of fitting the labels on their own. The second pass costs
about `distill_fraction` of a step. Nothing changes for the loop: `model(**batch).loss` carries both terms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def student_inputs(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """The forward's arguments for `rows` of the batch, without labels (the student's loss is the distillation)."""
    kwargs = {key: _rows(value, rows, batch) for key, value in kwargs.items() if key != "labels"}
    return tuple(_rows(value, rows, batch) for value in args), kwargs


def distillation_loss(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor | None, mask) -> torch.Tensor:
    """Mean KL(teacher || student) of next-token distributions (B, T, V) over the positions the labels score (a
    causal LM's position t predicts label t + 1), or over `mask` (B, T) without labels, or over every position."""
    if labels is not None:
        scored = torch.zeros(labels.shape, dtype=torch.bool, device=student.device)
        scored[:, :-1] = labels[:, 1:].to(student.device) != -100
    elif mask is not None:
        scored = mask.to(student.device).bool()
    else:
        scored = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)
    if not scored.any():
        return student.sum() * 0.0
    log_t = F.log_softmax(teacher[scored].detach().float(), -1)
    log_s = F.log_softmax(student[scored].float(), -1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
