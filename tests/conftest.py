"""Tiny random models (`elasticlora.testing`), built from a config in milliseconds; no downloads."""

from __future__ import annotations

import pytest
import torch

from elasticlora.testing import VOCAB, char_tokenizer, tiny_gpt2, tiny_llama

__all__ = ["VOCAB", "char_tokenizer", "fit", "randomize_lora", "tiny_gpt2", "tiny_llama"]

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


def fit(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the trainable parameters over `batches`, cycled, for `steps` steps; returns the losses."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with a character tokenizer: a local `--base-model`."""
    path = tmp_path_factory.mktemp("tiny_base")
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
