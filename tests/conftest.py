"""Tiny random models, built from a config in milliseconds; no downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from common import VOCAB, char_tokenizer, tiny_gpt2, tiny_llama  # noqa: E402

__all__ = ["VOCAB", "char_tokenizer", "tiny_gpt2", "tiny_llama"]

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA B a non-zero value, so adapters change outputs (PEFT initialises B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer: a local `--base-model`."""
    path = tmp_path_factory.mktemp("tiny_base")
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
