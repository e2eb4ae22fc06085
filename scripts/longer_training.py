"""Does SVD truncation of a plain LoRA stay as strong when training runs longer?

The benchmark's short runs leave a plain LoRA's update nearly rank one, so truncating it by SVD loses little. This
script trains plain LoRA and ElasticLoRA (library defaults) at r_max for a longer run, at the learning rates the
benchmark chose, and reports the test loss of the plain LoRA SVD-truncated to each rank next to elastic's prefixes,
plus the effective rank of each update (exp of the entropy of its normalised singular values, averaged over modules).

    python scripts/longer_training.py --out outputs/longer_training.json    # ~11 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from benchmark import BF16, Bench, aurac, lora_config, reloaded

from elasticlora import ElasticLoraConfig, elastic_layers
from elasticlora.evaluate import eval_loss
from elasticlora.layer import elastic_delta_weight
from elasticlora.shrink import svd_reorder


@torch.no_grad()
def mean_effective_rank(model) -> float:
    ranks = []
    for layer in elastic_layers(model).values():
        # the update itself: under component weights the lora_B parameter holds B / c, not B
        s = torch.linalg.svdvals(elastic_delta_weight(layer, next(iter(layer.elastic_state))).float())
        p = s / s.sum()
        ranks.append(float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum())))
    return sum(ranks) / len(ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plain-lr", type=float, default=1e-3)
    parser.add_argument("--elastic-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("outputs/longer_training.json"))
    args = parser.parse_args()
    bench = Bench(args)
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for name, config, lr in (
        ("plain", lora_config(args.max_rank), args.plain_lr),
        ("elastic", ElasticLoraConfig(r=args.max_rank), args.elastic_lr),
    ):
        model, seconds = bench.trained(config, lr, 0, f"{name} lr={lr:g}")
        if name == "plain":
            (model,) = reloaded(bench, model)
            svd_reorder(model)
        curve = {k: bench.test_loss(model, k) for k in bench.ranks}
        report[name] = {
            "lr": lr,
            "train_seconds": seconds,
            "test_loss": curve,
            "aurac": aurac(curve),
            "mean_effective_rank": mean_effective_rank(model),
            "full_rank_dev_loss": eval_loss(model, bench.dev, autocast_dtype=BF16),
        }
        print(name, json.dumps(report[name], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
