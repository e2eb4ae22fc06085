"""Which rank distribution and truncation scaling make every prefix as good as a LoRA trained at that rank?

Trains plain LoRA at a few ranks and ElasticLoRA under several sampling / scaling settings on SmolLM2-135M with the
WordNet definitions task, all with the same data, steps, lr and seed, and reports eval loss at each truncation rank.

    python scripts/sampling_study.py --steps 120 --out outputs/sampling_study.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks
from elasticlora.data import eval_batches
from elasticlora.evaluate import eval_loss
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.train import train_steps

DATA = Path(__file__).resolve().parents[1] / "elasticlora" / "data"

ELASTIC_ARMS = {
    "elastic log2 p0 pow0": dict(full_rank_prob=0.0, truncation_scale_power=0.0),
    "elastic log2 p.25 pow0": dict(full_rank_prob=0.25, truncation_scale_power=0.0),
    "elastic log2 p.25 pow.25": dict(full_rank_prob=0.25, truncation_scale_power=0.25),
    "elastic log2 p.25 pow.5": dict(full_rank_prob=0.25, truncation_scale_power=0.5),
    "elastic log2 p.5 pow0": dict(full_rank_prob=0.5, truncation_scale_power=0.0),
    "elastic log2 p.5 pow.5": dict(full_rank_prob=0.5, truncation_scale_power=0.5),
    "elastic log2 p.25 pow.75": dict(full_rank_prob=0.25, truncation_scale_power=0.75),
    "elastic log2 p.25 pow1": dict(full_rank_prob=0.25, truncation_scale_power=1.0),
    "elastic log2 p0 pow.5": dict(full_rank_prob=0.0, truncation_scale_power=0.5),
    "elastic log2 p.25 pow.5 shared": dict(truncation_scale_power=0.5, per_layer_draws=False, draw_per="batch"),
    "elastic log2 p.5 pow1": dict(full_rank_prob=0.5, truncation_scale_power=1.0),
    "elastic log2 p0 pow1": dict(full_rank_prob=0.0, truncation_scale_power=1.0),
    "elastic log2 p.25 pow1 shared": dict(truncation_scale_power=1.0, per_layer_draws=False, draw_per="batch"),
    "elastic log2 p.5 pow.75": dict(full_rank_prob=0.5, truncation_scale_power=0.75),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=160)
    parser.add_argument("--lora-ranks", type=int, nargs="*", default=[1, 2, 8, 32])
    parser.add_argument("--arms", nargs="*", default=list(ELASTIC_ARMS))
    parser.add_argument(
        "--arm-lrs", type=float, nargs="*", default=None, help="one lr per elastic arm (default: --lr for every arm)"
    )
    parser.add_argument(
        "--lora-lrs",
        type=float,
        nargs="*",
        default=None,
        help="one lr per plain LoRA rank (default: --lr for every rank)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/sampling_study.json"))
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer("smollm2")
    train = eval_batches(tokenizer, DATA / "wordnet_train.jsonl", batch_size=args.batch_size)
    rows = [json.loads(line) for line in (DATA / "wordnet_eval.jsonl").read_text().splitlines()][: args.eval_rows]
    evals = eval_batches(tokenizer, rows, batch_size=32)
    bf16 = torch.bfloat16
    ranks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.max_rank]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"machine": platform.processor() or platform.machine(), "date": str(date.today()), "args": settings}
    results["base"] = eval_loss(base, evals, autocast_dtype=bf16)
    arms = {}
    lora_lrs = args.lora_lrs or [args.lr] * len(args.lora_ranks)
    arm_lrs = args.arm_lrs or [args.lr] * len(args.arms)
    for r, lr in zip(args.lora_ranks, lora_lrs, strict=True):
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=r, lora_alpha=16, use_rslora=True, target_modules="all-linear")
        )
        start = time.time()
        train_steps(model, train, args.steps, lr, seed=args.seed, autocast_dtype=bf16, desc=f"lora r={r}")
        arms[f"lora r={r} lr={lr:g}"] = {
            "losses": {r: eval_loss(model, evals, autocast_dtype=bf16)},
            "seconds": time.time() - start,
        }
        print(f"lora r={r} lr={lr:g}", arms[f"lora r={r} lr={lr:g}"], flush=True)
    for name, lr in zip(args.arms, arm_lrs, strict=True):
        config = ElasticLoraConfig(r=args.max_rank, **ELASTIC_ARMS[name])
        model = get_peft_model(copy.deepcopy(base), config)
        start = time.time()
        train_steps(model, train, args.steps, lr, seed=args.seed, autocast_dtype=bf16, desc=name)
        losses = {}
        for k in ranks:
            with at_ranks(model, k):
                losses[k] = eval_loss(model, evals, autocast_dtype=bf16)
        arms[f"{name} lr={lr:g}"] = {"losses": losses, "seconds": time.time() - start}
        print(f"{name} lr={lr:g}", arms[f"{name} lr={lr:g}"], flush=True)
    results["arms"] = arms
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
