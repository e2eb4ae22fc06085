"""Experimental training modes of scripts/recipe_study.py, each measured and retired, kept so that its rows rerun.

An arm spec that starts with a mode (`sandwich+default`) trains that way; `train_mode` splits the two. What each
mode does and what it measured: docs/recipe_study.md.
"""

from __future__ import annotations

import contextlib
import itertools
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import elasticlora.layer
from elasticlora.evaluate import model_device
from elasticlora.sampler import RankSampler

# experiments: split+/project+/halves+ train full-rank and truncated rows in two passes per step (`train_steps_split`);
# sandwich+ trains every row at full rank and re-runs the truncated rows to learn its output (`sandwich_step`);
# ramp+ grows the share of truncated draws linearly from 0 to the config's over the whole run (`ramp_truncations`),
# anneal+ shrinks it from the config's to 0 (CoTo's progressive activation);
# maps+ trains learned nested rank maps on the truncated rows and A, B on the full-rank rows only (`add_rank_maps`);
# low+ moves the draws of truncated ranks above r / 8 to full rank (`low_truncations_only`)
TRAIN_MODES = ("split+", "project+", "halves+", "sandwich+", "ramp+", "anneal+", "maps+", "low+")


def train_mode(arm: str) -> tuple[str | None, str]:
    """(`split`, `project`, `halves`, `sandwich`, `ramp`, `anneal`, `maps`, `low` or None, the config spec) of an
    arm."""
    spec = arm.split(":", 1)[-1]
    for mode in TRAIN_MODES:
        if spec.startswith(mode):
            return mode[:-1], spec[len(mode) :]
    return None, spec


def model_sampler(model) -> RankSampler:
    """The `RankSampler` the elastic layers of `model` share (the one their training passes draw from)."""
    return next(m.elastic_state["default"].sampler for m in model.modules() if hasattr(m, "elastic_state"))


def train_steps_split(model, batches, steps, lr, seed, autocast_dtype, progress, warmup_steps, mode):
    """`train_steps` with each batch's full-rank rows and truncated rows in two passes, their gradients summed
    (`project`: after removing from the truncated rows' gradient of each tensor its component against the full-rank
    rows' gradient, so truncations never oppose full rank's descent, as A-GEM / PCGrad do). Each pass's loss is
    weighted by its share of the batch's label tokens, so without `project` the step is the one-pass step. `halves`
    (the control for the statistics) runs the same two groups both at full rank: a plain LoRA step.
    Returns (losses, conflict statistics: per logged step, the share of tensors in conflict and their mean cosine)."""
    torch.manual_seed(seed)
    order = list(range(len(batches)))
    random.Random(seed).shuffle(order)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)) * max(0.0, 1.0 - step / steps)
    )
    sampler = model_sampler(model)
    r_max = torch.tensor(sampler._ranks)
    device = model_device(model)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    model.train()
    losses, conflict = [], []
    for step, index in enumerate(itertools.islice(itertools.cycle(order), steps)):
        batch = {k: v.to(device) for k, v in batches[index].items()}
        table = sampler._draw(batch["input_ids"].shape[0])  # this step's draws, as the one-pass loop makes them
        full = (table == r_max).all(1)  # on the host, like the table; it indexes device tensors too
        if mode == "halves":
            table = r_max.expand_as(table)
        tokens = (batch["labels"][:, 1:] != -100).sum(1).double()
        if mode == "sandwich":
            losses.append(sandwich_step(model, sampler, batch, table, ~full, tokens, autocast))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            continue
        grads, loss_sum = [], 0.0
        for rows in (full.nonzero()[:, 0], (~full).nonzero()[:, 0]):
            if len(rows) == 0:
                grads.append([torch.zeros_like(p) for p in params])
                continue
            sampler._draw = lambda n, sub=table[rows]: sub  # the pass takes its rows' draws
            with autocast:
                loss = model(**{k: v[rows] for k, v in batch.items()}).loss
            weight = float(tokens[rows].sum() / tokens.sum())
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            grads.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
            optimizer.zero_grad(set_to_none=True)
            del sampler._draw
        cosines = []
        for p, g_full, g_trunc in zip(params, *grads):
            dot = (g_full * g_trunc).sum()
            norms = g_full.norm() * g_trunc.norm()
            cosines.append(float(dot / norms) if norms > 0 else 0.0)
            if mode == "project" and dot < 0:
                g_trunc = g_trunc - dot / g_full.square().sum() * g_full
            p.grad = g_full + g_trunc
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        if step % 10 == 0 or step == steps - 1:
            negative = [c for c in cosines if c < 0]
            conflict.append({
                "step": step, "share": len(negative) / len(cosines), "mean_cos": sum(cosines) / len(cosines),
                "mean_negative_cos": sum(negative) / max(1, len(negative)),
            })  # fmt: skip
    model.eval()
    return losses, conflict


def sandwich_step(model, sampler, batch, table, truncated, tokens, autocast) -> float:
    """One backward of the sandwich rule with in-place distillation at per-token parity: every row at full rank on its
    labels (a plain LoRA step), then the rows the config's draws truncate run again at their drawn ranks and learn
    the full rank's detached next-token distribution; their mean KL is weighted by their share of the batch's label
    tokens, so a truncated token pulls as hard as a label token does (the retired `distill_fraction` weighted a
    2-row slice like the whole batch). Returns the labels' loss."""
    sampler._draw = lambda n: table.new_tensor(sampler._ranks).expand(n, -1)  # the labels' pass: every row full rank
    with autocast:
        out = model(**batch)
    loss = out.loss
    rows = truncated.nonzero()[:, 0]
    if len(rows):
        sampler._draw = lambda n: table[rows]
        with autocast:
            student = model(**{k: v[rows] for k, v in batch.items() if k != "labels"}).logits
        scored = batch["labels"][rows, 1:] != -100  # position t predicts label t + 1
        log_t = F.log_softmax(out.logits[rows, :-1][scored].detach().float(), -1)
        log_s = F.log_softmax(student[:, :-1][scored].float(), -1)
        kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
        loss = loss + kl * float(tokens[rows].sum() / tokens.sum())
    del sampler._draw
    loss.backward()
    return out.loss.item()


def ramp_truncations(model, total_draws: int, anneal: bool = False) -> None:
    """Progressive shrinking (OFA): each truncated rank's probability is the config's times the share of the run
    done (draws made / `total_draws`), so training starts as plain LoRA and ends at the config's distribution.
    `anneal`: times the share left instead, from the config's distribution to plain LoRA (CoTo, arXiv 2506.05713)."""
    sampler = model_sampler(model)

    def scale(k: int, r: int) -> float:
        done = min(1.0, sampler.draws / total_draws)
        return 1.0 - done if anneal else done

    _scale_truncations(sampler, scale)


def _scale_truncations(sampler: RankSampler, scale) -> None:
    """Each truncated rank k of a layer of rank r is drawn with the config's probability times `scale(k, r)` (read at
    every draw); what that takes away goes to full rank."""
    configured = sampler.probabilities

    def probabilities(r: int) -> dict[int, float]:
        probs = {k: p * scale(k, r) for k, p in configured(r).items() if k != r}
        return {**probs, r: 1.0 - sum(probs.values())}

    sampler.probabilities = probabilities


def low_truncations_only(model) -> None:
    """Truncated draws only where SVD truncation of a plain LoRA fails (experiment): each truncated rank up to r / 8
    keeps the config's probability, and that of the ranks above it (8 and 16 of 32 at the log2 defaults) goes to
    full rank. Plain LoRA's SVD truncation at r / 4 and up is within ~2.5% of its full rank on both tasks (cmudict
    180 clipped: +2.3% at 8), where the default's truncation is no better, so draws there buy nothing at those ranks
    and still take their rows' signal from full rank. Measured at 180 steps, clipped: 0.004-0.006 better than the
    default at every rank on the cmudict mean (three seeds), inside the spread; not adopted."""
    _scale_truncations(model_sampler(model), lambda k, r: float(k <= r // 8))


def _signed(m: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular basis (M, N) with each component's sign fixed (largest entry of its column of N positive), so
    learned maps expressed in it survive the basis's recomputation (an eigensolver may flip any sign)."""
    index = n.abs().argmax(0, keepdim=True)
    sign = torch.where(n.gather(0, index)[0] < 0, -1.0, 1.0).to(n.dtype)
    return m * sign[:, None], n * sign


def add_rank_maps(model) -> None:
    """Learned nested rank maps (experiment): each elastic layer gets two r x r matrices U, V (identity at first)
    and its rank-k truncation becomes `B N U[:, :k] V[:, :k]^T M A` (with the singular basis (M, N): at U = V = I
    it is the SVD truncation). Full-rank rows train A and B exactly as plain LoRA does and never see U, V;
    truncated rows train only U and V (A and B detached), so truncations reorganise the adapter without moving its
    full-rank function. Export would write `(V_k^T M A, B N U_k)`: a plain LoRA at rank k."""
    # the layers' training forward and rank-k factors (eval, shrink); layers without maps still run the library's code
    elasticlora.layer.ElasticVariant.forward = staticmethod(_maps_forward)
    elasticlora.layer.prefix_factors = _maps_prefix_factors
    for module in model.modules():
        if hasattr(module, "elastic_state"):
            weight = module.lora_A["default"].weight
            eye = torch.eye(module.elastic_state["default"].r, device=weight.device, dtype=torch.float32)
            module.rank_maps = nn.ParameterDict({"u": nn.Parameter(eye.clone()), "v": nn.Parameter(eye.clone())})


_FORWARD, _PREFIX_FACTORS = elasticlora.layer.ElasticVariant.forward, elasticlora.layer.prefix_factors


def _maps_forward(module, active_adapter, x, result, **kwargs):
    """`ElasticVariant.forward` for a layer with maps: full-rank rows as plain LoRA, truncated rows through the maps
    with A and B detached (the library's code for every other layer and call)."""
    maps = getattr(module, "rank_maps", None)
    state = module.elastic_state[active_adapter]
    if maps is None or not (state.rank is None and module.training and state.samples):
        return _FORWARD(module, active_adapter, x, result, **kwargs)
    lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
    dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
    h = lora_a(dropout(x))
    cut = state.sampler.truncation(state.column, h)
    if cut is None:
        return result + lora_b(h) * scaling
    drop = _drop_mask(cut, h, state.r)
    m, n = _signed(*state.basis.training(lora_a.weight, lora_b.weight, torch.float32))
    truncated = drop.amax(-1, keepdim=True)  # (B, 1, ..., 1): 1 for a truncated row
    g = F.linear(F.linear(dropout(x), lora_a.weight.detach()), (maps["v"].T @ m).to(h.dtype))  # V^T M A x
    z = F.linear(g * (1 - drop), (n @ maps["u"]).to(h.dtype))  # N U_k V_k^T M A x
    y = lora_b(h * (1 - truncated)) + F.linear(z * truncated, lora_b.weight.detach())
    return result + y * scaling


def _drop_mask(cut, h: torch.Tensor, r: int) -> torch.Tensor:
    """(B or 1, 1, ..., r) mask of the components a `Truncation` drops from each row of `h` (1: dropped)."""
    keep = cut.keep if cut.keep is not None else h.new_ones((1,) * (h.dim() - 1) + (cut.k,))
    drop = 1 - F.pad(keep, (0, r - cut.k))
    return drop if cut.rows is None else h.new_zeros((h.shape[0],) + drop.shape[1:]).index_copy(0, cut.rows, drop)


def _maps_prefix_factors(module, adapter, k):
    """fp32 `(V_k^T M A, B N U_k)` for a layer with maps (eval and shrink at rank k), else the library's factors."""
    maps = getattr(module, "rank_maps", None)
    if maps is None:
        return _PREFIX_FACTORS(module, adapter, k)
    with torch.no_grad(), torch.autocast(maps["u"].device.type, enabled=False):
        weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        m, n = _signed(*module.elastic_state[adapter].basis.current(weight_a, weight_b))
        a, b = weight_a.float(), weight_b.float()
        return (maps["v"][:, :k].T @ m) @ a, b @ (n @ maps["u"][:, :k])
