"""Every example runs, shortened, on a tiny local model."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    data = tmp_path / "rows.jsonl"  # the character tokenizer knows lowercase letters only
    rows = [
        {"prompt": "define cat:", "completion": " a small animal."},
        {"prompt": "define sun:", "completion": " a star."},
    ]
    data.write_text("\n".join(json.dumps(row) for row in rows * 4) + "\n")
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data), "--steps", "20"]
    args += ["--lr", "1e-2", "--max-rank", "4", "--batch-size", "8", "--no-bf16", "--out", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ElasticLoRA demo" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    # the export reloaded in plain PEFT scores what shrink measured (fp32: equal to rounding)
    assert abs(summary["reloaded_quality"] - summary["quality"]) < 1e-4
    assert (out / "shrunk" / "report.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()
