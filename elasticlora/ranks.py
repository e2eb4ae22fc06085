"""Run an elastic model at chosen ranks, without copying weights, and count adapter parameters.

Ranks are given as one int for every layer, a mapping from module name to rank (names as PEFT's `rank_pattern`
keys them: the module's full name in the base model, e.g. `model.layers.0.self_attn.q_proj`), or None for full rank.
A rank of 0 drops a module's adapter.

    with at_ranks(model, 4):
        loss = model(**batch).loss          # every layer truncated to its top 4 singular directions
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from ._peft_compat import LoraLayer, LoraModel
from .basis import svd_basis
from .layer import ElasticLayerMixin

RankSpec = int | Mapping[str, int | None] | None


def _root(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    if isinstance(model, LoraModel):
        return model.model
    return model


def elastic_layers(model: nn.Module) -> dict[str, ElasticLayerMixin]:
    """Every elastic LoRA layer of `model` by full module name, in model order."""
    layers = {name: m for name, m in _root(model).named_modules() if isinstance(m, ElasticLayerMixin)}
    if not layers:
        raise ValueError(
            "the model has no elastic LoRA layers: wrap it with `get_peft_model(model, ElasticLoraConfig())` or load "
            "an elastic adapter with `elasticlora.load_elastic`"
        )
    return layers


def active_adapter_name(model: nn.Module, adapter_name: str | None = None) -> str:
    if adapter_name is not None:
        return adapter_name
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    layer = next(iter(elastic_layers(model).values()))
    return layer.active_adapters[0]


def max_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """The trained (maximum) rank of every elastic layer."""
    adapter = active_adapter_name(model, adapter_name)
    return {name: layer.r[adapter] for name, layer in elastic_layers(model).items() if adapter in layer.r}


def resolve_ranks(model: nn.Module, ranks: RankSpec, adapter_name: str | None = None) -> dict[str, int]:
    """Expand a rank spec to an explicit {module name: rank} for every elastic layer, validating it."""
    full = max_ranks(model, adapter_name)
    if ranks is None:
        return dict(full)
    if isinstance(ranks, Mapping):
        unknown = sorted(set(ranks) - set(full))
        if unknown:
            examples = ", ".join(list(full)[:3])
            raise ValueError(f"unknown module names in ranks: {unknown[:5]}; names look like: {examples}")
        resolved = {name: full[name] if ranks.get(name) is None else ranks[name] for name in full}
    elif isinstance(ranks, int) and not isinstance(ranks, bool):
        resolved = {name: min(ranks, r) for name, r in full.items()}
    else:
        raise TypeError(f"ranks must be None, an int or a mapping of module name to int, got {type(ranks).__name__}")
    for name, k in resolved.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= full[name]:
            raise ValueError(f"rank for {name!r} must be an int in [0, {full[name]}], got {k!r}")
    return resolved


def set_ranks(model: nn.Module, ranks: RankSpec, adapter_name: str | None = None) -> dict[str, int | None]:
    """Fix every elastic layer at the given ranks (None: full rank in eval, sampled ranks in training).

    Returns the previous setting, which `set_ranks` accepts to restore it.
    """
    adapter = active_adapter_name(model, adapter_name)
    layers = elastic_layers(model)
    previous = {name: layer.elastic_state[adapter].rank for name, layer in layers.items()}
    if ranks is None:
        new: Mapping[str, int | None] = dict.fromkeys(layers)
    elif isinstance(ranks, Mapping) and any(v is None for v in ranks.values()):
        resolve_ranks(model, {k: v for k, v in ranks.items() if v is not None}, adapter)  # validates
        new = {name: ranks.get(name) for name in layers}
    else:
        new = resolve_ranks(model, ranks, adapter)
    for name, layer in layers.items():
        layer.set_elastic_rank(new[name], adapter)
    return previous


@contextlib.contextmanager
def at_ranks(model: nn.Module, ranks: RankSpec, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """Context manager: run `model` at `ranks`, restoring the previous ranks on exit."""
    previous = set_ranks(model, ranks, adapter_name)
    try:
        yield model
    finally:
        set_ranks(model, previous, adapter_name)


def module_shapes(model: nn.Module, adapter_name: str | None = None) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every elastic layer."""
    return {name: (layer.in_features, layer.out_features) for name, layer in elastic_layers(model).items()}


def adapter_param_count(model: nn.Module, ranks: RankSpec = None, adapter_name: str | None = None) -> int:
    """Number of LoRA parameters (A and B) at `ranks`: sum over modules of k * (in_features + out_features)."""
    resolved = resolve_ranks(model, ranks, adapter_name)
    shapes = module_shapes(model, adapter_name)
    return sum(k * (shapes[name][0] + shapes[name][1]) for name, k in resolved.items())


def merge_and_unload_at(model: nn.Module, ranks: RankSpec, adapter_name: str | None = None) -> nn.Module:
    """Merge the adapter truncated to `ranks` into the base weights and return the plain base model."""
    set_ranks(model, ranks, adapter_name)
    return model.merge_and_unload()


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoraLayer]:
    """The elastic layers of an elastic model; for a plain PEFT LoRA model, its LoRA layers that hold the adapter
    (which `truncated` cuts through their singular basis)."""
    layers = {name: m for name, m in _root(model).named_modules() if isinstance(m, LoraLayer)}
    elastic = {name: m for name, m in layers.items() if isinstance(m, ElasticLayerMixin)}
    if elastic:
        return elastic
    adapter = adapter_name or getattr(model, "active_adapter", None)
    plain = {name: m for name, m in layers.items() if adapter in m.lora_A}
    if not plain:
        raise ValueError("the model has no LoRA layers: wrap it with `get_peft_model(model, ElasticLoraConfig())`")
    dora = [name for name, m in plain.items() if m.use_dora.get(adapter)]
    if dora:
        raise ValueError(f"{dora[0]} uses DoRA: rank truncation applies to plain LoRA and elastic layers only")
    return plain


def singular_basis(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) of a LoRA layer's update (`basis.svd_basis`), from an elastic layer's cache when it has one."""
    weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if isinstance(layer, ElasticLayerMixin):
        return layer.elastic_state[adapter].basis.current(weight_a, weight_b)
    return svd_basis(weight_a, weight_b)


@contextlib.contextmanager
def truncated(model: nn.Module, ranks: RankSpec, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """`at_ranks` for an elastic model. For a plain PEFT LoRA model, each layer below its rank gets its rank-k SVD
    truncation written into its factors (`M[:k] A` and `B N[:, :k]`, zero-padded to r), restored bit for bit on
    exit; so no gradient step may run inside."""
    layers = lora_layers(model, adapter_name)
    if isinstance(next(iter(layers.values())), ElasticLayerMixin):
        with at_ranks(model, ranks, adapter_name):
            yield model
        return
    adapter = adapter_name or model.active_adapter
    full = {name: layer.r[adapter] for name, layer in layers.items()}
    wanted = full if ranks is None else ranks if isinstance(ranks, Mapping) else dict.fromkeys(full, ranks)
    saved = []
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                k = full[name] if wanted.get(name) is None else min(wanted[name], full[name])
                if k == full[name]:
                    continue
                weight_a, weight_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                m, n = svd_basis(weight_a, weight_b)
                saved.append((weight_a, weight_a.clone(), weight_b, weight_b.clone()))
                cut_a = torch.zeros_like(weight_a)
                cut_a[:k] = m[:k] @ weight_a.float()
                cut_b = torch.zeros_like(weight_b)
                cut_b[:, :k] = weight_b.float() @ n[:, :k]
                weight_a.copy_(cut_a)
                weight_b.copy_(cut_b)
        yield model
    finally:
        with torch.no_grad():
            for weight_a, copy_a, weight_b, copy_b in saved:
                weight_a.copy_(copy_a)
                weight_b.copy_(copy_b)
