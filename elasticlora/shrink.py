"""Give every adapted module its smallest rank that keeps measured quality within a tolerance.

The search costs a fixed number of passes over the eval data, whatever the model depth:

1. **Sensitivity** (one forward + backward pass). For module m with rank activations `h = A x` and
   `u = dL/dh = scaling * B^T dL/dy`, truncating to k changes the loss, to first order per token, by
   `v_k = u . ((s_k [i < k] - 1) * h)`, where `s_k = (r / k) ** truncation_scale_power`. All r + 1 candidate ranks
   come from one cumulative sum over `u * h`. The cost curve `c_m(k) = sum over tokens of v_k ** 2` is a Fisher-style
   estimate of the loss increase (up to one factor shared by all modules, which the measured step below absorbs).
2. **Allocation.** Minimising `sum_m c_m(k_m) + lam * params_m(k_m)` splits per module; its solutions, as lam grows,
   walk the lower convex hulls of the cost curves. Sorting every hull step by its price (cost increase per parameter
   saved) gives one path of configurations from full rank to all-zero with parameters falling monotonically.
3. **Measured bisection**, where each probe is a real eval pass at those ranks: first over one rank for every
   module, halving from full (r/2, r/4, ..., 1: the prefixes elastic training optimises directly, and the first-order
   costs are least reliable for the large rescaling of a short prefix); then, from the smallest uniform rank within
   tolerance, over the allocation path of the cost curves cut at that rank. The result is the measured configuration
   with the fewest parameters whose quality is within tolerance of the best quality measured (full rank, or a
   truncation that turned out better).

Passes: 1 sensitivity + 1 full rank + 1 base (all ranks 0) + bisection probes, `max_passes` in all (default 12).
A plain (non-elastic) LoRA is first re-factored by SVD of B A so that its prefixes are its best low-rank
approximations (LoRA-Squeeze / PEFT `convert_to_lora`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .evaluate import batch_loss_sum, eval_loss, model_device
from .ranks import active_adapter_name, at_ranks, elastic_layers, max_ranks, module_shapes

Quality = Callable[[nn.Module], float]
MODES = ("relative", "absolute")


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
    curve: list[dict] = field(default_factory=list)  # every measured configuration: params, quality, within

    def to_dict(self) -> dict:
        return asdict(self)


def _check_tolerance(tolerance: float, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ValueError(f"`tolerance` must be a finite number, got {tolerance!r}")
    if tolerance <= 0:
        raise ValueError(f"`tolerance` must be > 0, got {tolerance}")
    if mode == "relative" and tolerance > 1:
        raise ValueError(f"a relative `tolerance` must be in (0, 1] (0.01 = 1%), got {tolerance}")


def within_tolerance(
    quality: float, best: float, tolerance: float, mode: str = "relative", higher_is_better: bool = False
) -> bool:
    """Whether `quality` is within `tolerance` of `best` (relative: a fraction of |best|; absolute: in units)."""
    slack = tolerance * abs(best) if mode == "relative" else tolerance
    return quality >= best - slack if higher_is_better else quality <= best + slack


@torch.no_grad()
def svd_reorder(model: nn.Module, adapter_name: str | None = None) -> None:
    """Re-factor every layer's B A as (U sqrt(S)) (sqrt(S) V^T), components by decreasing singular value.

    B A is unchanged (to rounding), so outputs at full rank are too; each prefix k becomes the best rank-k
    approximation of the update. Works in factored form, O((in + out) r^2) per layer: B = Qb Rb, A^T = Qa Ra,
    B A = Qb (Rb Ra^T) Qa^T, and only the r x r core is decomposed.
    """
    adapter = active_adapter_name(model, adapter_name)
    for layer in elastic_layers(model).values():
        weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        weights = layer.elastic_state[adapter].gains(weight_b.shape[1], weight_b.device, torch.float32)
        q_b, r_b = torch.linalg.qr(weight_b.float() * weights)  # (out, r), (r, r)
        q_a, r_a = torch.linalg.qr(weight_a.float().T)  # (in, r), (r, r)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)
        root = s.sqrt()
        weight_b.copy_((q_b @ u * root / weights).to(weight_b.dtype))
        weight_a.copy_((root[:, None] * (vh @ q_a.T)).to(weight_a.dtype))


def sensitivity(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    adapter_name: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Estimated loss increase `c_m(k)` for truncating each module alone to k = 0..r_m (one forward+backward pass)."""
    adapter = active_adapter_name(model, adapter_name)
    layers = elastic_layers(model)
    costs = {name: torch.zeros(layer.r[adapter] + 1, dtype=torch.float64) for name, layer in layers.items()}
    handles = []

    def attach(name: str, layer: nn.Module) -> None:
        state = layer.elastic_state[adapter]
        r = state.r
        ks = torch.arange(r + 1)
        # s_k for k = 1..r; k = 0 drops the adapter, where the prefix sum is 0 anyway
        scale = torch.tensor([0.0] + [state.scale_at(int(k)) for k in ks[1:]], dtype=torch.float64)

        def on_forward(module, inputs, h):
            def on_grad(u):
                p = (u.double() * h.detach().double()).reshape(-1, r)  # (N, r): per-token u_i h_i
                prefix = torch.nn.functional.pad(p.cumsum(1), (1, 0))  # (N, r + 1): sum_{i<k} u_i h_i
                v = prefix * scale.to(p.device) - prefix[:, -1:]  # (N, r + 1): first-order loss change at k
                costs[name] += v.square().sum(0).cpu()

            if h.requires_grad:
                h.register_hook(on_grad)

        handles.append(layer.lora_A[adapter].register_forward_hook(on_forward))

    for name, layer in layers.items():
        attach(name, layer)
    params = [p for layer in layers.values() for p in layer.lora_A[adapter].parameters()]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with at_ranks(model, None, adapter):
            for p in params:
                p.requires_grad_(True)
            for batch in tqdm(batches, desc="sensitivity", disable=not progress, leave=False):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, _ = batch_loss_sum(model, batch, device)
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return costs


def _halvings(r: int) -> list[int]:
    """r // 2, r // 4, ..., 1: the uniform ranks the search tries before per-module ranks."""
    ks = []
    while r > 1:
        r //= 2
        ks.append(r)
    return ks


def _lower_hull(costs: torch.Tensor) -> list[int]:
    """Ranks on the lower convex hull of the points (k, costs[k]), ascending in k (always includes 0 and r)."""
    hull: list[int] = []
    for k in range(len(costs)):
        while len(hull) >= 2:
            k0, k1 = hull[-2], hull[-1]
            # drop k1 if it lies on or above the segment k0 -> k
            if (costs[k1] - costs[k0]) * (k - k0) >= (costs[k] - costs[k0]) * (k1 - k0):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocation_path(costs: dict[str, torch.Tensor], widths: dict[str, int]) -> list[dict[str, int]]:
    """Configurations from full rank to all-zero, parameters falling, ordered by marginal cost per parameter.

    `widths[m]` is the parameter cost of one rank of module m (in_features + out_features).
    """
    steps = []
    start = {}
    for name, c in costs.items():
        c = c.double()
        # the full rank is the reference: never let a truncation estimate look better than it
        c = torch.maximum(c, torch.zeros_like(c))
        c[-1] = 0.0
        hull = _lower_hull(c)
        start[name] = hull[-1]
        for lo, hi in zip(hull[:-1], hull[1:]):
            price = float(c[lo] - c[hi]) / (widths[name] * (hi - lo))
            steps.append((price, name, lo))
    # a module's own hull steps come in increasing price, so sorting keeps each module's ranks decreasing
    steps.sort(key=lambda step: step[0])
    path = [dict(start)]
    current = dict(start)
    for _, name, rank in steps:
        current[name] = rank
        path.append(dict(current))
    return path


def shrink(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    tolerance: float | None = 0.01,
    mode: str = "relative",
    max_params: int | None = None,
    quality: Quality | None = None,
    higher_is_better: bool = False,
    max_passes: int = 12,
    adapter_name: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> ShrinkResult:
    """Choose per-module ranks for an elastic model (see the module docstring for the method).

    Args:
        model: a PEFT model with elastic layers (`get_peft_model(..., ElasticLoraConfig())` or `load_elastic`).
        batches: eval batches (`data.eval_batches`); used for the sensitivity pass and, by default, for quality.
        tolerance: allowed loss increase over the best measured quality: a fraction in relative mode (0.01 = 1%),
            units of the metric in absolute mode. Ignored when `max_params` is given.
        max_params: a parameter budget instead of a tolerance: the best configuration on the path within it.
        quality: `quality(model) -> float` replacing eval loss (e.g. accuracy with `higher_is_better=True`).
        max_passes: total passes over the eval data (sensitivity and every measured configuration); at least 4.
    """
    if max_params is None:
        _check_tolerance(tolerance, mode)
    elif isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 0:
        raise ValueError(f"`max_params` must be a non-negative int, got {max_params!r}")
    if max_passes < 4:
        raise ValueError(f"`max_passes` must be >= 4 (sensitivity, full rank, base, one probe), got {max_passes}")
    if not batches:
        raise ValueError("`batches` is empty: shrink needs eval data")
    adapter = active_adapter_name(model, adapter_name)
    shapes = module_shapes(model, adapter)
    widths = {name: sum(shape) for name, shape in shapes.items()}
    full = max_ranks(model, adapter)
    metric_name = "eval_loss" if quality is None else getattr(quality, "__name__", "quality")
    higher_is_better = bool(quality is not None and higher_is_better)

    def params_of(ranks: dict[str, int]) -> int:
        return sum(k * widths[name] for name, k in ranks.items())

    bar = tqdm(total=max_passes, desc="shrink", unit="pass", disable=not progress)
    curve: list[dict] = []

    def measure(ranks: dict[str, int]) -> float:
        with at_ranks(model, ranks, adapter):
            if quality is None:
                value = eval_loss(model, batches, progress=progress, autocast_dtype=autocast_dtype)
            else:
                value = float(quality(model))
        if not math.isfinite(value):
            raise FloatingPointError(f"{metric_name} is {value} at {params_of(ranks)} adapter parameters")
        curve.append({"params": params_of(ranks), "quality": value, "ranks": dict(ranks)})
        bar.update(1)
        bar.set_postfix({metric_name: f"{value:.4f}", "params": params_of(ranks)})
        return value

    costs = sensitivity(model, batches, adapter, progress=progress, autocast_dtype=autocast_dtype)
    bar.update(1)
    path = allocation_path(costs, widths)  # path[0] is full rank, path[-1] all zero
    zero = dict.fromkeys(full, 0)
    full_quality = measure(path[0])
    base_quality = measure(zero)

    def best_measured() -> float:
        values = [point["quality"] for point in curve]
        return max(values) if higher_is_better else min(values)

    def ok(value: float) -> bool:
        return within_tolerance(value, best_measured(), tolerance, mode, higher_is_better)

    if max_params is not None:
        # the first configuration within budget keeps the most parameters the budget allows
        chosen_ranks = next(ranks for ranks in path if params_of(ranks) <= max_params)
        if chosen_ranks not in (path[0], zero):
            measure(chosen_ranks)
    else:

        def bisect(configs: list[dict[str, int]]) -> dict[str, int]:
            """The last config of `configs` found within tolerance; configs[0] and configs[-1] are measured.

            The all-zero end is probed towards even when it looks within tolerance: a later probe may beat both ends.
            """
            lo, hi = 0, len(configs) - 1  # lo: known within tolerance; hi: known outside (or the all-zero end)
            while hi - lo > 1 and len(curve) + 1 < max_passes:
                mid = (lo + hi) // 2
                if ok(measure(configs[mid])):
                    lo = mid
                else:
                    hi = mid
            return configs[lo]

        # 1. the same rank for every module, halving from full: the prefixes elastic training optimises directly
        r = max(full.values())
        uniform = [{name: min(k, r_m) for name, r_m in full.items()} for k in _halvings(r)]
        anchor = bisect([path[0], *uniform, zero])
        # 2. per-module ranks below that anchor, along the allocation path of the cost curves cut at the anchor
        if anchor != zero:
            cut = {name: costs[name][: anchor[name] + 1] for name in costs}
            bisect(allocation_path(cut, widths))
        # the best quality may have improved during the search: pick among everything measured
        feasible = [point for point in curve if ok(point["quality"])]
        sign = -1.0 if higher_is_better else 1.0
        chosen_ranks = min(feasible, key=lambda point: (point["params"], sign * point["quality"]))["ranks"]
    bar.close()
    chosen = next(point for point in reversed(curve) if point["ranks"] == chosen_ranks)
    best = best_measured()
    for point in curve:
        point["within"] = None if max_params is not None else ok(point["quality"])
        point.pop("ranks")
    return ShrinkResult(
        ranks=dict(chosen_ranks),
        quality=chosen["quality"],
        best_quality=best,
        full_quality=full_quality,
        base_quality=base_quality,
        params=params_of(chosen_ranks),
        full_params=params_of(full),
        tolerance=None if max_params is not None else tolerance,
        mode=mode,
        metric=metric_name,
        higher_is_better=higher_is_better,
        passes=len(curve) + 1,
        max_params=max_params,
        curve=curve,
    )
