"""Adapter directories: read their config and tensor shapes, tell elastic from plain, load, and write atomically.

An elastic adapter directory is a plain PEFT LoRA directory whose `adapter_config.json` also keeps the
`ElasticLoraConfig` fields (`ELASTIC_FIELDS`, or the fields of an earlier version in `RETIRED_FIELDS`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from .config import ELASTIC_FIELDS, ElasticLoraConfig
from .model import attach_sampler

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# fields of earlier elasticlora versions; adapters saved with them hold plain B and A, and load as today's
RETIRED_FIELDS = ("truncation_scale_power", "truncation_scaling", "truncation_basis")


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
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{path} is not a LoRA adapter config (peft_type={peft_type!r})")
    return config


def is_elastic_config(raw: dict) -> bool:
    """Whether a raw adapter config was saved by ElasticLoraConfig (it keeps the elastic fields)."""
    return any(name in raw for name in ELASTIC_FIELDS + RETIRED_FIELDS)


def is_elastic_adapter(adapter_dir: str | Path) -> bool:
    """Whether the adapter was trained with ElasticLoraConfig."""
    return is_elastic_config(read_adapter_config(adapter_dir))


def config_fields(raw: dict, config_class: type[LoraConfig]) -> dict:
    """The entries of a raw adapter config that `config_class` takes as constructor arguments."""
    known = config_class.__dataclass_fields__
    return {k: v for k, v in raw.items() if k in known and known[k].init}


def elastic_config_from_dir(adapter_dir: str | Path, **overrides) -> ElasticLoraConfig:
    """An ElasticLoraConfig for a saved adapter. A plain LoRA gets `rank_sampler='none'`: it trained at full rank
    only, and a truncation keeps its top singular directions (LoRA-Squeeze, PEFT's `convert_to_lora`)."""
    raw = read_adapter_config(adapter_dir)
    if not is_elastic_config(raw):
        raw["rank_sampler"] = "none"
    return ElasticLoraConfig(**{**config_fields(raw, ElasticLoraConfig), **overrides})


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
    model = PeftModel.from_pretrained(
        model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable, config=config
    )
    return attach_sampler(model)


def read_adapter_shapes(adapter_dir: str | Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name: {"lora_A": shape, "lora_B": shape}} from the safetensors header, without loading weights.
    Tensors that are not LoRA factors are listed under "(other tensors)"."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: save adapters with `save_pretrained` (safetensors is required)")
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B") or parts[-1] != "weight":
                    modules.setdefault("(other tensors)", {})[key] = tuple(f.get_slice(key).get_shape())
                    continue
                name = ".".join(parts[:-2]).removeprefix("base_model.model.")
                modules.setdefault(name, {})[parts[-2]] = tuple(f.get_slice(key).get_shape())
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if not modules:
        raise ValueError(f"{path} holds no tensors")
    return modules


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


def write_atomically(out_dir: str | Path, files: dict[str, bytes], overwrite: bool = False) -> Path:
    """Write `files` (name -> bytes) into `out_dir` through a temporary sibling directory and one rename.

    Refuses an existing `out_dir` unless `overwrite`; then the old directory is replaced only once the new one is
    complete.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} already exists; choose another output directory or pass overwrite=True (--overwrite)"
        )
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
