"""Which training recipe makes every prefix of an elastic adapter as good as plain LoRA + SVD truncation?

Trains arms on SmolLM2-135M-Instruct (batch 16, AdamW, 5% warmup, linear decay, fp32 or bf16 autocast) on one of two
tasks of different kinds, and records eval loss at every uniform rank on a `dev` split (for choosing) and a `test`
split (for reporting):

- `wordnet`: word -> dictionary definition (examples/data, WordNet 3.0 licence);
- `cmudict`: spelling -> ARPAbet phonemes (scripts/data, CMU Pronouncing Dictionary, BSD-2-Clause).

An arm is `lora` (plain LoRA at --max-rank, rsLoRA alpha 16: its SVD truncations are recorded too), `lora@K` (plain
LoRA trained at rank K, the grid), `default` (ElasticLoraConfig() at --max-rank) or comma-separated
ElasticLoraConfig fields (`full_rank_prob=0.75,shared_draw_prob=0`), optionally named `NAME:SPEC` (to tell one
spec apart across code versions: `rotated:default`; each run records its commit). The retired experimental training
modes (two-pass, sandwich, ramped and annealed truncations, learned rank maps, low-rank-only draws) rerun at commit
09cfe5f, with `scripts/recipe_modes.py` there; docs/results.md lists what each measured. Every (task, steps, arm,
lr, seed) run is kept in the JSON as soon as it ends, and runs already there are skipped, so a cut-off study resumes
where it stopped. `--shrink` also shrinks elastic and `lora` runs (SVD-ordered) at those tolerances on dev; a kept
run without a tolerance asked for now is trained again (a run is a function of its key), so a learning-rate sweep
can skip shrinking and the rate it chooses be shrunk later.
`--max-grad-norm 1` clips the gradient as Trainer does by default (runs before 2026-12-03 did not clip); a JSON holds
runs of one setting only, so clipped runs go to their own file. `--plot` only redraws.

    python scripts/recipe_study.py --task cmudict --steps 180 --arms lora default full_rank_prob=0.75 \\
        --lrs 2e-3 --shrink 0.01 --max-grad-norm 1 --out scripts/results/recipe_study/cmudict_clip.json
    python scripts/recipe_study.py --plot --out scripts/results/recipe_study/cmudict_clip.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks, eval_batches, eval_loss
from elasticlora.data import load_rows
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.shrink import shrink

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from common import DATA, train_steps  # noqa: E402

TASKS = {
    "wordnet": (DATA / "wordnet_train.jsonl", DATA / "wordnet_eval.jsonl"),
    "cmudict": (ROOT / "scripts" / "data" / "cmudict_train.jsonl", ROOT / "scripts" / "data" / "cmudict_eval.jsonl"),
}


def arm_config(spec: str, max_rank: int) -> ElasticLoraConfig:
    """The config an arm spec names (see the module docstring)."""
    spec = spec.split(":", 1)[-1]
    if spec == "lora" or spec.startswith("lora@"):
        r = max_rank if spec == "lora" else int(spec[5:])
        return ElasticLoraConfig(r=r, rank_sampler="none")
    return ElasticLoraConfig(r=max_rank, **parse_arm(spec))


def parse_arm(spec: str) -> dict:
    """`"shared_draw_prob=0.5,full_rank_prob=0.75"` -> config kwargs (`default`: none)."""
    if spec == "default":
        return {}
    kwargs = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ElasticLoraConfig.__dataclass_fields__:
            raise SystemExit(f"bad arm item {item!r}: expected FIELD=VALUE with an ElasticLoraConfig field")
        kwargs[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return kwargs


def commit() -> str:
    """The checked-out commit, with `+dirty` when the package has uncommitted changes."""

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "elasticlora")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def per_ten_steps(values: list[float], digits: int) -> list[float]:
    """The mean of each 10 steps' values, rounded."""
    return [round(sum(values[i : i + 10]) / len(values[i : i + 10]), digits) for i in range(0, len(values), 10)]


def missing_shrinks(entry: dict, tolerances: list[float]) -> bool:
    """Whether a kept run lacks a shrink asked for now (then it is trained again: runs are deterministic)."""
    if entry["arm"].split(":", 1)[-1].startswith("lora@"):
        return False  # a grid run is never shrunk
    return any(str(t) not in entry.get("shrink", {}) for t in tolerances)


def run_key(task: str, steps: int, arm: str, lr: float, seed: int) -> str:
    return f"{task}|{steps}|{arm}|{lr:g}|{seed}"


class Study:
    def __init__(self, args):
        self.args = args
        self.dtype = torch.bfloat16 if args.bf16 else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.base, tokenizer = load_model_and_tokenizer(args.model)
        self.base.to(self.device)
        train_path, eval_path = TASKS[args.task]
        self.train = eval_batches(tokenizer, train_path, batch_size=args.batch_size)
        rows = load_rows(eval_path)[: args.eval_rows]
        if len(rows) < args.eval_rows:
            raise SystemExit(f"{eval_path} holds {len(rows)} rows, fewer than --eval-rows {args.eval_rows}")
        half = len(rows) // 2
        self.splits = {
            "dev": eval_batches(tokenizer, rows[:half], 32),
            "test": eval_batches(tokenizer, rows[half:], 32),
        }
        self.ranks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.max_rank]

    def curves(self, model, ks) -> dict:
        out = {split: {} for split in self.splits}
        for k in ks:
            with at_ranks(model, k):
                for split, batches in self.splits.items():
                    out[split][str(k)] = eval_loss(model, batches, autocast_dtype=self.dtype)
        return out

    def run(self, arm: str, steps: int, lr: float, seed: int) -> dict:
        config = arm_config(arm, self.args.max_rank)
        torch.manual_seed(seed)  # the adapter's initialisation too
        model = get_peft_model(copy.deepcopy(self.base), config)
        start = time.time()
        clip, norms = {}, []
        if self.args.max_grad_norm is not None:
            clip = {"max_grad_norm": self.args.max_grad_norm, "grad_norms": norms}
        losses = train_steps(
            model, self.train, steps, lr, seed=seed, autocast_dtype=self.dtype, progress=False,
            warmup_steps=max(1, steps // 20), **clip,
        )  # fmt: skip
        entry = {"arm": arm, "steps": steps, "lr": lr, "seed": seed, "seconds": time.time() - start}
        if norms:  # the gradient norm before clipping: its mean per 10 steps, and how often it was clipped
            entry["grad_norm_curve"] = per_ten_steps(norms, 3)
            entry["clipped_share"] = sum(n > self.args.max_grad_norm for n in norms) / len(norms)
        entry["final_train_loss"] = sum(losses[-10:]) / len(losses[-10:])
        entry["train_curve"] = per_ten_steps(losses, 4)
        entry["commit"] = commit()
        spec = arm.split(":", 1)[-1]
        plain = spec.startswith("lora")
        entry.update(self.curves(model, [config.r] if plain else self.ranks))
        if spec == "lora":  # a truncation keeps the top singular directions: SVD truncation
            entry["svd"] = self.curves(model, self.ranks)
        for tolerance in self.args.shrink if spec == "lora" or not plain else []:
            start = time.time()
            result = shrink(model, self.splits["dev"], tolerance=tolerance, autocast_dtype=self.dtype, progress=False)
            seconds = time.time() - start
            with at_ranks(model, result.ranks):
                test = eval_loss(model, self.splits["test"], autocast_dtype=self.dtype)
            entry.setdefault("shrink", {})[str(tolerance)] = {
                "params": result.params, "dev": result.quality, "test": test, "passes": result.passes,
                "max_rank": max(result.ranks.values()), "seconds": seconds,
            }  # fmt: skip
        return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="wordnet")
    parser.add_argument("--model", default="smollm2", help="base model: a packaged short name, path or hub id")
    parser.add_argument(
        "--eval-rows", type=int, default=300, help="the first N eval rows: dev the first half, test the second"
    )
    parser.add_argument("--arms", nargs="*", default=["lora", "default"])
    parser.add_argument("--steps", type=int, nargs="+", default=[60])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shrink", type=float, nargs="*", default=[], help="tolerances to shrink at (on dev)")
    parser.add_argument("--max-grad-norm", type=float, help="clip the gradient to this norm (Trainer's default: 1)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on GPUs and AMX CPUs only)")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNGs and the table from --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.plot:
        from recipe_report import write_report

        write_report(results, args.out)
        return
    # a JSON holds runs of one setting; files written before a setting existed hold its default
    for setting, default in (("max_grad_norm", None), ("model", "smollm2"), ("eval_rows", 300)):
        held = results.get(setting, default) if results["runs"] else getattr(args, setting)
        if held != getattr(args, setting):
            raise SystemExit(f"{args.out} holds runs with --{setting.replace('_', '-')} {held}: use another --out")
        results[setting] = held
    study = Study(args)
    machine = torch.cuda.get_device_name() if study.device.type == "cuda" else f"{platform.machine()} CPU"
    results.setdefault("machine", f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results.setdefault("base", {})[args.task] = {
        s: eval_loss(study.base, b, autocast_dtype=study.dtype) for s, b in study.splits.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        for seed in args.seeds:
            for arm in args.arms:
                for lr in args.lrs:
                    key = run_key(args.task, steps, arm, lr, seed)
                    if key in results["runs"] and not missing_shrinks(results["runs"][key], args.shrink):
                        continue
                    entry = study.run(arm, steps, lr, seed)
                    entry.update(task=args.task, date=str(date.today()))
                    results["runs"][key] = entry
                    tmp = args.out.with_suffix(".tmp")
                    tmp.write_text(json.dumps(results, indent=1))
                    tmp.replace(args.out)
                    curve = entry.get("svd", entry)["test"]
                    shown = " ".join(f"{k}:{v:.3f}" for k, v in curve.items())
                    print(f"{key} ({entry['seconds']:.0f} s) test {shown}", flush=True)


if __name__ == "__main__":
    main()
