"""Elastic layers over PEFT's bitsandbytes LoRA layers (QLoRA: 4-bit and 8-bit bases)."""

from __future__ import annotations

from typing import Any

from peft.import_utils import is_bnb_4bit_available, is_bnb_available

from .config import ElasticLoraConfig
from .layer import ElasticLayerMixin

if is_bnb_available():
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear8bitLt

    class ElasticLinear8bitLt(ElasticLayerMixin, Linear8bitLt):
        """Elastic LoRA over an 8-bit bitsandbytes base layer."""


if is_bnb_4bit_available():
    from peft.tuners.lora.bnb import Linear4bit

    class ElasticLinear4bit(ElasticLayerMixin, Linear4bit):
        """Elastic LoRA over a 4-bit (QLoRA nf4/fp4) bitsandbytes base layer."""


def _make_8bit(target, adapter_name: str, config: ElasticLoraConfig, **kwargs) -> ElasticLinear8bitLt:
    return ElasticLinear8bitLt(target, adapter_name, config=config, **kwargs)


def _make_4bit(target, adapter_name: str, config: ElasticLoraConfig, **kwargs) -> ElasticLinear4bit:
    # the same quantization arguments PEFT's own `dispatch_bnb_4bit` passes
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    kwargs.update(
        compute_dtype=base.compute_dtype,
        compress_statistics=base.weight.compress_statistics,
        quant_type=base.weight.quant_type,
    )
    return ElasticLinear4bit(target, adapter_name, config=config, **kwargs)


def bnb_factories() -> dict[type, Any]:
    """bitsandbytes layer type -> elastic layer factory, for the layer types this bitsandbytes build provides."""
    factories: dict[type, Any] = {}
    if is_bnb_available():
        factories[bnb.nn.Linear8bitLt] = _make_8bit
    if is_bnb_4bit_available():
        factories[bnb.nn.Linear4bit] = _make_4bit
    return factories
