"""Which elastic layer replaces which base layer: the factories `ElasticLoraConfig` hands PEFT's custom dispatch.

bitsandbytes layers subclass `nn.Linear`, so the `nn.Linear` factory receives them too and builds the elastic layer
over PEFT's bitsandbytes LoRA layer; bitsandbytes is imported only then, when a quantized model already has.
"""

from __future__ import annotations

import functools
import sys

import torch.nn as nn

from ._peft_compat import bnb_4bit_kwargs, bnb_lora_layers, register_custom_modules
from .layer import ElasticLayerMixin, ElasticLinear


@functools.cache
def _elastic_bnb_layers() -> dict[str, tuple[type, type]]:
    """{"8bit" | "4bit": (bitsandbytes layer type, its elastic layer)} for what this build provides."""
    names = {"8bit": "ElasticLinear8bitLt", "4bit": "ElasticLinear4bit"}
    return {
        bits: (quantized, type(names[bits], (ElasticLayerMixin, lora_layer), {"__module__": __name__}))
        for bits, (quantized, lora_layer) in bnb_lora_layers().items()
    }


def _quantized_layer(target: nn.Module) -> tuple[str, type] | None:
    """("8bit" | "4bit", elastic layer type) when `target` wraps a bitsandbytes layer, else None."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if "bitsandbytes" not in sys.modules or not type(base).__module__.startswith("bitsandbytes"):
        return None
    for bits, (quantized, elastic) in _elastic_bnb_layers().items():
        if isinstance(base, quantized):
            return bits, elastic
    return None


def _make_linear(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLayerMixin:
    quantized = _quantized_layer(target)
    if quantized is not None:
        bits, elastic = quantized
        extra = bnb_4bit_kwargs(target) if bits == "4bit" else {}
        return elastic(target, adapter_name, config=config, **kwargs, **extra)
    config.fan_in_fan_out = False
    return ElasticLinear(target, adapter_name, config=config, **kwargs)


def _make_conv1d(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLinear:
    # transformers' Conv1D stores its weight as (in, out); PEFT's own dispatch flags that with fan_in_fan_out
    config.fan_in_fan_out = True
    return ElasticLinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)


def register_elastic_modules(config) -> None:
    """Map the layer types elastic LoRA supports to their elastic layers (PEFT takes the first `isinstance` match)."""
    from transformers.pytorch_utils import Conv1D

    register_custom_modules(config, {Conv1D: _make_conv1d, nn.Linear: _make_linear})
