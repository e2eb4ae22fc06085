"""One elastic run + shrink against what users do today: a rank grid, and SVD truncation of a plain LoRA.

Same model (SmolLM2-135M-Instruct), data (WordNet definitions), steps, batch, seed and machine for every arm; every
trained arm gets its own best learning rate from a sweep (chosen on the dev split). Eval rows are split in two:
`dev` (learning-rate choice and shrink's measurements) and `test` (every number reported).

Arms: LoRA trained at each rank k (the grid); plain LoRA at r_max truncated to k by SVD of B A (LoRA-Squeeze /
PEFT convert_to_lora) and by naive prefix; a DyLoRA-style ElasticLoraConfig (one uniform rank per batch shared by
all layers, scale alpha/k); ElasticLoRA with the library defaults at each uniform k; ElasticLoRA + shrink and plain
LoRA + SVD-ordered shrink at several tolerances. Writes JSON, a PNG and a markdown table.

    python scripts/benchmark.py --out outputs/benchmark        # ~50 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from elasticlora import ElasticLoraConfig, adapter_param_count, at_ranks, load_elastic
from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.shrink import shrink, svd_reorder
from elasticlora.train import train_steps

DATA = Path(__file__).resolve().parents[1] / "elasticlora" / "data"
BF16 = torch.bfloat16


def aurac(curve: dict[int, float]) -> float:
    """Area under the rank-loss curve over log2(rank), divided by its width: a mean loss over ranks (lower: better)."""
    ks = sorted(curve)
    xs = [math.log2(k) for k in ks]
    area = sum((xs[i + 1] - xs[i]) * (curve[ks[i]] + curve[ks[i + 1]]) / 2 for i in range(len(ks) - 1))
    return area / (xs[-1] - xs[0])


class Bench:
    def __init__(self, args):
        self.args = args
        self.base, self.tokenizer = load_model_and_tokenizer("smollm2")
        self.train = eval_batches(self.tokenizer, DATA / "wordnet_train.jsonl", batch_size=args.batch_size)
        rows = load_rows(DATA / "wordnet_eval.jsonl")
        half = len(rows) // 2
        self.dev = eval_batches(self.tokenizer, rows[:half], batch_size=32)
        self.test = eval_batches(self.tokenizer, rows[half:], batch_size=32)
        self.ranks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= args.max_rank]

    def trained(self, config, lr: float, seed: int, desc: str):
        torch.manual_seed(seed)  # the adapter's initialisation too, not only the training order and draws
        model = get_peft_model(copy.deepcopy(self.base), config)
        start = time.time()
        train_steps(model, self.train, self.args.steps, lr, seed=seed, autocast_dtype=BF16, desc=desc)
        return model, time.time() - start

    def dev_loss(self, model, ranks=None) -> float:
        with at_ranks(model, ranks) if ranks is not None else contextlib.nullcontext():
            return eval_loss(model, self.dev, autocast_dtype=BF16)

    def test_loss(self, model, ranks=None) -> float:
        with at_ranks(model, ranks) if ranks is not None else contextlib.nullcontext():
            return eval_loss(model, self.test, autocast_dtype=BF16)

    def sweep(self, make_config, name: str, lrs: list[float] | None = None, ranks: list[int] | None = None):
        """Train at every lr (default: --lrs); keep the model with the best dev loss.

        A LoRA is judged at full rank; an elastic model (`ranks` given) by its best uniform truncation on dev, since
        what it delivers is a truncation: shrink measures against the best configuration it finds.
        """
        results, best = [], None
        for lr in self.args.lrs if lrs is None else lrs:
            model, seconds = self.trained(make_config(), lr, 0, f"{name} lr={lr:g}")
            dev = min(self.dev_loss(model, k) for k in ranks or [None])
            results.append({"lr": lr, "dev_loss": dev, "train_seconds": seconds})
            print(f"{name} lr={lr:g}: dev {dev:.4f} ({seconds:.0f} s)", flush=True)
            if best is None or dev < best[1]:
                best = (model, dev, lr)
        return best[0], best[2], results


def lora_config(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=16, use_rslora=True, target_modules="all-linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.005, 0.01, 0.02])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1],
        help="seeds for the seed-to-seed spread of the elastic and plain r_max arms",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--redo-plain", action="store_true",
                        help="retrain only the plain r_max LoRA at the lr recorded in OUT/benchmark.json and redo its "
                        "truncation and shrink arms")  # fmt: skip
    parser.add_argument("--redo-elastic", action="store_true",
                        help="redo only the DyLoRA-style and ElasticLoRA arms (sweep over --lrs, seeds, shrink) in "
                        "OUT/benchmark.json, e.g. after a change of the library's defaults")  # fmt: skip
    parser.add_argument("--extend-grid", type=float, nargs="+", metavar="LR",
                        help="add these lrs to every grid rank's sweep in OUT/benchmark.json (and redo the plain "
                        "r_max arms if its best lr changes)")  # fmt: skip
    args = parser.parse_args()
    if args.redo_plain or args.redo_elastic or args.extend_grid:
        redo(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    r_max = args.max_rank
    started = time.time()
    report = {
        "date": str(date.today()),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_test_loss": eval_loss(bench.base, bench.test, autocast_dtype=BF16),
    }

    # 1. the grid: a LoRA trained at each rank, each with its best lr
    grid, grid_seconds, plain_rmax = {}, 0.0, None
    for k in bench.ranks:
        model, lr, sweep = bench.sweep(lambda k=k: lora_config(k), f"lora r={k}")
        grid_seconds += sum(s["train_seconds"] for s in sweep)
        grid[k] = {"lr": lr, "sweep": sweep, "test_loss": bench.test_loss(model), "params": None}
        grid[k]["params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        if k == r_max:
            plain_rmax = model
    report["grid"] = grid
    report["grid_train_seconds"] = grid_seconds

    # 2. plain LoRA at r_max: naive prefix and SVD truncation, and (5, plain side) its SVD-ordered shrink
    plain_arms(bench, plain_rmax, report)

    # 3. DyLoRA-style and 4. ElasticLoRA (library defaults), each with its best lr, run at every uniform k
    dylora_arm(bench, report)
    elastic_arms(bench, report)
    report["wall_seconds"] = time.time() - started
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
    write_outputs(report, args.out)


def dylora_arm(bench: Bench, report: dict) -> None:
    """Arm 3: one uniform rank per batch shared by all layers, scale lora_alpha / k (DyLoRA), as a config setting."""
    dylora_config = dict(
        r=bench.args.max_rank, rank_sampler="uniform", shared_draw_prob=1.0, draw_per="batch",
        truncation_scale_power=1.0, truncation_scaling="prefix", full_rank_prob=0.0, use_rslora=False,
    )  # fmt: skip
    dylora, dylora_lr, dylora_sweep = bench.sweep(
        lambda: ElasticLoraConfig(**dylora_config), "dylora", ranks=bench.ranks
    )
    report["dylora"] = {"lr": dylora_lr, "sweep": dylora_sweep}
    report["dylora"]["test_loss"] = {k: bench.test_loss(dylora, k) for k in bench.ranks}


def elastic_arms(bench: Bench, report: dict) -> None:
    """Arm 4 (ElasticLoRA with the library defaults, best lr, every uniform k, other seeds) and 5 (its shrink)."""
    r_max = bench.args.max_rank
    elastic, elastic_lr, elastic_sweep = bench.sweep(lambda: ElasticLoraConfig(r=r_max), "elastic", ranks=bench.ranks)
    elastic_seconds = next(s["train_seconds"] for s in elastic_sweep if s["lr"] == elastic_lr)
    report["elastic"] = {"lr": elastic_lr, "sweep": elastic_sweep, "train_seconds": elastic_seconds}
    report["elastic"]["config"] = ElasticLoraConfig(r=r_max).to_dict()
    report["elastic"]["test_loss"] = {k: bench.test_loss(elastic, k) for k in bench.ranks}
    spread = {}
    for seed in bench.args.seeds[1:]:
        model, _ = bench.trained(ElasticLoraConfig(r=r_max), elastic_lr, seed, f"elastic seed={seed}")
        spread[seed] = {k: bench.test_loss(model, k) for k in bench.ranks}
    report["elastic"]["other_seeds"] = spread
    report["shrink"]["elastic"] = {tol: shrink_entry(bench, elastic, tol) for tol in bench.args.tolerances}
    report["elastic_uniform_params"] = {k: adapter_param_count(elastic, k) for k in bench.ranks}


def reloaded(bench: Bench, plain_model, copies: int = 1) -> list:
    """Copies of a plain LoRA reloaded as elastic models (prefix order; `svd_reorder` them for SVD truncation)."""
    with tempfile.TemporaryDirectory() as tmp:
        plain_model.save_pretrained(tmp)
        return [load_elastic(copy.deepcopy(bench.base), tmp) for _ in range(copies)]


def plain_arms(bench: Bench, plain_rmax, report: dict) -> None:
    """Arms 2 and 5 (plain side): prefix / SVD truncation of the plain r_max LoRA and its SVD-ordered shrink."""
    prefix, svd = reloaded(bench, plain_rmax, copies=2)
    svd_reorder(svd)
    report["plain_prefix"] = {k: bench.test_loss(prefix, k) for k in bench.ranks}
    report["plain_svd"] = {k: bench.test_loss(svd, k) for k in bench.ranks}
    report.setdefault("shrink", {})["plain_svd"] = {}
    for tol in bench.args.tolerances:
        report["shrink"]["plain_svd"][tol] = shrink_entry(bench, svd, tol)
    report["plain_svd_uniform_params"] = {k: adapter_param_count(svd, k) for k in bench.ranks}
    plain_lr, report["plain_svd_other_seeds"] = report["grid"][bench.args.max_rank]["lr"], {}
    for seed in bench.args.seeds[1:]:
        model, _ = bench.trained(lora_config(bench.args.max_rank), plain_lr, seed, f"plain seed={seed}")
        (other,) = reloaded(bench, model)
        svd_reorder(other)
        report["plain_svd_other_seeds"][seed] = {k: bench.test_loss(other, k) for k in bench.ranks}


def shrink_entry(bench: Bench, model, tol: float) -> dict:
    start = time.time()
    result = shrink(model, bench.dev, tolerance=tol, autocast_dtype=BF16)
    entry = {
        "params": result.params,
        "dev_loss": result.quality,
        "test_loss": bench.test_loss(model, result.ranks),
        "passes": result.passes,
        "seconds": time.time() - start,
        "max_rank": max(result.ranks.values()),
        "modules_kept": sum(k > 0 for k in result.ranks.values()),
    }
    print(f"shrink tol={tol}: {entry}", flush=True)
    return entry


def redo(args) -> None:
    """--redo-plain / --redo-elastic / --extend-grid on a saved OUT/benchmark.json (rewritten with the new arms)."""
    path = args.out / "benchmark.json"
    report = json.loads(path.read_text())
    report["grid"] = {int(k): v for k, v in report["grid"].items()}
    bench = Bench(args)
    r_max, plain_rmax = args.max_rank, None
    for lr in args.extend_grid or []:
        for k in bench.ranks:
            entry = report["grid"][k]
            model, _, (result,) = bench.sweep(lambda k=k: lora_config(k), f"lora r={k}", lrs=[lr])
            entry["sweep"].append(result)
            report["grid_train_seconds"] += result["train_seconds"]
            if result["dev_loss"] < min(s["dev_loss"] for s in entry["sweep"][:-1]):
                entry.update(lr=lr, test_loss=bench.test_loss(model))
                plain_rmax = model if k == r_max else plain_rmax
        report.setdefault("grid_extended", []).append([lr, str(date.today())])
    if args.redo_plain and plain_rmax is None:
        lr = report["grid"][r_max]["lr"]
        plain_rmax, _ = bench.trained(lora_config(r_max), lr, 0, f"lora r={r_max} lr={lr:g}")
    if plain_rmax is not None:
        plain_arms(bench, plain_rmax, report)
        report["plain_redone"] = str(date.today())
    if args.redo_elastic:
        dylora_arm(bench, report)
        elastic_arms(bench, report)
        report["elastic_redone"] = str(date.today())
    path.write_text(json.dumps(report, indent=2))
    write_outputs(report, args.out)


def write_outputs(report: dict, out: Path) -> None:
    """The PNG and the markdown table, from a benchmark report (also usable on a saved benchmark.json)."""
    report = json.loads(json.dumps(report))  # the saved form: string keys
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def keyed(d):
        return {int(k): v for k, v in d.items()}

    grid = {int(k): v["test_loss"] for k, v in report["grid"].items()}
    curves = {
        "LoRA trained at k (grid, best lr each)": grid,
        "plain LoRA r_max, SVD-truncated": keyed(report["plain_svd"]),
        "plain LoRA r_max, prefix": keyed(report["plain_prefix"]),
        "DyLoRA-style": keyed(report["dylora"]["test_loss"]),
        "ElasticLoRA (defaults)": keyed(report["elastic"]["test_loss"]),
    }
    fig, (ax_rank, ax_params) = plt.subplots(1, 2, figsize=(13, 5))
    for label, curve in curves.items():
        ks = sorted(curve)
        ax_rank.plot(ks, [curve[k] for k in ks], "o-", label=label)
    ax_rank.axhline(report["base_test_loss"], color="gray", ls=":", label="base model")
    ax_rank.set_xscale("log", base=2)
    ax_rank.set_xlabel("rank k (every module)")
    ax_rank.set_ylabel("test eval loss")
    ax_rank.set_ylim(top=min(report["base_test_loss"] + 0.1, max(max(c.values()) for c in curves.values()) + 0.05))
    ax_rank.legend(fontsize=8)
    ax_rank.set_title("eval loss vs rank")
    grid_params = {int(k): v["params"] for k, v in report["grid"].items()}
    ks = sorted(grid)
    ax_params.plot([grid_params[k] for k in ks], [grid[k] for k in ks], "o-", label="LoRA grid")
    for name, label in (("elastic", "ElasticLoRA + shrink"), ("plain_svd", "plain LoRA + SVD shrink")):
        points = sorted(report["shrink"][name].items(), key=lambda item: item[1]["params"])
        ax_params.plot([p["params"] for _, p in points], [p["test_loss"] for _, p in points], "s-", label=label)
        for tol, p in points:
            ax_params.annotate(f"{float(tol):.1%}", (p["params"], p["test_loss"]), fontsize=7)
    ax_params.set_xscale("log")
    ax_params.set_xlabel("adapter parameters")
    ax_params.set_ylabel("test eval loss")
    ax_params.legend(fontsize=8)
    ax_params.set_title("eval loss vs adapter parameters")
    fig.tight_layout()
    fig.savefig(out / "benchmark.png", dpi=110)
    plt.close(fig)

    lines = [
        f"{report['machine']}, {report['date']}; {report['settings']['steps']} steps x batch "
        f"{report['settings']['batch_size']}, lrs {report['settings']['lrs']}; test-split eval loss "
        f"(base model {report['base_test_loss']:.3f})"
        + "".join(f"; grid also swept at lr {lr:g} ({day})" for lr, day in report.get("grid_extended", []))
        + (
            f"; DyLoRA-style and ElasticLoRA arms redone {report['elastic_redone']}"
            if "elastic_redone" in report
            else ""
        ),
        "",
        "| rank k | LoRA at k (lr) | plain r_max SVD | plain r_max prefix | DyLoRA-style | ElasticLoRA |",
        "|---|---|---|---|---|---|",
    ]
    for k in ks:
        lines.append(
            f"| {k} | {grid[k]:.3f} ({report['grid'][str(k)]['lr'] if str(k) in report['grid'] else ''}) "
            f"| {keyed(report['plain_svd'])[k]:.3f} | {keyed(report['plain_prefix'])[k]:.3f} "
            f"| {keyed(report['dylora']['test_loss'])[k]:.3f} | {keyed(report['elastic']['test_loss'])[k]:.3f} |"
        )
    lines.append(
        f"| AURAC | {aurac(grid):.3f} | {aurac(keyed(report['plain_svd'])):.3f} | "
        f"{aurac(keyed(report['plain_prefix'])):.3f} | {aurac(keyed(report['dylora']['test_loss'])):.3f} | "
        f"{aurac(keyed(report['elastic']['test_loss'])):.3f} |"
    )
    for seed, curve in report["elastic"].get("other_seeds", {}).items():
        values = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(keyed(curve).items()))
        lines += ["", f"ElasticLoRA with seed {seed} (same lr), for the seed-to-seed spread: {values}."]
    for seed, curve in report.get("plain_svd_other_seeds", {}).items():
        values = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(keyed(curve).items()))
        lines += ["", f"Plain LoRA r_max, SVD-truncated, with seed {seed} (same lr): {values}."]
    lines += [
        "",
        "| shrink tolerance | ElasticLoRA + shrink: params / test loss | plain LoRA + SVD shrink |",
        "|---|---|---|",
    ]
    for tol in report["shrink"]["elastic"]:
        e, p = report["shrink"]["elastic"][tol], report["shrink"]["plain_svd"][tol]
        lines.append(
            f"| {float(tol):.1%} | {e['params']:,} / {e['test_loss']:.3f} ({e['passes']} passes) | "
            f"{p['params']:,} / {p['test_loss']:.3f} ({p['passes']} passes) |"
        )
    best_k = min(grid, key=grid.get)
    lines += [
        "",
        f"Best grid adapter: rank {best_k}, test loss {grid[best_k]:.3f}, {report['grid'][str(best_k)]['params']:,} "
        f"parameters. Grid training time {report['grid_train_seconds']:.0f} s (all ranks x lrs); one elastic run "
        f"{report['elastic']['train_seconds']:.0f} s + shrink "
        f"{report['shrink']['elastic'][next(iter(report['shrink']['elastic']))]['seconds']:.0f} s.",
    ]
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
