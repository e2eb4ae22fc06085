"""Trainer callbacks: keep the rank draws across checkpoints, and watch the rank-quality curve form.

    trainer = Trainer(model=elastic_model, args=..., eval_dataset=...)      # or trl.SFTTrainer
    trainer.add_callback(ElasticLoraCallback())   # resume_from_checkpoint continues the draw sequence
    add_rank_curve(trainer, ranks=(1, 4, 16, None))                         # logs eval_loss@r1, ... eval_loss@full

For a custom loop, `rank_curve(model, batches)` returns the same numbers, and `elastic_runtimes(model)[adapter]`'s
`state_dict()` / `load_state_dict()` carry the draw position through your own checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .evaluate import eval_loss
from .model import elastic_runtimes
from .ranks import at_ranks

DEFAULT_RANKS = (1, 4, 16, None)


def _metric_name(rank: int | None, prefix: str = "eval_loss") -> str:
    return f"{prefix}@{'full' if rank is None else f'r{rank}'}"


def rank_curve(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ranks: Sequence[int | None] = DEFAULT_RANKS,
    prefix: str = "eval_loss",
) -> dict[str, float]:
    """Token-level eval loss at each rank (None: full rank), e.g. `{"eval_loss@r1": 2.9, ..., "eval_loss@full": 2.5}`.

    Batches need `input_ids` and `labels` (-100 = not scored); `attention_mask` is used when present.
    """
    batches = [{"attention_mask": torch.ones_like(b["input_ids"]), **b} for b in batches]
    curve = {}
    for rank in ranks:
        with at_ranks(model, rank):
            curve[_metric_name(rank, prefix)] = eval_loss(model, batches)
    return curve


class RankCurveCallback(TrainerCallback):
    """At each evaluation, logs eval loss at `ranks` through the trainer's loggers (TensorBoard, W&B, ...).

    Give it the trainer (`add_rank_curve` does) so the numbers reach every logger; without one they go to
    `state.log_history` only. `max_batches` bounds the extra cost: len(ranks) passes over that many eval batches.
    """

    def __init__(self, ranks: Sequence[int | None] = DEFAULT_RANKS, trainer=None, max_batches: int | None = None):
        self.ranks = tuple(ranks)
        self.trainer = trainer
        self.max_batches = max_batches

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if model is None or eval_dataloader is None:
            return control
        batches = []
        for i, batch in enumerate(eval_dataloader):
            if self.max_batches is not None and i >= self.max_batches:
                break
            batches.append(batch)
        curve = rank_curve(model, batches, self.ranks)
        if self.trainer is not None:
            self.trainer.log(curve)
        else:
            state.log_history.append({**curve, "step": state.global_step})
        return control


def add_rank_curve(trainer, ranks: Sequence[int | None] = DEFAULT_RANKS, max_batches: int | None = None):
    """Attach a `RankCurveCallback` to a transformers `Trainer` or TRL `SFTTrainer`, and an `ElasticLoraCallback`
    if it has none; returns the rank-curve callback."""
    callback = RankCurveCallback(ranks, trainer=trainer, max_batches=max_batches)
    trainer.add_callback(callback)
    if not any(isinstance(cb, ElasticLoraCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(ElasticLoraCallback())
    return callback


class ElasticLoraCallback(TrainerCallback, ExportableState):
    """Saves where each elastic adapter is in its rank-draw sequence with every Trainer checkpoint
    (`trainer_state.json`, as transformers saves any stateful callback) and restores it when training resumes from
    one, so a resumed run draws what the uninterrupted run would have drawn. Without it a resumed run starts the
    sequence again from its first draw."""

    def __init__(self):
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """On a resumed run, `state` is the checkpoint's, holding what `state()` returned when it was saved."""
        self._model = model
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved
        draw_state = (saved or {}).get("attributes", {}).get("draw_state")
        if model is not None and state.global_step > 0 and draw_state:
            runtimes = elastic_runtimes(model)
            for adapter, draws in draw_state.items():
                if adapter in runtimes:
                    runtimes[adapter].load_state_dict(draws)
        return control

    def state(self) -> dict:
        draws = None
        if self._model is not None:
            draws = {adapter: runtime.state_dict() for adapter, runtime in elastic_runtimes(self._model).items()}
        return {"args": {}, "attributes": {"draw_state": draws}}
