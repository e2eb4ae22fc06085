"""Every PEFT internal elasticlora relies on, in one place.

PEFT has no public extension point for a new kind of LoRA layer, so elasticlora uses a few of its private or
"prone to change" names. They are all imported or called here and nowhere else; `tests/test_peft_compat.py` checks
each signature and behaviour relied on, so a PEFT release that changes one fails there, with a message that names
the change, instead of somewhere deep in training.

Relied on (PEFT 0.19 to 0.21; 0.18 builds custom layers without `config` and resolves variants otherwise):
- `LoraConfig._register_custom_module(mapping)`: layer type -> factory `(target, adapter_name, config=, **kwargs)`;
  PEFT's dispatch takes the first `isinstance` match and passes `target_name` among the kwargs (experimental API).
- `LoraVariant`: static `init(module, adapter_name, config=, **kwargs)`, `merge_safe`, `merge_unsafe`, `unmerge`
  and `forward(module, active_adapter, x, result, **kwargs)`, which returns the whole output (base included).
- `LoraLayer.resolve_lora_variant(*, config, **kwargs)`, called from `update_layer` to pick the variant.
- `LoraLayer.other_param_names`: attributes PEFT treats as per-adapter state (a tuple of names).
- `peft.tuners.lora.bnb.Linear8bitLt` / `Linear4bit`, and the quantization arguments `dispatch_bnb_4bit` passes to
  `Linear4bit` (`compute_dtype`, `compress_statistics`, `quant_type`).
- `peft.utils.other.transpose` and `peft.tuners.tuners_utils.check_target_module_exists`.
- On transformers v5, PEFT rewrites a mixture-of-experts config's targets by assigning `config.target_parameters`
  (`ElasticLoraConfig.__setattr__` drops them; tests/test_architectures.py checks it on Mixtral).
"""

from __future__ import annotations

from typing import Any

import peft
import torch.nn as nn
from peft import LoraConfig
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import transpose

SUPPORTED_PEFT = ">=0.19,<0.22"  # pyproject.toml pins the same range; tests/test_peft_compat.py checks it

__all__ = [
    "SUPPORTED_PEFT",
    "LoraLayer",
    "LoraLinear",
    "LoraModel",
    "LoraVariant",
    "bnb_4bit_kwargs",
    "bnb_lora_layers",
    "check_target_module_exists",
    "register_custom_modules",
    "transpose",
]


def register_custom_modules(config: LoraConfig, mapping: dict[type, Any]) -> None:
    """Make PEFT build `mapping[type(target)]` (first `isinstance` match, in order) instead of its own LoRA layers."""
    config._register_custom_module(mapping)


def bnb_lora_layers() -> dict[str, tuple[type, type]]:
    """{"8bit" | "4bit": (bitsandbytes layer type, PEFT's LoRA layer over it)} for what this build provides."""
    layers = {}
    if is_bnb_available():
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear8bitLt

        layers["8bit"] = (bnb.nn.Linear8bitLt, Linear8bitLt)
    if is_bnb_4bit_available():
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit

        layers["4bit"] = (bnb.nn.Linear4bit, Linear4bit)
    return layers


def bnb_4bit_kwargs(target: nn.Module) -> dict[str, Any]:
    """The quantization arguments PEFT's own `dispatch_bnb_4bit` gives `Linear4bit` for `target`."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    return {
        "compute_dtype": base.compute_dtype,
        "compress_statistics": base.weight.compress_statistics,
        "quant_type": base.weight.quant_type,
    }


def peft_version() -> str:
    return peft.__version__
