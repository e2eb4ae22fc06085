"""The measured search against the post-hoc rank reductions a user already has, on one plain LoRA, at equal sizes.

A plain PEFT LoRA (r 32, rsLoRA alpha 16, all linear modules; 180 steps, lr 2e-3, batch 16) is trained on CMUdict
(spelling -> ARPAbet, a task whose SVD truncation costs loss; scripts/data) and reduced four ways; each reduced
adapter is scored on the 150 test rows, every choice made on the 150 dev rows only:

- `peft_energy`: PEFT's own `convert_to_lora(model, tau)`: per module, the smallest rank whose singular values hold
  a fraction tau of the squared-singular-value energy (tau in 0.5 .. 0.95);
- `global_sv`: one singular-value threshold for all modules (PARA, arXiv 2604.27796), set to the largest adapter
  within the same parameter count;
- `search_budget`: `shrink(max_params=P)`: elasticlora's allocation by measured sensitivity at the same count;
- `search_tolerance`: `shrink` at 0.5 / 1 / 2 / 5 % on dev (its own sizes), with `global_sv` and a PEFT-rule
  energy threshold (tau bisected to the same count) beside it.

    python scripts/shrink_baselines.py      # ~12 minutes on 2 CPU cores (training ~6)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.conversion import convert_to_lora

from elasticlora import at_ranks, elastic_layers, load_elastic
from elasticlora.adapter_io import adapter_files, write_atomically
from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss
from elasticlora.layer import prefix_factors
from elasticlora.loading import load_model_and_tokenizer
from elasticlora.ranks import module_shapes
from elasticlora.shrink import shrink, shrink_family

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from common import train_steps  # noqa: E402

WORK = ROOT / "outputs" / "shrink_baselines"
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)
TOLERANCES = (0.005, 0.01, 0.02, 0.05)


def train_plain_lora(path: Path, base, tokenizer, steps: int) -> None:
    torch.manual_seed(0)
    config = LoraConfig(r=32, lora_alpha=16, use_rslora=True, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    train = eval_batches(tokenizer, ROOT / "scripts" / "data" / "cmudict_train.jsonl", batch_size=16)
    train_steps(model, train, steps, 2e-3, warmup_steps=max(1, steps // 20), desc="plain LoRA r32")
    model.save_pretrained(path)
    model.unload()


@torch.no_grad()
def singular_values(model) -> dict[str, torch.Tensor]:
    """Per module, the singular values of its update `scaling * B A`, descending: in its singular basis the rows
    of `M A` are orthonormal and the columns of `B N` have the singular values as norms."""
    values = {}
    for name, layer in elastic_layers(model).items():
        a, b = prefix_factors(layer, "default", layer.r["default"])
        values[name] = (b.norm(dim=0) * a.norm(dim=1) * layer.scaling["default"]).double().cpu()
    return values


def energy_ranks(values: dict[str, torch.Tensor], tau: float) -> dict[str, int]:
    """PEFT's per-module rule (`_find_cutoff_index`): the smallest k whose top-k energy reaches tau of the total."""
    ranks = {}
    for name, s in values.items():
        cumulative = (s**2).cumsum(0)
        ranks[name] = min(len(s), int(torch.searchsorted(cumulative, tau * cumulative[-1])) + 1)
    return ranks


def global_ranks(values: dict[str, torch.Tensor], widths: dict[str, int], budget: int) -> dict[str, int]:
    """One singular-value threshold for every module: keep the largest values until the next would pass `budget`."""
    order = sorted(((float(v), name) for name, s in values.items() for v in s), reverse=True)
    ranks, params = dict.fromkeys(values, 0), 0
    for _, name in order:
        if params + widths[name] > budget:
            break
        ranks[name] += 1
        params += widths[name]
    return ranks


def matched_energy(values, widths, budget: int) -> tuple[float, dict[str, int]]:
    """The PEFT energy rule with tau bisected to the largest adapter within `budget` parameters."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(k * widths[name] for name, k in energy_ranks(values, mid).items()) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, energy_ranks(values, lo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=180)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "shrink_baselines.json")
    args = parser.parse_args()
    base, tokenizer = load_model_and_tokenizer("smollm2")
    adapter = WORK / f"plain_lora_r32_{args.steps}steps"
    if not (adapter / "adapter_config.json").exists():
        train_plain_lora(adapter, base, tokenizer, args.steps)
    rows = load_rows(ROOT / "scripts" / "data" / "cmudict_eval.jsonl")[:300]  # the rows the published table used
    dev, test = (eval_batches(tokenizer, part, batch_size=32) for part in (rows[:150], rows[150:]))

    plain = PeftModel.from_pretrained(base, adapter)
    peft_points = []
    with tempfile.TemporaryDirectory() as tmp:
        for tau in TAUS:
            config, state = convert_to_lora(plain, tau)
            tensors = {key if key.startswith("base_model.") else f"base_model.model.{key}": value.contiguous()
                       for key, value in state.items()}  # fmt: skip
            write_atomically(Path(tmp) / str(tau), adapter_files(config, tensors))
            converted = PeftModel.from_pretrained(plain.unload(), Path(tmp) / str(tau))
            peft_points.append({"tau": tau, "params": sum(t.numel() for t in tensors.values()),
                                "test": eval_loss(converted, test)})  # fmt: skip
            plain = PeftModel.from_pretrained(converted.unload(), adapter)
    model = load_elastic(plain.unload(), adapter)
    widths = {name: sum(shape) for name, shape in module_shapes(model).items()}
    values = singular_values(model)

    def test_loss(ranks) -> float:
        with at_ranks(model, ranks):
            return eval_loss(model, test)

    def params_of(ranks) -> int:
        return sum(k * widths[name] for name, k in ranks.items())

    results = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "adapter": f"plain LoRA r32 rsLoRA alpha 16, cmudict, {args.steps} steps",
        "full": {"params": params_of({n: len(s) for n, s in values.items()}), "test": test_loss(None)},
        "equal_size": [],
        "search_tolerance": [],
    }
    for point in peft_points:
        budget = point["params"]
        ours_rule = energy_ranks(values, point["tau"])
        row = {"budget": budget, "peft_energy": point | {"our_rule_params": params_of(ours_rule)}}
        sv = global_ranks(values, widths, budget)
        row["global_sv"] = {"params": params_of(sv), "test": test_loss(sv)}
        found = shrink(model, dev, max_params=budget, progress=False)
        row["search_budget"] = {"params": found.params, "dev": found.quality, "test": test_loss(found.ranks)}
        results["equal_size"].append(row)
        print(json.dumps(row), flush=True)
    for found in shrink_family(model, dev, list(TOLERANCES), progress=False):
        tau, energy = matched_energy(values, widths, found.params)
        sv = global_ranks(values, widths, found.params)
        row = {
            "tolerance": found.tolerance,
            "search": {"params": found.params, "dev": found.quality, "test": test_loss(found.ranks)},
            "peft_energy_rule": {"tau": tau, "params": params_of(energy), "test": test_loss(energy)},
            "global_sv": {"params": params_of(sv), "test": test_loss(sv)},
        }
        results["search_tolerance"].append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    write_table(args.out)


def write_table(path: Path) -> None:
    results = json.loads(path.read_text())
    full = results["full"]
    lines = [
        f"{results['adapter']}; test loss on 150 CMUdict rows (dev: the other 150); {results['machine']}, "
        f"{results['date']}. Full rank: {full['params']:,} parameters, test loss {full['test']:.4f}.",
        "",
        "| PEFT convert_to_lora tau | params: PEFT / global SV / search | test loss: PEFT energy | global SV | "
        "elasticlora search (budget) |",
        "|---|---|---|---|---|",
    ]
    for row in results["equal_size"]:
        peft, sv, ours = row["peft_energy"], row["global_sv"], row["search_budget"]
        lines.append(
            f"| {peft['tau']} | {peft['params']:,} / {sv['params']:,} / {ours['params']:,} | {peft['test']:.4f} | "
            f"{sv['test']:.4f} | {ours['test']:.4f} |"
        )
    lines += [
        "",
        "| search tolerance (dev) | params: search / energy rule / global SV | test loss: search | energy rule | "
        "global SV |",
        "|---|---|---|---|---|",
    ]
    for row in results["search_tolerance"]:
        ours, energy, sv = row["search"], row["peft_energy_rule"], row["global_sv"]
        lines.append(
            f"| {row['tolerance']:g} | {ours['params']:,} / {energy['params']:,} / {sv['params']:,} | "
            f"{ours['test']:.4f} | {energy['test']:.4f} | {sv['test']:.4f} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
