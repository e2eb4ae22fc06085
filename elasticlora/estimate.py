"""An early estimate of what `elasticlora shrink` would export, cheap enough to run during training.

    estimate = estimate_shrink(model, batches, tolerance=0.01)   # a small eval sample, e.g. 64 rows
    estimate.params, estimate.max_rank, estimate.vllm_max_lora_rank, estimate.advice["message"]

From `shrink`'s cheap parts and one measured pass, on elastic and plain PEFT LoRA models alike:

1. the sensitivity pass (one forward + backward, `sensitivity.py`) gives each module's cost curve `c_m(k)` and the
   full-rank loss;
2. the allocation path of the curves orders the configurations from full rank down (`allocation_path`);
3. the loss increase of a configuration is predicted as `s * sum_m c_m(k_m) / (2 N)` over N scored tokens (the
   second-order term of a Fisher approximation, the first-order one vanishing at a trained optimum); with `s = 1`
   the last configuration predicted within tolerance is measured (the one pass), which sets `s`;
4. at that `s`, as `shrink` searches: the smallest uniform rank (r/2, r/4, ..., 1) predicted within tolerance,
   then the last configuration predicted within tolerance on the allocation path below it, is the estimate; the
   r_max advice (`advice.py`) uses the predicted cost of halving its modules kept at full rank.

`shrink` itself measures its way along the path instead (about 12 passes over the whole eval set), so the estimate
can be off; docs/results.md measures how far, and how early in training it settles.
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
    probe_loss: float  # measured at the configuration the uncalibrated prediction chose
    probe_params: int
    predicted_loss: float  # predicted at `ranks`
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
    path = allocation_path(costs, widths)
    cost_lists = {name: c.tolist() for name, c in costs.items()}  # read once per configuration on the path

    def predicted_increase(ranks: dict[str, int]) -> float:
        return sum(cost_lists[name][k] for name, k in ranks.items()) / (2 * measured.tokens)

    def params_of(ranks: dict[str, int]) -> int:
        return sum(k * widths[name] for name, k in ranks.items())

    increases = [predicted_increase(ranks) for ranks in path]
    slack = tolerance_slack(tolerance, measured.loss, mode)

    def last_within(scale: float) -> int:
        within = [i for i, increase in enumerate(increases) if scale * increase <= slack]
        return max(within, default=0)

    probe = max(1, last_within(1.0))
    with truncated(model, path[probe], adapter):
        probe_loss = eval_loss(model, batches, autocast_dtype=autocast_dtype)
    if probe_loss <= measured.loss or increases[probe] <= 0:
        ranks, scale = path[probe], 0.0  # no measured cost to scale by: keep what was measured within tolerance
    else:
        scale = (probe_loss - measured.loss) / increases[probe]
        # as shrink does: the smallest uniform rank predicted within tolerance, then the path below it
        anchor = dict(full)
        for k in halvings(max(full.values())):
            uniform = {name: min(k, r) for name, r in full.items()}
            if scale * predicted_increase(uniform) > slack:
                break
            anchor = uniform
        below = allocation_path({name: c[: anchor[name] + 1] for name, c in costs.items()}, widths)
        ranks = next(config for config in reversed(below) if scale * predicted_increase(config) <= slack)
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
        probe_params=params_of(path[probe]),
        predicted_loss=measured.loss + scale * predicted_increase(ranks),
        scale=scale,
        advice=rank_advice(ranks, full, widths, cut_cost),
        rows=sum(len(batch["input_ids"]) for batch in batches),
        seconds=time.perf_counter() - start,
    )
