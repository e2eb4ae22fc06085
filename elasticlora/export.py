"""Export a truncated elastic adapter as a standard PEFT LoRA adapter that plain PEFT and vLLM load.

The convention is PEFT's own (`convert_to_lora`): every module's scale `scaling * s(k)` is folded into `lora_B` in
fp32, and the config sets `r = lora_alpha = max module rank` with `rank_pattern == alpha_pattern` keyed by full
module names, so each module's PEFT scale `alpha_m / r_m` is exactly 1. Readers that ignore `rank_pattern` (vLLM
< 0.32) still compute the right output from the folded weights as long as ranks are uniform, which `pad_to_max_rank`
guarantees. Modules at rank 0 are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig
from safetensors.torch import save as save_bytes

from .layer import prefix_factors
from .ranks import RankSpec, active_adapter_name, elastic_layers, resolve_ranks

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`."""
    for bucket in VLLM_MAX_LORA_RANKS:
        if rank <= bucket:
            return bucket
    raise ValueError(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


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
    return config, tensors


def _peft_config(model: nn.Module, adapter: str):
    configs = getattr(model, "peft_config", None) or {}
    return configs.get(adapter)


def write_atomically(out_dir: str | Path, files: dict[str, bytes], overwrite: bool = False) -> Path:
    """Write `files` (name -> bytes) into `out_dir` through a temporary sibling directory and one rename.

    Refuses an existing `out_dir` unless `overwrite`; then the old directory is replaced only once the new one is
    complete.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in files.items():  # a name may hold subdirectories: "tolerance-0.01/report.json"
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def adapter_files(config: LoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The bytes of `adapter_config.json` and `adapter_model.safetensors`."""
    config_dict = config.to_dict()
    for key, value in config_dict.items():
        if isinstance(value, set):
            config_dict[key] = sorted(value)
    return {
        CONFIG_NAME: (json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n").encode(),
        WEIGHTS_NAME: save_bytes(tensors, metadata={"format": "pt"}),
    }


__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "adapter_files",
    "export_peft_adapter",
    "vllm_max_lora_rank",
    "write_atomically",
]
