"""elasticlora: train LoRA once at maximum rank, then give every layer its smallest sufficient rank.

    model = get_peft_model(model, ElasticLoraConfig())          # train as usual
    shrink_adapter("out/adapter", base_model, "eval.jsonl", "out/shrunk", tolerance=0.01)   # a plain PEFT adapter

The names below are imported on first use, so `import elasticlora` (and the CLI's `--help`) loads neither torch nor
PEFT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ElasticLoraConfig": "config",
    "get_elastic_model": "model",
    "adaptable_modules": "model",
    "elastic_runtimes": "model",
    "attach_sampler": "model",
    "ElasticRuntime": "runtime",
    "load_elastic": "adapter_io",
    "is_elastic_adapter": "adapter_io",
    "at_ranks": "ranks",
    "set_ranks": "ranks",
    "resolve_ranks": "ranks",
    "max_ranks": "ranks",
    "elastic_layers": "ranks",
    "adapter_param_count": "ranks",
    "merge_and_unload_at": "ranks",
    "eval_batches": "data",
    "eval_loss": "evaluate",
    "ShrinkResult": "shrink",
    "ShrinkOptions": "options",
    "export_peft_adapter": "export",
    "shrink_adapter": "workflow",
    "inspect_adapter": "workflow",
    "rank_curve": "callbacks",
    "add_rank_curve": "callbacks",
    "RankCurveCallback": "callbacks",
    "ElasticLoraCallback": "callbacks",
    "ShrinkEstimateCallback": "callbacks",
    "add_shrink_estimate": "callbacks",
    "ShrinkEstimate": "estimate",
    "estimate_shrink": "estimate",
    "rank_advice": "advice",
}

__all__ = [
    "ElasticLoraCallback",
    "ElasticLoraConfig",
    "ElasticRuntime",
    "RankCurveCallback",
    "ShrinkEstimate",
    "ShrinkEstimateCallback",
    "ShrinkOptions",
    "ShrinkResult",
    "adaptable_modules",
    "adapter_param_count",
    "add_rank_curve",
    "add_shrink_estimate",
    "at_ranks",
    "attach_sampler",
    "elastic_layers",
    "elastic_runtimes",
    "estimate_shrink",
    "eval_batches",
    "eval_loss",
    "export_peft_adapter",
    "get_elastic_model",
    "inspect_adapter",
    "is_elastic_adapter",
    "load_elastic",
    "max_ranks",
    "merge_and_unload_at",
    "rank_advice",
    "rank_curve",
    "resolve_ranks",
    "set_ranks",
    "shrink_adapter",
]

if TYPE_CHECKING:
    from .adapter_io import is_elastic_adapter, load_elastic
    from .advice import rank_advice
    from .callbacks import (
        ElasticLoraCallback,
        RankCurveCallback,
        ShrinkEstimateCallback,
        add_rank_curve,
        add_shrink_estimate,
        rank_curve,
    )
    from .config import ElasticLoraConfig
    from .data import eval_batches
    from .estimate import ShrinkEstimate, estimate_shrink
    from .evaluate import eval_loss
    from .export import export_peft_adapter
    from .model import adaptable_modules, attach_sampler, elastic_runtimes, get_elastic_model
    from .options import ShrinkOptions
    from .ranks import (
        adapter_param_count,
        at_ranks,
        elastic_layers,
        max_ranks,
        merge_and_unload_at,
        resolve_ranks,
        set_ranks,
    )
    from .runtime import ElasticRuntime
    from .shrink import ShrinkResult
    from .workflow import inspect_adapter, shrink_adapter


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elasticlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
