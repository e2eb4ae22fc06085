"""elasticlora: train LoRA once at maximum rank, then give every layer its smallest sufficient rank."""

from .adapter_io import is_elastic_adapter, load_elastic
from .config import ElasticLoraConfig
from .layer import ElasticLayerMixin, ElasticLinear, ElasticVariant
from .model import adaptable_modules, get_elastic_model
from .ranks import (
    adapter_param_count,
    at_ranks,
    attach_sampler,
    elastic_layers,
    max_ranks,
    merge_and_unload_at,
    resolve_ranks,
    set_ranks,
)

__version__ = "0.1.0"

__all__ = [
    "ElasticLayerMixin",
    "ElasticLinear",
    "ElasticLoraConfig",
    "ElasticVariant",
    "adaptable_modules",
    "adapter_param_count",
    "at_ranks",
    "attach_sampler",
    "elastic_layers",
    "get_elastic_model",
    "is_elastic_adapter",
    "load_elastic",
    "max_ranks",
    "merge_and_unload_at",
    "resolve_ranks",
    "set_ranks",
]
