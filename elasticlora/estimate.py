"""An early estimate of what `elasticlora shrink` would export, cheap enough to run during training.

    estimate = estimate_shrink(model, batches, tolerance=0.01)   # a small eval sample, e.g. 64 rows
    estimate.params, estimate.max_rank, estimate.vllm_max_lora_rank, estimate.advice["message"]

From `shrink`'s cheap parts and one measured pass, on elastic and plain PEFT LoRA models alike:

1. the sensitivity pass (one forward + backward, `sensitivity.py`) gives each module's cost curve `c_m(k)` and the
   full-rank loss;
2. the loss increase of a configuration is predicted as `s * sum_m c_m(k_m) / (2 N)` over N scored tokens (the
   second-order term of a Fisher approximation, the first-order one vanishing at a trained optimum);
3. as `shrink` starts, with one rank for every module: the smallest of r/2, r/4, ..., 1 predicted within tolerance
   at `s = 1` is measured (the one pass). Within tolerance, that uniform rank is the estimate (`shrink` keeps it or
   cuts a little below it). Outside, the measurement sets `s`, and at that `s` the smallest uniform rank predicted
   within tolerance, then the last configuration predicted within tolerance on the allocation path of the curves
   below it (`allocation_path`), is the estimate;
4. the r_max advice (`advice.py`) uses the predicted cost of halving the estimate's modules kept at full rank.

`shrink` itself measures its way down (about 12 passes over the whole eval set), so the estimate can be off;
docs/results.md measures how far, and how early in training it settles.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .advice import halved_at_full_rank, rank_advice
from .evaluate import eval_loss
from .options import check_tolerance
from .ranks import active_adapter_name, lora_layers, truncated
from .sensitivity import allocation_path, sensitivity
from .shrink import halvings, tolerance_slack
from .vllm import vllm_max_lora_rank


@dataclass
class ShrinkEstimate:
    """What `shrink` at `tolerance` is predicted to export now, and what the estimate measured."""

    ranks: dict[str, int]
    params: int
    full_params: int
    max_rank: int
    vllm_max_lora_rank: int
    tolerance: float
    full_loss: float  # measured on the sample, at full rank (the sensitivity pass)
    probe_loss: float  # measured at the uniform rank the uncalibrated prediction chose
    probe_params: int
    predicted_loss: float  # at `ranks`: predicted, or measured when they are the probe's
    scale: float  # s: measured / predicted loss increase at the probe
    advice: dict
    rows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str = "eval_shrink") -> dict[str, float]:
        """Numbers for a trainer's loggers: `{prefix}_params`, `_max_rank`, `_vllm_max_lora_rank`, `_advised_r`,
        `_loss` (the predicted loss at the estimate)."""
        return {
            f"{prefix}_params": self.params,
            f"{prefix}_max_rank": self.max_rank,
            f"{prefix}_vllm_max_lora_rank": self.vllm_max_lora_rank,
            f"{prefix}_advised_r": self.advice["advised_r"],
            f"{prefix}_loss": self.predicted_loss,
        }

    def summary(self) -> str:
        return (
            f"shrink estimate at tolerance {self.tolerance:g}: {self.params:,} of {self.full_params:,} adapter "
            f"parameters, max rank {self.max_rank} (vLLM --max-lora-rank {self.vllm_max_lora_rank}); "
            f"{self.advice['message']}"
        )


def estimate_shrink(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    tolerance: float = 0.01,
    mode: str = "relative",
    adapter_name: str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> ShrinkEstimate:
    """Predict `shrink(model, batches, tolerance)`'s export from one sensitivity pass and one measured pass.

    `model`: an elastic model or a plain PEFT LoRA model (truncated in its singular basis), in training or not; its
    weights and training mode are left as they were. `batches`: a small eval sample (`data.eval_batches`).
    """
    check_tolerance(tolerance, mode)
    start = time.perf_counter()
    adapter = active_adapter_name(model, adapter_name)
    layers = lora_layers(model, adapter)
    full = {name: layer.r[adapter] for name, layer in layers.items()}
    widths = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
    measured = sensitivity(model, batches, adapter, progress=False, autocast_dtype=autocast_dtype)
    costs = {name: c.clamp_min(0.0) for name, c in measured.costs.items()}  # c_m(r_m) = 0: nothing cut
    cost_lists = {name: c.tolist() for name, c in costs.items()}  # read once per configuration searched

    def predicted_increase(ranks: dict[str, int]) -> float:
        return sum(cost_lists[name][k] for name, k in ranks.items()) / (2 * measured.tokens)

    def params_of(ranks: dict[str, int]) -> int:
        return sum(k * widths[name] for name, k in ranks.items())

    def uniform(k: int) -> dict[str, int]:
        return {name: min(k, r) for name, r in full.items()}

    def uniform_anchor(scale: float) -> dict[str, int]:
        """The smallest of r/2, r/4, ..., 1 for every module predicted within tolerance at `scale` (else full)."""
        anchor = dict(full)
        for k in halvings(r_max):
            if scale * predicted_increase(uniform(k)) > slack:
                break
            anchor = uniform(k)
        return anchor

    r_max = max(full.values())
    slack = tolerance_slack(tolerance, measured.loss, mode)
    probe = uniform_anchor(1.0)
    if probe == full and r_max > 1:
        probe = uniform(r_max // 2)  # as shrink measures first
    with truncated(model, probe, adapter):
        probe_loss = eval_loss(model, batches, autocast_dtype=autocast_dtype)
    increase, predicted = probe_loss - measured.loss, predicted_increase(probe)
    if increase <= slack:
        ranks, loss = probe, probe_loss  # measured within tolerance
        scale = increase / predicted if increase > 0 and predicted > 0 else 0.0
    elif predicted <= 0:
        ranks, loss, scale = dict(full), measured.loss, 0.0  # a cost the curves do not see: keep every rank
    else:
        scale = increase / predicted
        anchor = uniform_anchor(scale)
        below = allocation_path({name: c[: anchor[name] + 1] for name, c in costs.items()}, widths)
        ranks = next(config for config in reversed(below) if scale * predicted_increase(config) <= slack)
        loss = measured.loss + scale * predicted_increase(ranks)
    cut = halved_at_full_rank(ranks, full)
    cut_cost = None
    if cut is not None and scale > 0:
        cut_cost = scale * (predicted_increase(cut) - predicted_increase(ranks)) / slack
    max_rank = max(ranks.values())
    return ShrinkEstimate(
        ranks=dict(ranks),
        params=params_of(ranks),
        full_params=params_of(full),
        max_rank=max_rank,
        vllm_max_lora_rank=vllm_max_lora_rank(max(1, max_rank)),
        tolerance=tolerance,
        full_loss=measured.loss,
        probe_loss=probe_loss,
        probe_params=params_of(probe),
        predicted_loss=loss,
        scale=scale,
        advice=rank_advice(ranks, full, widths, cut_cost),
        rows=sum(len(batch["input_ids"]) for batch in batches),
        seconds=time.perf_counter() - start,
    )
