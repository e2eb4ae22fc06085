"""Load a saved adapter back as an elastic model, to continue training or to shrink it."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
from peft import PeftModel, get_peft_model

from .config import ELASTIC_FIELDS, ElasticLoraConfig

CONFIG_NAME = "adapter_config.json"


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The raw `adapter_config.json` of a saved adapter, with a clear error when it is missing or unreadable."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is not a LoRA adapter config (peft_type={config.get('peft_type')!r})")
    return config


def is_elastic_config(raw: dict) -> bool:
    """Whether a raw adapter config was saved by ElasticLoraConfig (it keeps the elastic fields)."""
    return any(name in raw for name in ELASTIC_FIELDS)


def is_elastic_adapter(adapter_dir: str | Path) -> bool:
    """Whether the adapter was trained with ElasticLoraConfig."""
    return is_elastic_config(read_adapter_config(adapter_dir))


def elastic_config_from_dir(adapter_dir: str | Path, **overrides) -> ElasticLoraConfig:
    """An ElasticLoraConfig for a saved adapter.

    A plain LoRA gets `rank_sampler='none'` and `truncation_scale_power=0` (every component weighs 1): its
    components were trained under one scale, so a truncation keeps that scale (unless overridden); shrinking it
    SVD-orders its components first. An elastic adapter saved before `truncation_basis` existed keeps 'index'.
    """
    raw = read_adapter_config(adapter_dir)
    if not is_elastic_config(raw):
        raw.update(rank_sampler="none", truncation_scale_power=0.0, truncation_scaling="prefix")
    raw.setdefault("truncation_basis", "index")  # saved before the field existed: the recipe it was trained with
    known = ElasticLoraConfig.__dataclass_fields__
    kwargs = {k: v for k, v in raw.items() if k in known and known[k].init}
    kwargs.update(overrides)
    return ElasticLoraConfig(**kwargs)


def load_elastic(
    model: nn.Module,
    adapter_dir: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **overrides,
) -> PeftModel:
    """Load a saved adapter onto `model` with elastic layers: run it at any rank, shrink it, or keep training it.

    `overrides` replace config fields, e.g. `rank_sampler="log2"` to continue training a plain LoRA elastically.
    """
    config = elastic_config_from_dir(adapter_dir, **overrides)
    return PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )


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
    from peft.tuners.tuners_utils import check_target_module_exists

    candidates = adaptable_modules(model)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in candidates})
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
        raise ValueError(
            f"target_modules={config.target_modules!r} match no module of {type(model).__name__}; adaptable module "
            f"names end in {kinds} (e.g. {candidates[0]!r}); or use target_modules='all-linear'"
        )
    return matched


def get_elastic_model(model: nn.Module, config: ElasticLoraConfig | None = None, **kwargs) -> PeftModel:
    """`get_peft_model(model, config or ElasticLoraConfig())`, after checking that the targets exist in `model`."""
    config = ElasticLoraConfig() if config is None else config
    check_targets(model, config)
    return get_peft_model(model, config, **kwargs)
