"""`elasticlora shrink` across base precisions, rank caps and tolerance families, on SmolLM2-135M.

Each run is the CLI in a child process (its peak resident memory comes from `os.wait4`), shrinking the demo's elastic
adapter (`make demo` writes outputs/demo/adapter) on the demo's 96 eval rows; every export is then scored on the fp32
base, as plain PEFT loads it, on the other 204 WordNet eval rows (test).

- precision: `--dtype float32`, `--dtype bfloat16`, `--load-in-8bit`, `--load-in-4bit` (NF4): the chosen ranks
  against fp32's, the test loss of each export, peak memory and wall time;
- buckets: free, `--max-rank 8`, `--max-rank 16`, `--max-rank auto` (fp32): parameters, test loss, vLLM bucket;
- family: `--tolerance 0.005 0.01 0.02` in one run against three single runs (passes);
- buckets_cmudict: the bucket runs again on a plain LoRA r 32 trained on CMUdict (scripts/shrink_baselines.py),
  whose free shrink keeps high ranks, so a cap has a price.

    python scripts/shrink_options_study.py            # about 15 minutes on 2 CPU cores
    python scripts/shrink_options_study.py --report   # only rewrite the .md table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from peft import PeftModel
from shrink_at_scale import child_peak

from elasticlora.data import eval_batches, load_rows
from elasticlora.evaluate import eval_loss
from elasticlora.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "outputs" / "shrink_options_study"
DEMO_ADAPTER = ROOT / "outputs" / "demo" / "adapter"  # `make demo`
CMUDICT_ADAPTER = ROOT / "outputs" / "shrink_baselines" / "plain_lora_r32_180steps"  # scripts/shrink_baselines.py
# task -> (eval rows, how many of them are dev; the rest are test)
TASKS = {
    "wordnet": (ROOT / "examples" / "data" / "wordnet_eval.jsonl", 96),  # the demo shrinks on the first 96
    "cmudict": (ROOT / "scripts" / "data" / "cmudict_eval.jsonl", 150),
}
FP32 = ["--dtype", "float32"]
# part -> (adapter, task, {run name: CLI flags})
PARTS = {
    "precision": (DEMO_ADAPTER, "wordnet", {
        "float32": FP32, "bfloat16": ["--dtype", "bfloat16"], "8bit": ["--load-in-8bit"], "4bit": ["--load-in-4bit"],
    }),
    "buckets": (DEMO_ADAPTER, "wordnet", {
        "free": FP32, "cap 16": [*FP32, "--max-rank", "16"], "cap 8": [*FP32, "--max-rank", "8"],
        "auto": [*FP32, "--max-rank", "auto"],
    }),
    "family": (DEMO_ADAPTER, "wordnet", {
        "tolerance 0.005 0.01 0.02": [*FP32, "--tolerance", "0.005", "0.01", "0.02"],
    }),
    "buckets_cmudict": (CMUDICT_ADAPTER, "cmudict", {
        "free": FP32, "cap 16": [*FP32, "--max-rank", "16"], "cap 8": [*FP32, "--max-rank", "8"],
        "auto": [*FP32, "--max-rank", "auto"],
    }),
}  # fmt: skip


def base_dir() -> Path:
    """SmolLM2 saved once as safetensors (bitsandbytes quantizes on load, from a safetensors checkpoint)."""
    path = WORK / "smollm2-base"
    if not (path / "config.json").exists():
        model, tokenizer = load_model_and_tokenizer("smollm2")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def shrink_run(adapter: Path, base: Path, dev: Path, out: Path, flags: list[str]) -> dict:
    command = [sys.executable, "-m", "elasticlora", "shrink", str(adapter), "--base-model", str(base),
               "--data", str(dev), "--out", str(out), "--overwrite", "--quiet", *flags]  # fmt: skip
    start = time.time()
    peak_gib, _ = child_peak(command)
    return {"flags": flags, "seconds": round(time.time() - start, 1), "peak_rss_mib": round(1024 * peak_gib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "shrink_options.json")
    parser.add_argument("--report", action="store_true", help="only rewrite the .md table from --out")
    args = parser.parse_args()
    if args.report:
        write_table(args.out)
        return
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    results["date"] = str(date.today())
    base = base_dir()
    fp32_base, tokenizer = load_model_and_tokenizer(str(base), dtype=torch.float32)

    def test_loss(adapter_dir: Path, test) -> float:
        model = PeftModel.from_pretrained(fp32_base, adapter_dir)
        try:
            return eval_loss(model, test)
        finally:
            model.unload()

    for part, (adapter, task, runs) in PARTS.items():
        if not (adapter / "adapter_config.json").exists():
            sys.exit(f"{adapter} is missing: run `make demo` and scripts/shrink_baselines.py first")
        path, dev_rows = TASKS[task]
        rows = load_rows(path)[:300]  # the rows the published table used
        dev = WORK / f"{task}_dev.jsonl"
        dev.write_text("".join(json.dumps(row) + "\n" for row in rows[:dev_rows]))
        test = eval_batches(tokenizer, rows[dev_rows:], batch_size=16)
        for name, flags in runs.items():
            key = f"{part}|{name}"
            if key in results.get("runs", {}):
                continue
            out = WORK / part / name.replace(" ", "_")
            entry = shrink_run(adapter, base, dev, out, flags) | {"task": task, "adapter": adapter.name}
            members = sorted(p.parent for p in out.glob("*/report.json")) or [out]
            for member in members:
                report = json.loads((member / "report.json").read_text())
                modules = results.setdefault("modules", {}).setdefault(task, list(report["ranks"]))
                entry.setdefault("exports", []).append({
                    "tolerance": report["tolerance"], "ranks": [report["ranks"][name] for name in modules],
                    "params": report["params"],
                    "dev_full": report["full_quality"], "dev": report["quality"], "passes": report["passes"],
                    "passes_run": report["passes_run"], "rank_cap": report["rank_cap"],
                    "cap_quality": report["cap_quality"], "max_rank": report["export_max_rank"],
                    "vllm_bucket": report["vllm_max_lora_rank"], "test": test_loss(member, test),
                })  # fmt: skip
            results.setdefault("runs", {})[key] = entry
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(key, {k: v for k, v in entry.items() if k != "exports"}, flush=True)
    write_table(args.out)


def write_table(path: Path) -> None:
    results = json.loads(path.read_text())
    runs = results["runs"]
    lines = [
        f"`elasticlora shrink` options on SmolLM2-135M, {results['machine']}, {results['date']}. wordnet: the demo's "
        "elastic adapter (r 32), dev 96 rows, test 204; cmudict: a plain LoRA r 32 (scripts/shrink_baselines.py), dev "
        "150, test 150. Test loss of every export on the fp32 base; ranks compared with the same adapter's fp32 "
        "free run.",
        "",
        "| run | task | peak RSS MiB | wall s | dev loss full / chosen | params | max rank (vLLM bucket) | "
        "cap: dev loss | modules at free fp32's rank | mean abs rank diff | test loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in runs.items():
        free = runs["buckets_cmudict|free" if entry.get("task") == "cmudict" else "precision|float32"]
        reference = free["exports"][0]["ranks"]  # in the order of results["modules"][task]
        for export in entry["exports"]:
            pairs = list(zip(export["ranks"], reference, strict=True))
            same = sum(k == ref for k, ref in pairs) / len(pairs)
            diff = sum(abs(k - ref) for k, ref in pairs) / len(pairs)
            label = key if len(entry["exports"]) == 1 else f"{key} @ {export['tolerance']}"
            cap = "" if export["rank_cap"] is None else f"{export['rank_cap']}: {export['cap_quality']:.4f}"
            lines.append(
                f"| {label.replace('|', ': ')} | {entry.get('task', 'wordnet')} | {entry['peak_rss_mib']} | "
                f"{entry['seconds']} | {export['dev_full']:.4f} / {export['dev']:.4f} | {export['params']:,} | "
                f"{export['max_rank']} ({export['vllm_bucket']}) | {cap} | {100 * same:.0f}% | {diff:.2f} | "
                f"{export['test']:.4f} |"
            )
    family = runs.get("family|tolerance 0.005 0.01 0.02")
    if family:
        exports = family["exports"]
        alone = [e["passes"] for e in exports]
        lines += ["", f"Family: {exports[0]['passes_run']} passes for {len(exports)} adapters "
                  f"(alone: {' + '.join(map(str, alone))} = {sum(alone)})."]  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
