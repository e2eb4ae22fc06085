"""Every example runs, shortened, on a tiny local model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

from elasticlora import ElasticLoraConfig
from elasticlora.data import eval_batches

from conftest import char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # subprocesses, each importing torch and transformers


def train_steps(*args, **kwargs):
    """examples/common.py's loop, imported from the examples folder (this file tests the examples)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from common import train_steps
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return train_steps(*args, **kwargs)


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


def test_sft_chat_example_logs_the_rank_curve_and_the_shrink_estimate(tmp_path):
    done = run_example("sft_chat.py", "--model", "tiny", "--steps", "2", "--train-rows", "32", "--eval-rows", "8",
                       "--out", str(tmp_path))  # fmt: skip
    assert "'eval_loss@r1'" in done.stdout and "'eval_loss@full'" in done.stdout
    assert "step 2: shrink estimate at tolerance 0.01:" in done.stdout and "vLLM --max-lora-rank" in done.stdout
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


def test_train_steps_clips_the_gradient_the_optimizer_sees():
    """`train_steps(max_grad_norm=...)` clips before each optimizer step, and records each step's norm before it;
    `on_step` runs after each optimizer step."""
    rows = [{"prompt": "define cat:", "completion": " a small animal."}] * 8
    batches = eval_batches(char_tokenizer(), rows, batch_size=8)
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    for max_norm in (None, 1e-3):
        model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=4))
        norms = []
        handle = register_optimizer_step_pre_hook(record)
        steps_seen = []
        try:
            train_steps(model, batches, steps=3, lr=1e-2, progress=False, max_grad_norm=max_norm, grad_norms=norms,
                        on_step=lambda step, out=steps_seen: out.append((step, len(seen))))  # fmt: skip
        finally:
            handle.remove()
        assert [step for step, _ in steps_seen] == [1, 2, 3]
        assert [optimizer_steps for _, optimizer_steps in steps_seen] == [len(seen) - 2, len(seen) - 1, len(seen)]
        if max_norm is None:
            assert norms == [] and min(seen) > 1e-3  # unclipped: the optimizer sees the raw gradient
        else:
            assert len(norms) == 3 and min(norms) > 1e-3  # the raw norms, recorded before clipping
            assert max(seen[-3:]) == pytest.approx(1e-3, rel=1e-4)
