"""Every example runs, shortened, on a tiny local model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_example(name: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sft_chat_example_logs_the_rank_curve(tmp_path):
    done = run_example("sft_chat.py", "--model", "tiny", "--steps", "2", "--train-rows", "32", "--eval-rows", "8",
                       "--out", str(tmp_path))  # fmt: skip
    assert "'eval_loss@r1'" in done.stdout and "'eval_loss@full'" in done.stdout
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("bits", ["4", "8"])
def test_qlora_example_trains_shrinks_and_exports_for_the_full_precision_base(bits, tmp_path):
    done = run_example("qlora.py", "--model", "tiny", "--bits", bits, "--steps", "12", "--lr", "1e-2",
                       "--eval-rows", "16", "--tolerance", "0.001", "--out", str(tmp_path))  # fmt: skip
    layer_type = "ElasticLinear4bit" if bits == "4" else "ElasticLinear8bitLt"
    assert f"elastic layers: {layer_type}" in done.stdout
    assert "the export loads on the full-precision base" in done.stdout


def test_trainer_example_runs_in_one_process(tmp_path):
    report = tmp_path / "report.json"
    run_example("distributed.py", "--mode", "trainer", "--model", "tiny", "--steps", "2", "--rows", "32",
                "--out", str(tmp_path / "run"), "--report", str(report))  # fmt: skip
    (process,) = json.loads(report.read_text())
    assert process["world_size"] == 1 and process["wrapper"] == "PeftModel"
