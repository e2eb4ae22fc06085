"""Advice on the rank to train at (r_max), read off a shrink: was the run short of rank, or would a smaller r do?

The rank the task needs is the largest rank shrink chose, except that a module kept at its full rank counts at half
that rank when halving it costs at most `CAPACITY_LIMIT` tolerances (measured: one pass, the other modules at their
chosen ranks). Then:

- **capacity-limited** when the needed rank reaches r_max / `CAPACITY_SHARE`: train at 2 r_max;
- **oversized** when the smallest power of two holding `ROOM` times the needed rank is below r_max: that r would have
  held the chosen ranks with room to spare, for the adapter weights, gradients and AdamW state it saves;
- otherwise r_max **fits**.

`CAPACITY_SHARE` and `ROOM` are set by retraining at every r of a grid, on two tasks and three seeds
(`scripts/rank_advice_study.py`, docs/results.md): a capacity-limited run's rerun at 2 r_max must shrink to a better
adapter by more than the tolerance, an oversized run's rerun at the advised r to within the tolerance of it.
"""

from __future__ import annotations

# a module kept at full rank needs it when halving it costs more than this many tolerances
CAPACITY_LIMIT = 1.0
# capacity-limited when the needed rank reaches r_max / CAPACITY_SHARE
CAPACITY_SHARE = 2
# an oversized run's advised r holds the needed rank this many times over
ROOM = 2
# bytes each adapter parameter takes in training: the fp32 weight, its gradient and AdamW's two moments
TRAINING_BYTES_PER_PARAM = 16


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def halved_at_full_rank(ranks: dict[str, int], full: dict[str, int]) -> dict[str, int] | None:
    """`ranks` with every module kept at its full rank halved (the configuration the advice prices); None when no
    module is at full rank."""
    if not any(0 < k == full[name] for name, k in ranks.items()):
        return None
    return {name: k // 2 if 0 < k == full[name] else k for name, k in ranks.items()}


def rank_advice(
    ranks: dict[str, int],
    full: dict[str, int],
    widths: dict[str, int],
    cut_cost: float | None = None,
    metric: str = "eval_loss",
    room: int = ROOM,
    capacity_share: int = CAPACITY_SHARE,
) -> dict:
    """The r_max advice for chosen `ranks` of modules trained at `full` ranks (`widths[m]`: in + out features).

    `cut_cost`: what halving the modules kept at full rank costs, in tolerances (None: not measured, so they count
    at full rank). Returns the verdict ("capacity-limited", "oversized" or "fits"), the rank `advised_r`, the
    needed rank, the modules kept at full rank, the training memory the advised r saves (negative: costs) and a
    one-line message.
    """
    r_max = max(full.values())
    at_full = sorted(name for name, k in ranks.items() if 0 < k == full[name])
    cheap = cut_cost is not None and cut_cost <= CAPACITY_LIMIT
    need = max((k // 2 if cheap and name in at_full else k for name, k in ranks.items()), default=0)
    smaller = _power_of_two_at_least(room * max(1, need))
    if need * capacity_share >= r_max:
        verdict, advised = "capacity-limited", 2 * r_max
    elif smaller < r_max:
        verdict, advised = "oversized", smaller
    else:
        verdict, advised = "fits", r_max
    # every module's rank scaled by advised / r_max (a rank_pattern keeps its proportions)
    params_now = sum(full[name] * widths[name] for name in full)
    saved = round(params_now * (1 - advised / r_max)) * TRAINING_BYTES_PER_PARAM
    cut = ""
    if cut_cost is not None:
        cut = f"; halving the {len(at_full)} modules kept at full rank costs {cut_cost:.2f} tolerances"
    if verdict == "capacity-limited":
        message = f"capacity-limited: the chosen ranks need {need} of r_max {r_max}{cut}: train at r = {advised}"
    elif verdict == "oversized":
        message = (
            f"oversized: the chosen ranks need {need} of r_max {r_max}; r = {advised} would have sufficed here, "
            f"with {saved / 2**20:,.1f} MiB ({100 * (1 - advised / r_max):.0f}%) less adapter training state"
        )
    else:
        message = f"r_max {r_max} fits: the chosen ranks need {need}{cut}"
    return {
        "verdict": verdict,
        "r_max": r_max,
        "advised_r": advised,
        "needed_rank": need,
        "largest_rank": max(ranks.values(), default=0),
        "full_rank_modules": at_full,
        "cut_cost_tolerances": cut_cost,
        "training_memory_saved_bytes": saved,
        "message": message,
    }
