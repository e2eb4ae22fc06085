"""Export a truncated elastic adapter as a standard PEFT LoRA adapter that plain PEFT and vLLM load.

The convention is PEFT's own (`convert_to_lora`): every module's scale `scaling` is folded into `lora_B` in
fp32, and the config sets `r = lora_alpha = max module rank` with `rank_pattern == alpha_pattern` keyed by full
module names, so each module's PEFT scale `alpha_m / r_m` is exactly 1; `auto_mapping` records the base model's
class, as PEFT does for a base without a hub id. Readers that ignore `rank_pattern` (vLLM < 0.32) still compute the
right output from the folded weights as long as ranks are uniform, which `pad_to_max_rank` guarantees. Modules at
rank 0 are absent. Writing the files is `adapter_io.adapter_files` / `write_atomically`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from peft import LoraConfig

from .layer import prefix_factors
from .ranks import RankSpec, active_adapter_name, elastic_layers, resolve_ranks


def _check_unambiguous(names: list[str]) -> None:
    # PEFT and vLLM match rank_pattern keys as dotted suffixes: no key may be a suffix of another module's name
    for name in names:
        for other in names:
            if other != name and other.endswith("." + name):
                raise ValueError(
                    f"module name {name!r} is a dotted suffix of {other!r}: rank_pattern would be ambiguous"
                )


@torch.no_grad()
def export_peft_adapter(
    model: nn.Module,
    ranks: RankSpec = None,
    adapter_name: str | None = None,
    pad_to_max_rank: bool = False,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A plain `LoraConfig` and fp32 `lora_A`/`lora_B` tensors for `model` truncated to `ranks`. Pure: no I/O.

    Tensor keys follow PEFT's saved layout (`base_model.model.<module>.lora_A.weight`).
    """
    adapter = active_adapter_name(model, adapter_name)
    resolved = resolve_ranks(model, ranks, adapter)
    kept = {name: k for name, k in resolved.items() if k > 0}
    if not kept:
        raise ValueError(
            "every module is at rank 0: the adapter is empty (the base model alone is within tolerance); "
            "nothing to export"
        )
    _check_unambiguous(list(kept))
    layers = elastic_layers(model)
    max_rank = max(kept.values())
    tensors: dict[str, torch.Tensor] = {}
    for name, k in kept.items():
        layer = layers[name]
        weight_a, weight_b = prefix_factors(layer, adapter, k)  # (k, in), (out, k)
        weight_b = weight_b * layer.scaling[adapter]
        if pad_to_max_rank and k < max_rank:
            weight_a = torch.cat([weight_a, weight_a.new_zeros(max_rank - k, weight_a.shape[1])])
            weight_b = torch.cat([weight_b, weight_b.new_zeros(weight_b.shape[0], max_rank - k)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = weight_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = weight_b.contiguous()

    source = _peft_config(model, adapter)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pattern = {} if pad_to_max_rank else dict(kept)
    config = LoraConfig(
        r=max_rank,
        lora_alpha=max_rank,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        use_rslora=False,
        target_modules=sorted(kept),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=any(layers[name].fan_in_fan_out for name in kept),
        task_type=getattr(source, "task_type", None),
        base_model_name_or_path=getattr(source, "base_model_name_or_path", None),
        inference_mode=True,
    )
    # PEFT's record of the base model's class: `elasticlora inspect` reads vLLM's support for the architecture from it
    config.auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return config, tensors


def _peft_config(model: nn.Module, adapter: str):
    configs = getattr(model, "peft_config", None) or {}
    return configs.get(adapter)


__all__ = ["export_peft_adapter"]
