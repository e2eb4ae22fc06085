"""Advice on the rank to train at (r_max), read off a shrink: was the run short of rank, or would a smaller r do?

- **Capacity-limited**: some modules kept their full trained rank, and cutting just those to half their rank (one
  measured pass, the rest at their chosen ranks) costs more than `CAPACITY_LIMIT` tolerances: quality was still
  rising at r_max there, so train at r = 2 r_max.
- **Oversized**: the largest chosen rank, times `ROOM`, fits in a power of two below r_max: that r would have held
  the chosen ranks with room to spare, for the adapter weights, gradients and AdamW state it saves.
- Otherwise r_max fits.

The two thresholds are set from retraining runs (`scripts/rank_advice_study.py`, docs/results.md): a run at half
the advised r_max and one at twice it, on two tasks.
"""

from __future__ import annotations

# capacity-limited when halving the modules kept at full rank costs more than this many tolerances
CAPACITY_LIMIT = 1.0
# an advised r holds the largest chosen rank this many times over
ROOM = 2
# bytes each adapter parameter takes in training: the fp32 weight, its gradient and AdamW's two moments
TRAINING_BYTES_PER_PARAM = 16


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def rank_advice(
    ranks: dict[str, int],
    full: dict[str, int],
    widths: dict[str, int],
    cut_cost: float | None = None,
    metric: str = "eval_loss",
) -> dict:
    """The r_max advice for chosen `ranks` of modules trained at `full` ranks (`widths[m]`: in + out features).

    `cut_cost`: what halving the modules kept at full rank costs, in tolerances (None: not measured, so never
    capacity-limited). Returns the verdict ("capacity-limited", "oversized" or "fits"), the rank `advised_r`, the
    modules kept at full rank, the training memory the advised r saves (negative: costs) and a one-line message.
    """
    r_max = max(full.values())
    at_full = sorted(name for name, k in ranks.items() if 0 < k == full[name])
    largest = max(ranks.values(), default=0)
    if at_full and cut_cost is not None and cut_cost > CAPACITY_LIMIT:
        verdict, advised = "capacity-limited", 2 * r_max
    else:
        advised = min(r_max, _power_of_two_at_least(ROOM * max(1, largest)))
        verdict = "oversized" if advised < r_max else "fits"
    params_now = sum(full[name] * widths[name] for name in full)
    params_advised = sum(min(advised, full[name] * 2) * widths[name] for name in full)
    saved = (params_now - params_advised) * TRAINING_BYTES_PER_PARAM
    share = (params_now - params_advised) / max(1, params_now)
    if verdict == "capacity-limited":
        message = (
            f"capacity-limited: {len(at_full)} of {len(ranks)} modules kept their full rank, and cutting them to half "
            f"costs {cut_cost:.1f} tolerances of {metric}: train at r = {advised} (r_max was {r_max})"
        )
    elif verdict == "oversized":
        message = (
            f"oversized: the largest chosen rank is {largest} of r_max {r_max}; r = {advised} would have sufficed "
            f"here, with {saved / 2**20:,.1f} MiB ({100 * share:.0f}%) less adapter training state"
        )
    else:
        message = f"r_max {r_max} fits: the largest chosen rank is {largest}"
        if cut_cost is not None:
            message += f"; halving the {len(at_full)} modules at full rank costs {cut_cost:.2f} tolerances"
    return {
        "verdict": verdict,
        "r_max": r_max,
        "advised_r": advised,
        "largest_rank": largest,
        "full_rank_modules": at_full,
        "cut_cost_tolerances": cut_cost,
        "training_memory_saved_bytes": saved,
        "message": message,
    }
