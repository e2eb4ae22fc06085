"""Tiny random models (`elasticlora.testing`), built from a config in milliseconds; no downloads."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from elasticlora import ElasticLoraConfig
from elasticlora.data import make_batches
from elasticlora.testing import VOCAB, char_tokenizer, tiny_gpt2, tiny_llama

__all__ = [
    "VOCAB",
    "char_tokenizer",
    "fit",
    "peaked_elastic_model",
    "randomize_lora",
    "sample_batches",
    "tiny_gpt2",
    "tiny_llama",
]

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


def peaked_elastic_model(r: int) -> torch.nn.Module:
    """An elastic adapter of rank `r` on a 2-layer tiny Llama whose head is scaled up: a peaked next-token
    distribution, so what an adapter changes shows in the loss."""
    base = tiny_llama(layers=2)
    with torch.no_grad():
        base.lm_head.weight.mul_(100)
    return get_peft_model(base, ElasticLoraConfig(r=r))


@torch.no_grad()
def sample_batches(model: torch.nn.Module, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """48 rows of 16 tokens sampled from `model` as it runs now (a teacher), as eval batches of 16."""
    torch.manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (48, 1))
    for _ in range(15):
        logits = model(tokens).logits[:, -1]
        tokens = torch.cat([tokens, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    examples = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in tokens]
    return make_batches(examples, batch_size=16, pad_token_id=0)


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
