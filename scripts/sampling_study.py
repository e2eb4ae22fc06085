"""Which sampling and scaling settings make every prefix as good as a LoRA trained at that rank?

Trains ElasticLoRA under the settings given on the command line, each at every learning rate and seed asked for,
on SmolLM2-135M-Instruct with the WordNet definitions task (the benchmark's model, data, batch and steps), and
reports eval loss at every uniform truncation rank on the benchmark's two eval splits: `dev` (the first 150
held-out rows, for choosing) and `test` (the other 150, for reporting). `--grid-ranks` adds plain LoRA trained at
each of those ranks, and the SVD truncations of the plain LoRA at `--max-rank`, as references from the same run.
Runs on the GPU when there is one; the JSON is rewritten after every run, so a cut-off study keeps what it did.

An arm is a comma-separated list of ElasticLoraConfig fields, or `default` for the library's defaults; `--shrink`
also shrinks every elastic run at the given tolerances (on dev) and reports its parameters and test loss:

    python scripts/sampling_study.py --grid-ranks 1 2 4 8 16 32 --lrs 5e-4 1e-3 2e-3 \\
        --arms default shared_draw_prob=0 truncation_scaling=prefix,truncation_scale_power=1,shared_draw_prob=0 \\
        --out outputs/sampling_study.json
    python scripts/sampling_study.py --lrs 2e-3 --seeds 0 1 2 --shrink 0.005 0.01 --out outputs/study_seeds.json
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
from peft import get_peft_model

from elasticlora import ElasticLoraConfig, at_ranks
from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.shrink import shrink, svd_reorder
from elasticlora.train import train_steps

DATA = Path(__file__).resolve().parents[1] / "elasticlora" / "data"


def parse_arm(spec: str) -> dict:
    """`"shared_draw_prob=0.5,truncation_scale_power=1"` -> config kwargs (`default`: none)."""
    if spec == "default":
        return {}
    kwargs = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ElasticLoraConfig.__dataclass_fields__:
            raise SystemExit(f"bad arm item {item!r}: expected FIELD=VALUE with an ElasticLoraConfig field")
        kwargs[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="*", default=["default"], help="elastic settings (see above)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--grid-ranks", type=int, nargs="*", default=[], help="plain LoRA references at these ranks")
    parser.add_argument("--grid-lrs", type=float, nargs="*", default=None, help="their lrs (default: --lrs)")
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--shrink",
        type=float,
        nargs="*",
        default=[],
        help="also shrink every elastic run at these tolerances (on dev)",
    )
    parser.add_argument("--model", default="smollm2", help="'tiny' for a smoke run")
    parser.add_argument("--out", type=Path, default=Path("outputs/sampling_study.json"))
    args = parser.parse_args()
    arms = {spec: parse_arm(spec) for spec in args.arms}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model_and_tokenizer(args.model)
    base.to(device)
    train = eval_batches(tokenizer, DATA / "wordnet_train.jsonl", batch_size=args.batch_size)
    rows = load_rows(DATA / "wordnet_eval.jsonl")
    splits = {"dev": eval_batches(tokenizer, rows[:150], 32), "test": eval_batches(tokenizer, rows[150:], 32)}
    bf16 = torch.bfloat16
    ranks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.max_rank]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    results = {
        "machine": f"{machine}, torch {torch.__version__}",
        "date": str(date.today()),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "base": {split: eval_loss(base, batches, autocast_dtype=bf16) for split, batches in splits.items()},
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def curves(model, ks) -> dict:
        out = {split: {} for split in splits}
        for k in ks:
            with at_ranks(model, k):
                for split, batches in splits.items():
                    out[split][k] = eval_loss(model, batches, autocast_dtype=bf16)
        return out

    def run(name: str, config: ElasticLoraConfig, lr: float, seed: int, ks: list[int]) -> None:
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), config)
        start = time.time()
        train_steps(model, train, args.steps, lr, seed=seed, autocast_dtype=bf16, progress=False)
        entry = {"arm": name, "lr": lr, "seed": seed, "seconds": time.time() - start, **curves(model, ks)}
        for tolerance in args.shrink if len(ks) > 1 else []:
            result = shrink(model, splits["dev"], tolerance=tolerance, autocast_dtype=bf16, progress=False)
            with at_ranks(model, result.ranks):
                test = eval_loss(model, splits["test"], autocast_dtype=bf16)
            entry.setdefault("shrink", {})[tolerance] = {
                "params": result.params, "dev": result.quality, "test": test, "passes": result.passes
            }  # fmt: skip
            print(f"  shrink {tolerance:g}: {result.params:,} parameters, dev {result.quality:.3f}, test {test:.3f}")
        if name == f"lora r={args.max_rank}":
            svd_reorder(model)
            entry["svd"] = curves(model, ranks)
        results["runs"].append(entry)
        args.out.write_text(json.dumps(results, indent=2))
        shown = " ".join(f"{k}:{v:.3f}" for k, v in entry["dev"].items())
        print(f"{name} lr={lr:g} seed={seed} ({entry['seconds']:.0f} s) dev {shown}", flush=True)

    for seed in args.seeds:
        for r in args.grid_ranks:
            for lr in args.grid_lrs or args.lrs:
                run(
                    f"lora r={r}",
                    ElasticLoraConfig(r=r, rank_sampler="none", truncation_scale_power=0.0),
                    lr,
                    seed,
                    [r],
                )
        for name, kwargs in arms.items():
            for lr in args.lrs:
                run(name, ElasticLoraConfig(r=args.max_rank, **kwargs), lr, seed, ranks)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
