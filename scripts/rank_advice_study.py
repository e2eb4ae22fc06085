"""Does the r_max advice hold when the run is repeated at the advised r, and how early does the shrink estimate settle?

Trains SmolLM2-135M-Instruct with `ElasticLoraConfig(r=R)` (the default recipe otherwise) as `recipe_study.py` does
(batch 16, AdamW, 5% warmup, linear decay, gradient clipped at norm 1), on `wordnet` or `cmudict`. During training,
`estimate_shrink` runs at 10%, 20% and 50% of the steps and at the end, on the first 64 dev rows (what
`add_shrink_estimate` takes by default); at the end `shrink` runs on dev (the eval file's first 150 rows) at the
tolerance, and the export is scored on test (the next 150), with its r_max advice. `--follow-advice` repeats a run
whose advice is not "fits" at the advised r (same task, length, learning rate and seed). Every run is kept in the JSON
as soon as it ends and runs already there are skipped, so a cut-off study resumes where it stopped. `--report`
prints the goal tables from the JSON. `--checkpoints DIR` also saves the adapter wherever the estimate runs (under
DIR/<run key>/<fraction>); `--re-estimate` then calls `estimate_shrink` again on every saved adapter of the runs in
the JSON and replaces their estimates (keeping the replaced ones), so a changed estimator is measured without
retraining.

    python scripts/rank_advice_study.py --task cmudict --r 4 --steps 60 --lr 2e-3 --seeds 0 1 2 --follow-advice \\
        --out scripts/results/rank_advice.json
    python scripts/rank_advice_study.py --task wordnet --r 128 --steps 60 --lr 2e-3 --seeds 0 1 2 --follow-advice \\
        --out scripts/results/rank_advice.json
    python scripts/rank_advice_study.py --task cmudict --r 32 --steps 60 180 --lr 2e-3 --seeds 0 1 2 \\
        --out scripts/results/rank_advice.json
    python scripts/rank_advice_study.py --task wordnet --r 32 --steps 120 --lr 1e-3 --seeds 0 1 2 \\
        --checkpoints /tmp/rank_advice --out scripts/results/rank_advice.json
    python scripts/rank_advice_study.py --task wordnet --re-estimate --checkpoints /tmp/rank_advice \\
        --out scripts/results/rank_advice.json
    python scripts/rank_advice_study.py --report --out scripts/results/rank_advice.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, estimate_shrink, eval_batches, eval_loss, load_elastic
from elasticlora.advice import CAPACITY_SHARE, ROOM, TRAINING_BYTES_PER_PARAM, rank_advice
from elasticlora.data import load_rows
from elasticlora.shrink import shrink
from elasticlora.vllm import vllm_max_lora_rank

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "scripts"))
from recipe_study import TASKS, commit  # noqa: E402

from common import load_model, train_steps  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.5, 1.0)
SAMPLE_ROWS = 64


def run_key(task: str, steps: int, r: int, lr: float, seed: int) -> str:
    return f"{task}|{steps}|r{r}|{lr:g}|{seed}"


def checkpoint_dir(root: Path, key: str, fraction: float) -> Path:
    return root / key.replace("|", "_") / f"{fraction:g}"


class Study:
    def __init__(self, args):
        self.args = args
        self.base, tokenizer = load_model(args.model)
        train_path, eval_path = TASKS[args.task]
        self.train = eval_batches(tokenizer, train_path, batch_size=16)
        rows = load_rows(eval_path)[:300]
        self.dev = eval_batches(tokenizer, rows[:150], 32)
        self.test = eval_batches(tokenizer, rows[150:], 32)
        self.sample = eval_batches(tokenizer, rows[:SAMPLE_ROWS], 32)

    def re_estimate(self, key: str, run: dict) -> None:
        """Replace `run`'s estimates by `estimate_shrink` on the adapters saved at each of them; the replaced ones
        are kept under "estimates_before", with the commit that made them."""
        made_by = run.get("estimate_commit", run["commit"])
        run["estimates_before"] = {"commit": made_by, "estimates": copy.deepcopy(run["estimates"])}
        for entry in run["estimates"]:
            path = checkpoint_dir(self.args.checkpoints, key, entry["fraction"])
            model = load_elastic(copy.deepcopy(self.base), path)
            entry.update(_estimate_entry(estimate_shrink(model, self.sample, run["tolerance"])))
        run["estimate_commit"] = commit()

    def run(self, steps: int, r: int, lr: float, seed: int) -> dict:
        key = run_key(self.args.task, steps, r, lr, seed)
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(self.base), ElasticLoraConfig(r=r))
        at = {max(1, round(f * steps)): f for f in FRACTIONS}
        estimates = []

        def on_step(step: int) -> None:
            if step in at:
                estimate = estimate_shrink(model, self.sample, self.args.tolerance)
                estimates.append({"step": step, "fraction": at[step], **_estimate_entry(estimate)})
                if self.args.checkpoints is not None:
                    model.save_pretrained(checkpoint_dir(self.args.checkpoints, key, at[step]))

        start = time.time()
        train_steps(
            model, self.train, steps, lr, seed=seed, progress=False, warmup_steps=max(1, steps // 20),
            max_grad_norm=1.0, on_step=on_step,
        )  # fmt: skip
        seconds = time.time() - start - sum(e["seconds"] for e in estimates)
        start = time.time()
        result = shrink(model, self.dev, tolerance=self.args.tolerance, progress=False)
        shrink_seconds = time.time() - start
        ranks = list(result.ranks.values())
        with at_ranks(model, result.ranks):
            test = eval_loss(model, self.test)
        return {
            "steps": steps, "r": r, "lr": lr, "seed": seed,
            "train_seconds": seconds, "step_seconds": seconds / steps,
            "adapter_training_bytes": result.full_params * TRAINING_BYTES_PER_PARAM,
            "full_test": eval_loss(model, self.test),
            "estimates": estimates,
            "shrink": {
                "params": result.params, "max_rank": max(result.ranks.values()),
                "vllm_max_lora_rank": vllm_max_lora_rank(max(1, *ranks)), "dev": result.quality, "test": test,
                "passes": result.passes_run, "seconds": shrink_seconds, "advice": result.advice,
                "rank_histogram": {str(k): ranks.count(k) for k in sorted(set(ranks))},
            },
            "commit": commit(),
        }  # fmt: skip


def _estimate_entry(estimate) -> dict:
    return {
        "params": estimate.params, "max_rank": estimate.max_rank, "vllm_max_lora_rank": estimate.vllm_max_lora_rank,
        "verdict": estimate.advice["verdict"], "advised_r": estimate.advice["advised_r"],
        "predicted_loss": estimate.predicted_loss, "probe_loss": estimate.probe_loss, "full_loss": estimate.full_loss,
        "scale": estimate.scale, "seconds": estimate.seconds,
    }  # fmt: skip


def advice_of(run: dict, room: int, share: int) -> dict:
    """`rank_advice` on a run's shrunk ranks (from their histogram) with `room` and `capacity_share`; the verdict needs
    no module names."""
    histogram = run["shrink"].get("rank_histogram") or {str(run["shrink"]["advice"]["largest_rank"]): 1}
    ranks = {f"{k}:{i}": int(k) for k, count in histogram.items() for i in range(count)}
    full = dict.fromkeys(ranks, run["r"])
    cut_cost = run["shrink"]["advice"]["cut_cost_tolerances"]
    return rank_advice(ranks, full, dict.fromkeys(ranks, 1), cut_cost, room=room, capacity_share=share)


def check_advice(runs: dict, room: int, share: int, tolerance: float) -> list[dict]:
    """Each run's advice at `room` and `capacity_share`, checked on the mean shrunk test loss over the seeds of its
    task and length (one seed's rerun differs from another r by more than 1% at 60 steps): at the advised r, a
    capacity-limited run's must be better by more than the tolerance and an oversized run's within the tolerance;
    a run that fits must be within the tolerance of the best r."""
    grids: dict[tuple, dict[int, list[dict]]] = {}
    for key, run in runs.items():
        grids.setdefault((key.split("|")[0], run["steps"]), {}).setdefault(run["r"], []).append(run)
    rows = []
    for (task, steps), grid in sorted(grids.items()):
        means = {r: statistics.mean(run["shrink"]["test"] for run in group) for r, group in grid.items()}
        best = min(means.values())
        for r, group in sorted(grid.items()):
            for run in sorted(group, key=lambda run: run["seed"]):
                advice = advice_of(run, room, share)
                rerun = grid.get(advice["advised_r"])
                row = {"task": task, "steps": steps, "seed": run["seed"], "r": r, "advice": advice, "run": run,
                       "rerun": rerun, "mean": means[r]}  # fmt: skip
                if advice["verdict"] == "fits":
                    row["change"], row["met"] = means[r] / best - 1, means[r] <= best * (1 + tolerance)
                elif rerun is not None:
                    row["change"] = change = means[advice["advised_r"]] / means[r] - 1
                    capacity = advice["verdict"] == "capacity-limited"
                    row["met"] = change < -tolerance if capacity else change <= tolerance
                rows.append(row)
    return rows


def report(results: dict, tolerance: float) -> str:
    """The goal tables: the advice against the rerun at the advised r (for each candidate room), and the estimate
    against the final shrink."""
    runs = results["runs"]
    lines = [
        "## Shrunk test loss by r_max",
        "",
        "| task, steps | r_max | seeds | shrunk test | exported | needed rank |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for key, run in runs.items():
        groups.setdefault((key.split("|")[0], run["steps"], run["r"]), []).append(run)
    for (task, steps, r), group in sorted(groups.items()):
        tests = [run["shrink"]["test"] for run in group]
        spread = (max(tests) - min(tests)) / 2
        lines.append(
            f"| {task}, {steps} | {r} | {len(group)} | {statistics.mean(tests):.4f} ±{spread:.4f} "
            f"| {statistics.mean(run['shrink']['params'] for run in group) / 1e6:.2f} M | "
            f"{', '.join(str(advice_of(run, ROOM, CAPACITY_SHARE)['needed_rank']) for run in group)} |"
        )
    lines += ["", "## r_max advice against the rerun at the advised r", ""]
    lines += ["| CAPACITY_SHARE, ROOM | met | missed | advised r not run |", "|---|---|---|---|"]
    for share in (1, 2):
        for room in (1, 2, 4):
            rows = check_advice(runs, room, share, tolerance)
            met = sum(row.get("met") is True for row in rows)
            missed = sum(row.get("met") is False for row in rows)
            chosen = " (the library's)" if (share, room) == (CAPACITY_SHARE, ROOM) else ""
            lines.append(f"| {share}, {room}{chosen} | {met} | {missed} | {len(rows) - met - missed} |")
    lines += [
        "",
        f"At CAPACITY_SHARE = {CAPACITY_SHARE}, ROOM = {ROOM}; mean test change: the mean shrunk test loss over seeds "
        "at the advised r against that at r_max (fits: at r_max against the best r).",
        "",
        "| task, steps, seed | r_max | shrunk: params, test (mean over seeds) | needs | verdict (advised r) | "
        "mean test change | goal | step time at the advised r | adapter training state at the advised r |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in check_advice(runs, ROOM, CAPACITY_SHARE, tolerance):
        run, rerun, advice = row["run"], row["rerun"], row["advice"]
        met = {True: "met", False: "missed", None: "not run"}[row.get("met")]
        change = f"{100 * row['change']:+.2f}%" if "change" in row else ""
        ratios = ["", ""]
        if rerun is not None and advice["verdict"] != "fits":
            ratios = [
                f"{statistics.mean(other[key] for other in rerun) / run[key]:.2f}x"
                for key in ("step_seconds", "adapter_training_bytes")
            ]
        lines.append(
            f"| {row['task']}, {row['steps']}, {row['seed']} | {row['r']} | {run['shrink']['params'] / 1e6:.2f} M, "
            f"{run['shrink']['test']:.4f} ({row['mean']:.4f}) | {advice['needed_rank']} | {advice['verdict']} "
            f"({advice['advised_r']}) | {change} | {met} | {ratios[0]} | {ratios[1]} |"
        )
    lines += ["", "## The estimate against the final shrink", ""]
    lines += [
        "| task, steps, r | at | estimate / final params (min-max over seeds) | same vLLM bucket | "
        "estimate cost per call |",
        "|---|---|---|---|---|",
    ]
    for (task, steps, r), group in sorted(groups.items()):
        group = [run for run in group if "estimates" in run]  # runs of an estimator since replaced have none
        for fraction in FRACTIONS if group else ():
            ratios, same, cost = [], [], []
            for run in group:
                estimate = next(e for e in run["estimates"] if e["fraction"] == fraction)
                ratios.append(estimate["params"] / max(1, run["shrink"]["params"]))
                same.append(estimate["vllm_max_lora_rank"] == run["shrink"]["vllm_max_lora_rank"])
                cost.append(estimate["seconds"] / run["step_seconds"])
            lines.append(
                f"| {task}, {steps}, {r} | {100 * fraction:.0f}% | {statistics.mean(ratios):.2f} "
                f"({min(ratios):.2f}-{max(ratios):.2f}) | {sum(same)}/{len(same)} | "
                f"{statistics.mean(cost):.1f} steps |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="cmudict")
    parser.add_argument("--model", default="smollm2", help="a packaged short name, path or hub id; tiny: a smoke test")
    parser.add_argument("--r", type=int, nargs="+", default=[32], help="r_max of the runs")
    parser.add_argument("--steps", type=int, nargs="+", default=[60])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--follow-advice", action="store_true", help="rerun at the advised r unless it is r")
    parser.add_argument("--report", action="store_true", help="only print the tables from --out")
    parser.add_argument("--checkpoints", type=Path, help="save the adapter at each estimate, under this folder")
    parser.add_argument(
        "--re-estimate", action="store_true", help="estimate again on the adapters saved under --checkpoints"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.report:
        print(report(results, args.tolerance))
        return
    study = Study(args)
    results.setdefault(
        "machine", f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)

    if args.re_estimate:
        if args.checkpoints is None:
            parser.error("--re-estimate needs --checkpoints, the folder the runs saved their adapters under")
        for key, run in results["runs"].items():
            if key.startswith(f"{args.task}|") and checkpoint_dir(args.checkpoints, key, 1.0).is_dir():
                study.re_estimate(key, run)
                save()
                print(f"{key}: " + ", ".join(f"{e['params']:,}" for e in run["estimates"]), flush=True)
        return

    def do(steps: int, r: int, seed: int) -> dict:
        key = run_key(args.task, steps, r, args.lr, seed)
        if key not in results["runs"]:
            entry = study.run(steps, r, args.lr, seed)
            entry.update(task=args.task, tolerance=args.tolerance, date=str(date.today()))
            results["runs"][key] = entry
            save()
            shrunk, advice = entry["shrink"], entry["shrink"]["advice"]
            print(f"{key}: {shrunk['params']:,} params, test {shrunk['test']:.4f}; {advice['message']}", flush=True)
        return results["runs"][key]

    for steps in args.steps:
        for seed in args.seeds:
            for r in args.r:
                advice = do(steps, r, seed)["shrink"]["advice"]
                if args.follow_advice and advice["advised_r"] != r:
                    do(steps, advice["advised_r"], seed)


if __name__ == "__main__":
    main()
