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

`max_rank=N` caps every module at N first (the search starts from the capped adapter, measured once, and halves from
N); `max_rank="auto"` bisects step 3's uniform ranks over vLLM's `--max-lora-rank` buckets instead of halvings, so its
anchor is the smallest bucket whose capped adapter is within tolerance. `shrink_family` runs one search per tolerance
from one sensitivity pass, measuring each configuration once.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.utils.checkpoint
from tqdm.auto import tqdm

from .evaluate import batch_loss_sum, eval_loss, model_device
from .export import VLLM_MAX_LORA_RANKS
from .layer import svd_basis
from .loading import release_host_memory
from .options import check_max_rank, check_tolerance
from .ranks import active_adapter_name, at_ranks, elastic_layers, max_ranks, module_shapes

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

    def to_dict(self) -> dict:
        return asdict(self)


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


@contextlib.contextmanager
def _checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each transformer block's activations in the backward pass (non-reentrant checkpointing).

    transformers checkpoints a block only when the block itself is in training mode; only the blocks' own flags are
    set, so every layer inside (dropout, elastic draws) stays in eval mode.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError("gradient checkpointing needs a transformers model with checkpointable blocks; this has none")
    saved = [(m.training, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in blocks]
    for m in blocks:
        m.training, m.gradient_checkpointing = True, True
        m._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    try:
        yield
    finally:
        for m, (training, checkpointing, func) in zip(blocks, saved):
            m.training, m.gradient_checkpointing = training, checkpointing
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


def sensitivity(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    adapter_name: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, torch.Tensor]:
    """Estimated loss increase `c_m(k)` for truncating each module alone to k = 0..r_m (one forward+backward pass).

    Memory stays below one training step's at the eval batch size: every parameter is frozen and the graph starts at
    the input embeddings, so the backward pass computes activation gradients only (no weight gradient, and no
    module input kept for one).
    """
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
            basis = None
            if state.basis == "svd":  # components in the singular basis: z = M h, and dL/dz = N^T dL/dh
                basis = [t.double() for t in svd_basis(state, module.weight, layer.lora_B[adapter].weight)]

            def on_grad(u):
                z, u = h.detach().double(), u.double()
                if basis is not None:
                    z, u = z @ basis[0].T, u @ basis[1]
                p = (u * z).reshape(-1, r)  # (N, r): per-token u_i z_i
                prefix = torch.nn.functional.pad(p.cumsum(1), (1, 0))  # (N, r + 1): sum_{i<k} u_i h_i
                v = prefix * scale.to(p.device) - prefix[:, -1:]  # (N, r + 1): first-order loss change at k
                costs[name] += v.square().sum(0).cpu()

            if h.requires_grad:
                h.register_hook(on_grad)

        handles.append(layer.lora_A[adapter].register_forward_hook(on_forward))

    for name, layer in layers.items():
        attach(name, layer)
    # with every parameter frozen, gradients start at the input embeddings: the backward pass computes activation
    # gradients only, and no module input is kept for a weight gradient
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True)))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        with at_ranks(model, None, adapter), _checkpointed(model, gradient_checkpointing):
            for p in params:
                p.requires_grad_(False)
            for batch in tqdm(batches, desc="sensitivity", disable=not progress, leave=False):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, _ = batch_loss_sum(model, batch, device)
                loss.backward()
                if device.type == "cpu":
                    release_host_memory()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
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


def _vllm_buckets_below(r: int) -> list[int]:
    return [b for b in reversed(VLLM_MAX_LORA_RANKS) if b < r]


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

    costs = sensitivity(model, batches, adapter, progress, autocast_dtype, gradient_checkpointing)
    bar.update(1)
    search = _Search(costs, widths, max_ranks(model, adapter), probe, mode, higher_is_better, max_passes, max_rank)
    try:
        if max_params is not None:
            results = [search.within_budget(max_params, metric_name)]
        else:
            results = [search.run(tolerance, metric_name) for tolerance in tolerances]
    finally:
        bar.close()
    for result in results:
        result.passes_run = len(measured) + 1
    return results


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
            ks = _vllm_buckets_below(r) if self.max_rank == "auto" else _halvings(cap or r)
            anchor = self.bisect([top, *(self.capped(k) for k in ks), zero])
            if self.max_rank == "auto" and anchor not in (top, zero):
                cap = max(anchor.values())
                cap_quality = self.measure(anchor)
                # below the bucket, halve on as the free search does (ranks measured already cost no pass)
                anchor = self.bisect([anchor, *(self.capped(k) for k in _halvings(cap)), zero])
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
