"""Writes tests/data/pre_redesign_adapter/: an elastic adapter saved, and shrunk, by elasticlora before the redesign.

Run with the library at commit d6061fc (the last commit before the rank sampler and the retired index-basis knobs
were replaced), from the repository root:

    git worktree add /tmp/old d6061fc
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_pre_redesign_adapter.py

`tests/test_adapter_io.py` checks that today's code loads this adapter and shrinks it to the same ranks.
"""

import json
from pathlib import Path

import torch
from elasticlora.testing import char_tokenizer, tiny_llama
from elasticlora.train import train_steps
from peft import get_peft_model

from elasticlora import ElasticLoraConfig
from elasticlora.data import eval_batches
from elasticlora.shrink import shrink

OUT = Path(__file__).resolve().parent / "pre_redesign_adapter"
ROWS = [
    {"prompt": "define cat:", "completion": " a small animal."},
    {"prompt": "define dog:", "completion": " a loyal animal."},
    {"text": "the quick brown fox jumps over the lazy dog."},
    {"prompt": "define sun:", "completion": " a star."},
] * 4


def main() -> None:
    model = get_peft_model(tiny_llama(), ElasticLoraConfig(r=8))
    batches = eval_batches(char_tokenizer(), ROWS, batch_size=8)
    train_steps(model, batches, steps=40, lr=1e-2, progress=False)
    model.save_pretrained(OUT)
    result = shrink(model, batches, tolerance=0.02, progress=False)
    expected = {"rows": ROWS, "tolerance": 0.02, "ranks": result.ranks, "quality": result.quality}
    (OUT / "expected_shrink.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"{sum(result.ranks.values())} rank units over {len(result.ranks)} modules, quality {result.quality:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
