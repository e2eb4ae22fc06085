"""Wrap a base model with elastic LoRA layers (`get_elastic_model`, with a clear error when nothing matches), and
reach the runtime of its adapters (`elastic_runtimes`, `attach_sampler`)."""

from __future__ import annotations

import torch.nn as nn
from peft import PeftModel, get_peft_model

from ._peft_compat import check_target_module_exists
from .config import ElasticLoraConfig
from .ranks import elastic_layers
from .runtime import ElasticRuntime


def adaptable_modules(model: nn.Module) -> list[str]:
    """Full names of the layers an elastic adapter can wrap: linear and `Conv1D` layers except the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and name
    ]


def check_targets(model: nn.Module, config: ElasticLoraConfig) -> list[str]:
    """The module names `config` adapts in `model`; a `ValueError` listing the candidates when there are none."""
    candidates = adaptable_modules(model)
    if not candidates:
        leaves = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
        raise ValueError(
            f"{type(model).__name__} has no linear or Conv1D layers to adapt (its layer types: {leaves}); "
            "ElasticLoRA adapts linear layers"
        )
    if config.target_modules == "all-linear":
        return candidates
    matched = [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]
    if not matched:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in candidates})
        raise ValueError(
            f"target_modules={config.target_modules!r} match no module of {type(model).__name__}; adaptable module "
            f"names end in {kinds} (e.g. {candidates[0]!r}); or use target_modules='all-linear'"
        )
    return matched


def get_elastic_model(model: nn.Module, config: ElasticLoraConfig | None = None, **kwargs) -> PeftModel:
    """`get_peft_model(model, config or ElasticLoraConfig())`, after checking that the targets exist in `model`; the
    returned model starts each training pass's rank draws (see `sampler.py`)."""
    config = ElasticLoraConfig() if config is None else config
    check_targets(model, config)
    return attach_sampler(get_peft_model(model, config, **kwargs))


def elastic_runtimes(model: nn.Module) -> dict[str, ElasticRuntime]:
    """The `ElasticRuntime` (rank sampler, basis group, hooks) of every elastic adapter of `model`, by adapter name."""
    runtimes: dict[str, ElasticRuntime] = {}
    for layer in elastic_layers(model).values():
        for adapter, state in layer.elastic_state.items():
            runtimes.setdefault(adapter, state.runtime)
    return runtimes


def attach_sampler(model: nn.Module) -> nn.Module:
    """Make `model`'s forward passes start new rank draws for every elastic adapter in it: for a loop that calls a
    module other than the `PeftModel` (see `runtime.py`). Returns `model`."""
    for runtime in elastic_runtimes(model).values():
        runtime.attach(model)
    return model
