"""Tables and plots for scripts/recipe_study.py: one PNG per (task, steps), one markdown file per study JSON, and
(`--ratio-png`) one picture of the elastic arms over plain LoRA's SVD truncation across studies.

Each arm's learning rate is chosen on dev, at seed 0: an elastic arm by its mean dev loss over the uniform ranks (what
it delivers is every truncation), plain LoRA at r_max by its full rank, a grid LoRA at its rank. Numbers are test
loss at that lr, the mean over the seeds run there, with the spread (max - min) when there are several.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path

# settings retired since (runs of older study files): drawn in the tables only, so the plots show what a user can
# still choose
RETIRED = ("index basis", "truncation_", "distill_", "+", "basis_refresh_steps=")


def _mean_dev(entry: dict) -> float:
    """Mean dev loss over the ranks a run was evaluated at: every uniform rank for elastic, its own rank for LoRA."""
    return statistics.mean(entry["dev"].values())


def _by_arm(runs: list[dict]) -> dict[tuple, list[dict]]:
    by_arm = defaultdict(list)
    for entry in runs:
        by_arm[(entry["task"], entry["steps"], entry["arm"])].append(entry)
    return by_arm


def dev_by_lr(entries: list[dict]) -> dict[float, float]:
    """lr -> the dev loss an arm's lr is chosen by, at seed 0 (at the best seed where no seed 0 ran)."""
    seed0 = [e for e in entries if e["seed"] == 0] or entries
    out = {}
    for entry in seed0:
        out[entry["lr"]] = min(out.get(entry["lr"], float("inf")), _mean_dev(entry))
    return out


def at_chosen_lr(entries: list[dict]) -> list[dict]:
    """One arm's runs (all seeds) at the lr chosen on dev at seed 0."""
    sweep = dev_by_lr(entries)
    lr = min(sweep, key=sweep.get)
    return [e for e in entries if e["lr"] == lr]


def chosen(runs: list[dict]) -> dict[tuple, list[dict]]:
    """(task, steps, arm) -> the runs (all seeds) at the lr chosen on dev at seed 0."""
    return {key: at_chosen_lr(entries) for key, entries in _by_arm(runs).items()}


def summary(entries: list[dict], field: str = "test", curve: str | None = None) -> dict[str, tuple[float, float]]:
    """rank -> (mean, spread) over seeds of one curve (`curve='svd'` for plain LoRA's SVD truncations)."""
    values = defaultdict(list)
    for entry in entries:
        for k, v in (entry[curve] if curve else entry)[field].items():
            values[k].append(v)
    return {k: (statistics.mean(v), max(v) - min(v)) for k, v in values.items()}


def _cell(stat: tuple[float, float] | None, n: int) -> str:
    if stat is None:
        return ""
    return f"{stat[0]:.3f}" + (f" ±{stat[1] / 2:.3f}" if n > 1 else "")


def _stem(out: Path, task: str) -> str:
    """The plots' file-name stem: the task, or the JSON's own name for a second study of it (`cmudict_clip.json`)."""
    return task if out.stem == task else out.stem


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(results: dict, out: Path) -> None:
    plt = _pyplot()
    by_arm = _by_arm(list(results["runs"].values()))
    picked = {key: at_chosen_lr(entries) for key, entries in by_arm.items()}
    clipped = f" Gradient clipped at norm {results['max_grad_norm']:g}." if results.get("max_grad_norm") else ""
    model = f"{results['model']}, " if results.get("model", "smollm2") != "smollm2" else ""
    rows = results.get("eval_rows", 300)
    lines = [
        f"{model}{results.get('machine', '')}. Test loss at the lr chosen on dev (seed 0); mean ±half-spread over "
        f"seeds; dev and test {rows // 2} rows each." + clipped,
        "",
    ]
    for task, steps in sorted({(t, s) for t, s, _ in picked}):
        arms = {arm: entries for (t, s, arm), entries in picked.items() if (t, s) == (task, steps)}
        ranks = sorted({int(k) for entries in arms.values() for e in entries for k in e.get("svd", e)["test"]})
        curves = {}
        if "lora" in arms:
            curves["plain LoRA r_max, SVD-truncated"] = (summary(arms["lora"], curve="svd"), arms["lora"])
        grid = {arm[5:]: summary(entries)[arm[5:]] for arm, entries in arms.items() if arm.startswith("lora@")}
        if grid:
            grid[str(ranks[-1])] = summary(arms["lora"])[str(ranks[-1])] if "lora" in arms else None
            curves["LoRA trained at k (grid)"] = ({k: v for k, v in grid.items() if v}, [])
        for arm, entries in sorted(arms.items()):
            spec = arm.split(":", 1)[-1]
            if spec == "lora" and arm != "lora":  # plain LoRA run again under a name (newer code): table only
                curves[f"plain LoRA r_max, SVD-truncated, {arm}"] = (summary(entries, curve="svd"), entries)
            elif not spec.startswith("lora"):
                curves[f"elastic: {arm}"] = (summary(entries), entries)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for label, (curve, _) in curves.items():
            if any(mark in label for mark in RETIRED) or "SVD-truncated, " in label:  # in the table only
                continue
            ks = sorted(curve, key=int)
            ax.errorbar(
                [int(k) for k in ks], [curve[k][0] for k in ks], yerr=[curve[k][1] / 2 for k in ks],
                fmt="o-" if "grid" not in label else "s--", capsize=3, label=label,
            )  # fmt: skip
        if "plain LoRA r_max, SVD-truncated" in curves:  # keep the interesting range; far-off arms leave the plot
            worst = max(v[0] for v in curves["plain LoRA r_max, SVD-truncated"][0].values())
            best = min(v[0] for curve, _ in curves.values() for v in curve.values())
            ax.set_ylim(best - 0.02, worst + 0.3 * (worst - best))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k (every module)")
        ax.set_ylabel("test eval loss")
        ax.set_title(f"{model}{task}, {steps} steps")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out.parent / f"{_stem(out, task)}_{steps}.png", dpi=100)
        plt.close(fig)

        lines += [f"## {task}, {steps} steps", "", "| arm (lr, seeds) | " + " | ".join(f"k={k}" for k in ranks) + " |"]
        lines.append("|---" * (len(ranks) + 1) + "|")
        for label, (curve, entries) in curves.items():
            lr = f"{entries[0]['lr']:g}, {len(entries)}" if entries else "best lr each"
            cells = " | ".join(_cell(curve.get(str(k)), len(entries)) for k in ranks)
            lines.append(f"| {label} ({lr}) | {cells} |")
        shrunk = [(arm, e) for arm, entries in sorted(arms.items()) for e in entries if "shrink" in e]
        if shrunk:
            lines += [
                "",
                "| shrink | tolerance | seed | params | test loss | largest rank |",
                "|---|---|---|---|---|---|",
            ]
            for arm, e in shrunk:
                for tol, s in e["shrink"].items():
                    cells = f"{float(tol):.1%} | {e['seed']} | {s['params']:,} | {s['test']:.3f} | {s['max_rank']}"
                    lines.append(f"| {arm} | {cells} |")
        sweeps = {arm: dev_by_lr(e) for (t, s, arm), e in by_arm.items() if (t, s) == (task, steps)}
        lines += [
            "",
            "| lr chosen on dev at seed 0 (elastic: mean over ranks; LoRA: its own rank) | lr: dev loss |",
            "|---|---|",
        ]
        for arm, sweep in sorted(sweeps.items()):
            best = arms[arm][0]["lr"]  # the rate at_chosen_lr picked
            cells = ", ".join(
                f"{lr:g}: " + (f"**{v:.3f}**" if lr == best else f"{v:.3f}") for lr, v in sorted(sweep.items())
            )
            lines.append(f"| {arm} | {cells} |")
        seconds = {arm: statistics.mean(e["seconds"] for e in entries) for arm, entries in arms.items()}
        lines += ["", "Training seconds per run: " + ", ".join(f"{a} {s:.0f}" for a, s in sorted(seconds.items())), ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def paired_ratios(results: dict, arm: str) -> dict[tuple[str, int], dict[str, list[float]]]:
    """(task, steps) -> rank -> per-seed L_arm(k) / L_svd(k): the arm against plain LoRA's SVD truncation of the same
    seed, both at their chosen lr (pairing by seed takes out what the seed does to both)."""
    picked = chosen(list(results["runs"].values()))
    out = {}
    for (task, steps, name), entries in picked.items():
        if name != arm:
            continue
        plain = {e["seed"]: e for e in picked.get((task, steps, "lora"), [])}
        ratios = defaultdict(list)
        for e in entries:
            if e["seed"] in plain:
                for k, v in e["test"].items():
                    ratios[k].append(v / plain[e["seed"]]["svd"]["test"][k])
        if ratios:
            out[(task, steps)] = dict(ratios)
    return out


def write_ratio_plot(paths: list[Path], png: Path, arms: tuple[str, ...] = ("default", "full_rank_prob=0.75")) -> None:
    """One picture of goal 1 across studies: each arm's test loss over plain LoRA's SVD truncation (same seed) at every
    rank, one line per (task, steps); below 1 the elastic adapter is the better one."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for path in paths:
        results = json.loads(path.read_text())
        for arm in arms:
            for (task, steps), ratios in sorted(paired_ratios(results, arm).items()):
                ks = sorted(ratios, key=int)
                n = min(len(v) for v in ratios.values())
                means = [statistics.mean(ratios[k]) for k in ks]
                spread = [(max(ratios[k]) - min(ratios[k])) / 2 for k in ks]
                style = "o-" if arm == "default" else "^:"
                label = f"{task} {steps} steps, {arm} ({n} seed{'s' * (n > 1)})"
                colour = next(colours)
                for ax in axes:
                    ax.errorbar([int(k) for k in ks], means, yerr=spread, fmt=style, capsize=3, label=label,
                                color=colour)  # fmt: skip
    for ax in axes:
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k (every module)")
    axes[0].set_ylabel("test loss / plain LoRA SVD-truncated (same seed)")
    axes[1].set_xlim(3, 40)  # the large ranks, where the two routes are within a few percent
    axes[1].set_ylim(0.96, 1.06)
    axes[1].set_title("ranks 4 and up")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Elastic against plain LoRA + SVD truncation, per seed: below 1, elastic is better (goal 1)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json", type=Path, nargs="+", help="study JSONs; their tables and plots go next to them")
    parser.add_argument("--ratio-png", type=Path, help="draw only the goal-1 ratio plot of every JSON given, here")
    args = parser.parse_args()
    if args.ratio_png:
        write_ratio_plot(args.json, args.ratio_png)
    else:
        for path in args.json:
            write_report(json.loads(path.read_text()), path)
