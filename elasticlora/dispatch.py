"""Which elastic layer replaces which base layer: the factories `ElasticLoraConfig` hands PEFT's custom dispatch."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ._peft_compat import bnb_4bit_kwargs, bnb_lora_layers, register_custom_modules
from .layer import ElasticLayerMixin, ElasticLinear

_BNB = bnb_lora_layers()  # {"8bit" | "4bit": (bitsandbytes layer, PEFT's LoRA layer over it)}

if "8bit" in _BNB:

    class ElasticLinear8bitLt(ElasticLayerMixin, _BNB["8bit"][1]):
        """Elastic LoRA over an 8-bit bitsandbytes base layer."""


if "4bit" in _BNB:

    class ElasticLinear4bit(ElasticLayerMixin, _BNB["4bit"][1]):
        """Elastic LoRA over a 4-bit (QLoRA nf4/fp4) bitsandbytes base layer."""


def _make_conv1d(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLinear:
    # transformers' Conv1D stores its weight as (in, out); PEFT's own dispatch flags that with fan_in_fan_out
    config.fan_in_fan_out = True
    return ElasticLinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)


def _make_linear(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLinear:
    config.fan_in_fan_out = False
    return ElasticLinear(target, adapter_name, config=config, **kwargs)


def _make_8bit(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLayerMixin:
    return ElasticLinear8bitLt(target, adapter_name, config=config, **kwargs)


def _make_4bit(target: nn.Module, adapter_name: str, config, **kwargs) -> ElasticLayerMixin:
    return ElasticLinear4bit(target, adapter_name, config=config, **kwargs, **bnb_4bit_kwargs(target))


def register_elastic_modules(config) -> None:
    """Map the layer types elastic LoRA supports to their elastic layers, most specific first.

    Order matters: PEFT's custom dispatch takes the first `isinstance` match, and bitsandbytes layers subclass
    `nn.Linear`.
    """
    from transformers.pytorch_utils import Conv1D

    factories = {"8bit": _make_8bit, "4bit": _make_4bit}
    mapping: dict[type, Any] = {quantized: factories[bits] for bits, (quantized, _) in _BNB.items()}
    mapping[Conv1D] = _make_conv1d
    mapping[nn.Linear] = _make_linear
    register_custom_modules(config, mapping)
