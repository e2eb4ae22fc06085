"""Trainer callbacks: keep the rank draws across checkpoints, watch the rank-quality curve form, and estimate what
`elasticlora shrink` will export while training runs.

    trainer = Trainer(model=elastic_model, args=..., eval_dataset=...)      # or trl.SFTTrainer
    trainer.add_callback(ElasticLoraCallback())   # resume_from_checkpoint continues the draw sequence
    add_rank_curve(trainer, ranks=(1, 4, 16, None))                         # logs eval_loss@r1, ... eval_loss@full
    add_shrink_estimate(trainer, tolerance=0.01)  # logs eval_shrink_params, eval_shrink_max_rank, ... every 500 steps

For a custom loop, `rank_curve(model, batches)` and `estimate_shrink(model, batches)` return the same numbers, and
`elastic_runtimes(model)[adapter]`'s `state_dict()` / `load_state_dict()` carry the draw position through your own
checkpoints. The shrink estimate works on plain PEFT LoRA models too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .estimate import ShrinkEstimate, estimate_shrink
from .evaluate import eval_loss
from .model import elastic_runtimes
from .ranks import at_ranks

DEFAULT_RANKS = (1, 4, 16, None)


def _metric_name(rank: int | None, prefix: str = "eval_loss") -> str:
    return f"{prefix}@{'full' if rank is None else f'r{rank}'}"


def _with_attention_mask(batches: Iterable[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The batches, each with an all-ones `attention_mask` where it has none."""
    return [{"attention_mask": torch.ones_like(b["input_ids"]), **b} for b in batches]


def rank_curve(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    ranks: Sequence[int | None] = DEFAULT_RANKS,
    prefix: str = "eval_loss",
) -> dict[str, float]:
    """Token-level eval loss at each rank (None: full rank), e.g. `{"eval_loss@r1": 2.9, ..., "eval_loss@full": 2.5}`.

    Batches need `input_ids` and `labels` (-100 = not scored); `attention_mask` is used when present.
    """
    batches = _with_attention_mask(batches)
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


class ShrinkEstimateCallback(TrainerCallback):
    """Every `every` optimizer steps, and once at the end of training, predicts what `elasticlora shrink` at
    `tolerance` would export (`estimate_shrink` on `batches`: parameters, largest module rank, vLLM bucket, r_max
    advice) and logs it through the trainer's loggers as `eval_shrink_*`; the last estimate is printed at the end.

    `every`: steps, or a fraction of the run's steps when below 1 (as `TrainingArguments.eval_steps`). The cost of a
    call is about one training step over `batches` plus an eval pass over them; `add_shrink_estimate` keeps the sample
    small. Without a trainer the numbers go to `state.log_history` only. `estimates` keeps every (step, estimate).
    """

    def __init__(
        self,
        batches,
        tolerance: float = 0.01,
        every: float = 500,
        trainer=None,
        mode: str = "relative",
        autocast_dtype: torch.dtype | None = None,
    ):
        if not every > 0:
            raise ValueError(f"`every` must be > 0 (steps, or a fraction of the run below 1), got {every!r}")
        self.batches = _with_attention_mask(batches)
        if not self.batches:
            raise ValueError("the shrink estimate needs eval batches; got none")
        self.tolerance, self.every, self.trainer = tolerance, every, trainer
        self.mode, self.autocast_dtype = mode, autocast_dtype
        self.estimates: list[tuple[int, ShrinkEstimate]] = []

    def _interval(self, state) -> int:
        return max(1, round(self.every * state.max_steps)) if self.every < 1 else int(self.every)

    def _estimate(self, state, model) -> None:
        estimate = estimate_shrink(
            model, self.batches, self.tolerance, mode=self.mode, autocast_dtype=self.autocast_dtype
        )
        self.estimates.append((state.global_step, estimate))
        metrics = estimate.metrics()
        if self.trainer is not None:
            self.trainer.log(metrics)
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step % self._interval(state) == 0:
            self._estimate(state, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        if not self.estimates or self.estimates[-1][0] != state.global_step:
            self._estimate(state, model)
        if state.is_world_process_zero:
            print(f"step {state.global_step}: {self.estimates[-1][1].summary()}")
        return control


def add_shrink_estimate(
    trainer, tolerance: float = 0.01, every: float = 500, max_rows: int = 64, mode: str = "relative"
) -> ShrinkEstimateCallback:
    """Attach a `ShrinkEstimateCallback` to a transformers `Trainer` or TRL `SFTTrainer`, on the first `max_rows`
    rows of its eval dataset (batched as its evaluation batches them); returns the callback."""
    if trainer.eval_dataset is None:
        raise ValueError("add_shrink_estimate needs the trainer's eval_dataset (held-out rows to measure on)")
    batches, rows = [], 0
    for batch in trainer.get_eval_dataloader():
        batches.append({key: value for key, value in batch.items() if isinstance(value, torch.Tensor)})
        rows += len(batch["input_ids"])
        if rows >= max_rows:
            break
    callback = ShrinkEstimateCallback(batches, tolerance, every, trainer=trainer, mode=mode)
    trainer.add_callback(callback)
    return callback


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
