"""Give every adapted module its smallest rank that keeps measured quality within a tolerance.

The search costs a fixed number of passes over the eval data, whatever the model depth:

1. **Sensitivity** (one forward + backward pass, `sensitivity.py`): a first-order cost curve over ranks 0..r for
   every module, from its rank activations in its singular basis and their gradients.
2. **Allocation** (`sensitivity.allocation_path`): the cost curves become one path of configurations from full rank
   to all-zero, parameters falling monotonically, cheapest loss per parameter saved first.
3. **Measured bisection**, where each probe is a real eval pass at those ranks: first over one rank for every
   module, halving from full (r/2, r/4, ..., 1: the prefixes elastic training optimises directly, and the first-order
   costs are least reliable for the large rescaling of a short prefix); then, from the smallest uniform rank within
   tolerance, over the allocation path of the cost curves cut at that rank. The result is the measured configuration
   with the fewest parameters whose quality is within tolerance of the best quality measured (full rank, or a
   truncation that turned out better).

Passes: 1 sensitivity + 1 full rank + 1 base (all ranks 0) + bisection probes, `max_passes` in all (default 12).
Then, for the r_max advice (`advice.py`), one more pass when some modules kept their full rank: those modules at half.
Every truncation keeps a module's top singular directions, so a plain (non-elastic) LoRA is searched over its best
low-rank approximations (LoRA-Squeeze / PEFT `convert_to_lora`).

`max_rank=N` caps every module at N first (the search starts from the capped adapter, measured once, and halves from
N); `max_rank="auto"` bisects step 3's uniform ranks over vLLM's `--max-lora-rank` buckets instead of halvings, so its
anchor is the smallest bucket whose capped adapter is within tolerance. `shrink_family` runs one search per tolerance
from one sensitivity pass, measuring each configuration once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .advice import halved_at_full_rank, rank_advice
from .evaluate import eval_loss
from .options import check_max_rank, check_tolerance
from .ranks import active_adapter_name, at_ranks, max_ranks, module_shapes
from .sensitivity import allocation_path, sensitivity
from .vllm import buckets_below

Quality = Callable[[nn.Module], float]


@dataclass
class ShrinkResult:
    """What `shrink` chose and everything it measured on the way."""

    ranks: dict[str, int]
    quality: float  # measured at `ranks`
    best_quality: float  # the best quality measured among all probed configurations
    full_quality: float
    base_quality: float
    params: int
    full_params: int
    tolerance: float | None
    mode: str
    metric: str
    higher_is_better: bool
    passes: int
    max_params: int | None = None
    max_rank: int | str | None = None  # as asked: a cap, "auto" or None
    rank_cap: int | None = None  # the cap applied: the asked one, or the bucket "auto" found; None if none
    cap_quality: float | None = None  # quality of the capped adapter before per-module ranks (None without a cap)
    passes_run: int = 0  # passes the call ran in all: `passes` for one tolerance, fewer than their sum for several
    curve: list[dict] = field(default_factory=list)  # every measured configuration: params, quality, within
    cut_quality: float | None = None  # quality with the modules kept at full rank halved (measured for `advice`)
    advice: dict | None = None  # r_max advice (`advice.rank_advice`); None for a parameter budget

    def to_dict(self) -> dict:
        return asdict(self)


def tolerance_slack(tolerance: float, best: float, mode: str = "relative") -> float:
    """How far from `best` a quality within `tolerance` may be (relative: a fraction of |best|; absolute: in units)."""
    return tolerance * abs(best) if mode == "relative" else tolerance


def within_tolerance(
    quality: float, best: float, tolerance: float, mode: str = "relative", higher_is_better: bool = False
) -> bool:
    """Whether `quality` is within `tolerance` of `best` (see `tolerance_slack`)."""
    slack = tolerance_slack(tolerance, best, mode)
    return quality >= best - slack if higher_is_better else quality <= best + slack


def halvings(r: int) -> list[int]:
    """r // 2, r // 4, ..., 1: the uniform ranks the search tries before per-module ranks."""
    ks = []
    while r > 1:
        r //= 2
        ks.append(r)
    return ks


def shrink(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], tolerance: float | None = 0.01, **options
) -> ShrinkResult:
    """Choose per-module ranks for an elastic model (see the module docstring for the method).

    `tolerance`: allowed loss increase over the best measured quality: a fraction in relative mode (0.01 = 1%),
    units of the metric in absolute mode; ignored when `max_params` is given. `options`: see `shrink_family`.
    """
    return shrink_family(model, batches, [tolerance], **options)[0]


def shrink_family(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    tolerances: Sequence[float],
    mode: str = "relative",
    max_params: int | None = None,
    quality: Quality | None = None,
    higher_is_better: bool = False,
    max_passes: int = 12,
    max_rank: int | str | None = None,
    adapter_name: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> list[ShrinkResult]:
    """`shrink` at several tolerances from one sensitivity pass, each configuration measured at most once.

    Each tolerance runs its own search, exactly as `shrink` would alone (same probes, same `passes`, same result);
    a configuration another tolerance already measured is read back instead of measured again.

    Args:
        model: a PEFT model with elastic layers (`get_peft_model(..., ElasticLoraConfig())` or `load_elastic`).
        batches: eval batches (`data.eval_batches`); used for the sensitivity pass and, by default, for quality.
        tolerances: one result per tolerance (see `shrink`); ignored when `max_params` is given.
        max_params: a parameter budget instead of a tolerance: the best configuration on the path within it.
        quality: `quality(model) -> float` replacing eval loss (e.g. accuracy with `higher_is_better=True`).
        max_passes: passes over the eval data per search (sensitivity and every measured configuration); >= 4.
        max_rank: cap every module's rank at this (a vLLM `--max-lora-rank` bucket, say) before the search; "auto"
            finds the smallest vLLM bucket whose capped adapter is within tolerance. The result records the cap and
            the quality it was measured at.
        gradient_checkpointing: recompute block activations in the sensitivity pass (long eval rows).
    """
    if max_params is None:
        if not tolerances:
            raise ValueError("`tolerances` is empty: give at least one")
        for tolerance in tolerances:
            check_tolerance(tolerance, mode)
    elif isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 0:
        raise ValueError(f"`max_params` must be a non-negative int, got {max_params!r}")
    if max_passes < 4:
        raise ValueError(f"`max_passes` must be >= 4 (sensitivity, full rank, base, one probe), got {max_passes}")
    check_max_rank(max_rank, budgeted=max_params is not None)
    if not batches:
        raise ValueError("`batches` is empty: shrink needs eval data")
    adapter = active_adapter_name(model, adapter_name)
    widths = {name: sum(shape) for name, shape in module_shapes(model, adapter).items()}
    metric_name = "eval_loss" if quality is None else getattr(quality, "__name__", "quality")
    higher_is_better = bool(quality is not None and higher_is_better)
    bar = tqdm(total=None, desc="shrink", unit="pass", disable=not progress)
    measured: dict[tuple[int, ...], float] = {}

    def probe(ranks: dict[str, int]) -> float:
        key = tuple(ranks.values())
        if key not in measured:
            with at_ranks(model, ranks, adapter):
                if quality is None:
                    value = eval_loss(model, batches, progress=progress, autocast_dtype=autocast_dtype)
                else:
                    value = float(quality(model))
            if not math.isfinite(value):
                params = sum(k * widths[name] for name, k in ranks.items())
                raise FloatingPointError(f"{metric_name} is {value} at {params} adapter parameters")
            measured[key] = value
            bar.update(1)
            bar.set_postfix({metric_name: f"{value:.4f}"})
        return measured[key]

    costs = sensitivity(model, batches, adapter, progress, autocast_dtype, gradient_checkpointing).costs
    bar.update(1)
    search = _Search(costs, widths, max_ranks(model, adapter), probe, mode, higher_is_better, max_passes, max_rank)
    try:
        if max_params is not None:
            results = [search.within_budget(max_params, metric_name)]
        else:
            results = [search.run(tolerance, metric_name) for tolerance in tolerances]
            for result in results:
                result.advice = _advice(result, search.full, widths, probe)
    finally:
        bar.close()
    for result in results:
        result.passes_run = len(measured) + 1
    return results


def _advice(result: ShrinkResult, full: dict[str, int], widths: dict[str, int], probe) -> dict:
    """`advice.rank_advice` for a result, measuring the cost of halving its modules kept at full rank (one pass)."""
    cut = halved_at_full_rank(result.ranks, full)
    cut_cost = None
    if cut is not None:
        result.cut_quality = probe(cut)
        sign = -1.0 if result.higher_is_better else 1.0
        slack = tolerance_slack(result.tolerance, result.best_quality, result.mode)
        cut_cost = sign * (result.cut_quality - result.quality) / slack
    return rank_advice(result.ranks, full, widths, cut_cost, result.metric)


class _Search:
    """One measured search over the allocation path of the cost curves (see the module docstring)."""

    def __init__(self, costs, widths, full, probe, mode, higher_is_better, max_passes, max_rank):
        self.costs, self.widths, self.full, self.probe = costs, widths, full, probe
        self.mode, self.higher_is_better, self.max_passes = mode, higher_is_better, max_passes
        self.max_rank = max_rank
        self.path = allocation_path(costs, widths)  # path[0] is full rank, path[-1] all zero

    def params_of(self, ranks: dict[str, int]) -> int:
        return sum(k * self.widths[name] for name, k in ranks.items())

    def capped(self, cap: int) -> dict[str, int]:
        return {name: min(k, cap) for name, k in self.full.items()}

    def path_below(self, top: dict[str, int]) -> list[dict[str, int]]:
        """The allocation path of the cost curves cut at `top`: from `top` down to all-zero."""
        return allocation_path({name: c[: top[name] + 1] for name, c in self.costs.items()}, self.widths)

    def start(self, tolerance: float | None) -> None:
        self.tolerance, self.curve = tolerance, []
        self.full_quality = self.measure(self.path[0])
        self.base_quality = self.measure(dict.fromkeys(self.full, 0))

    def measure(self, ranks: dict[str, int]) -> float:
        """Quality at `ranks`: one pass, unless this search has measured them already."""
        for point in self.curve:
            if point["ranks"] == ranks:
                return point["quality"]
        value = self.probe(ranks)
        self.curve.append({"params": self.params_of(ranks), "quality": value, "ranks": dict(ranks)})
        return value

    def best(self) -> float:
        values = [point["quality"] for point in self.curve]
        return max(values) if self.higher_is_better else min(values)

    def ok(self, value: float) -> bool:
        return within_tolerance(value, self.best(), self.tolerance, self.mode, self.higher_is_better)

    def bisect(self, configs: list[dict[str, int]]) -> dict[str, int]:
        """The last config of `configs` found within tolerance; configs[0] is within it, configs[-1] is measured.

        The all-zero end is probed towards even when it looks within tolerance: a later probe may beat both ends.
        """
        lo, hi = 0, len(configs) - 1  # lo: known within tolerance; hi: known outside (or the all-zero end)
        while hi - lo > 1 and len(self.curve) + 1 < self.max_passes:
            mid = (lo + hi) // 2
            if self.ok(self.measure(configs[mid])):
                lo = mid
            else:
                hi = mid
        return configs[lo]

    def run(self, tolerance: float, metric: str) -> ShrinkResult:
        self.start(tolerance)
        r = max(self.full.values())
        zero = dict.fromkeys(self.full, 0)
        cap = self.max_rank if isinstance(self.max_rank, int) and self.max_rank < r else None
        top = self.path[0] if cap is None else self.capped(cap)
        cap_quality = None if cap is None else self.measure(top)
        if cap is not None and not self.ok(cap_quality):
            chosen = top  # the cap alone costs more than the tolerance: the user's cap wins, the report says so
        else:
            # 1. one rank for every module, halving from the top (the prefixes elastic training optimises directly);
            # with max_rank="auto", the vLLM buckets below full rank instead: the smallest one within tolerance
            ks = buckets_below(r) if self.max_rank == "auto" else halvings(cap or r)
            anchor = self.bisect([top, *(self.capped(k) for k in ks), zero])
            if self.max_rank == "auto" and anchor not in (top, zero):
                cap = max(anchor.values())
                cap_quality = self.measure(anchor)
                # below the bucket, halve on as the free search does (ranks measured already cost no pass)
                anchor = self.bisect([anchor, *(self.capped(k) for k in halvings(cap)), zero])
            # 2. per-module ranks below that anchor, along the allocation path of the cost curves cut at the anchor
            if anchor != zero:
                self.bisect(self.path_below(anchor))
            # the best quality may have improved during the search: pick among everything measured under the cap
            feasible = [
                p for p in self.curve if self.ok(p["quality"]) and (cap is None or max(p["ranks"].values()) <= cap)
            ]
            sign = -1.0 if self.higher_is_better else 1.0
            chosen = min(feasible, key=lambda p: (p["params"], sign * p["quality"]))["ranks"]
        return self.result(chosen, metric, cap=cap, cap_quality=cap_quality)

    def within_budget(self, max_params: int, metric: str) -> ShrinkResult:
        self.start(None)
        cap = self.max_rank if isinstance(self.max_rank, int) else None
        path = self.path if cap is None else self.path_below(self.capped(cap))
        # the first configuration within budget keeps the most parameters the budget allows
        chosen = next(ranks for ranks in path if self.params_of(ranks) <= max_params)
        if chosen not in (self.path[0], dict.fromkeys(self.full, 0)):
            self.measure(chosen)
        return self.result(chosen, metric, max_params=max_params, cap=cap)

    def result(self, chosen, metric, max_params=None, cap=None, cap_quality=None) -> ShrinkResult:
        point = next(p for p in reversed(self.curve) if p["ranks"] == chosen)
        curve = [
            {
                "params": p["params"],
                "quality": p["quality"],
                "within": None if max_params is not None else self.ok(p["quality"]),
            }
            for p in self.curve
        ]
        return ShrinkResult(
            ranks=dict(chosen),
            quality=point["quality"],
            best_quality=self.best(),
            full_quality=self.full_quality,
            base_quality=self.base_quality,
            params=self.params_of(chosen),
            full_params=self.params_of(self.full),
            tolerance=self.tolerance,
            mode=self.mode,
            metric=metric,
            higher_is_better=self.higher_is_better,
            passes=len(self.curve) + 1,
            max_params=max_params,
            max_rank=self.max_rank,
            rank_cap=cap,
            cap_quality=cap_quality,
            curve=curve,
        )
