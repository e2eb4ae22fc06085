"""Every option of `shrink_adapter`, defined once: the Python API takes them as keywords, the CLI builds flags here.

A field with `metadata["cli"]` becomes a `elasticlora shrink` flag (`--field-name` unless `flags` says otherwise);
the rest of `metadata["cli"]` goes to `argparse.add_argument`. Every check lives in `__post_init__`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is built, so that the CLI parses its flags without it
    import torch

MODES = ("relative", "absolute")
DTYPES = ("auto", "bfloat16", "float16", "float32")  # names of torch dtypes; "auto": see loading.resolve_dtype


def _max_rank_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {value!r}") from None


def check_tolerance(tolerance: float, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise ValueError(f"`tolerance` must be a finite number, got {tolerance!r}")
    if tolerance <= 0:
        raise ValueError(f"`tolerance` must be > 0, got {tolerance}")
    if mode == "relative" and tolerance > 1:
        raise ValueError(f"a relative `tolerance` must be in (0, 1] (0.01 = 1%), got {tolerance}")


def check_max_rank(max_rank: int | str | None, budgeted: bool) -> None:
    if max_rank is None or max_rank == "auto":
        if max_rank == "auto" and budgeted:
            raise ValueError("`max_rank='auto'` picks a bucket by tolerance: with a parameter budget give a number")
        return
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"`max_rank` (--max-rank) must be a positive int or 'auto', got {max_rank!r}")


@dataclass
class ShrinkOptions:
    """How `elasticlora shrink` loads the base model, measures quality and writes the export."""

    tolerance: float | Sequence[float] = field(
        default=0.01,
        metadata={
            "help": "allowed eval-loss increase over the best measured: relative (0.01 = 1%%) unless --absolute; "
            "several values write one adapter per value, each in its own subdirectory of --out, from one search",
            "cli": {"type": float, "nargs": "+", "metavar": "TOL"},
        },
    )
    mode: str = field(
        default="relative",
        metadata={
            "help": "--tolerance is in loss units (nats/token), not a fraction",
            "cli": {"flags": ["--absolute"], "action": "store_const", "const": "absolute"},
        },
    )
    max_params: int | None = field(
        default=None, metadata={"help": "a parameter budget instead of a tolerance", "cli": {"type": int}}
    )
    avg_rank: float | None = field(
        default=None, metadata={"help": "the budget as an average rank over modules", "cli": {"type": float}}
    )
    max_rank: int | str | None = field(
        default=None,
        metadata={
            "help": "cap every module's rank at N (a vLLM --max-lora-rank bucket: 1, 8, 16, 32, 64, ...) before the "
            "search; 'auto': the smallest bucket whose capped adapter is within tolerance",
            "cli": {"type": _max_rank_arg, "metavar": "N|auto"},
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "base model precision; auto: bfloat16 on GPUs that support it and on CPUs where it is faster "
            "than float32 (measured once) or where float32 weights would not fit in memory, else float32",
            "cli": {"choices": sorted(DTYPES)},
        },
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "load the base in 4-bit NF4 (bitsandbytes, as QLoRA trains)", "cli": {}}
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base in 8-bit (bitsandbytes)", "cli": {}})
    device: str | None = field(
        default=None, metadata={"help": "e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)", "cli": {}}
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "'auto' spreads a base larger than one GPU over GPUs and CPU (accelerate)", "cli": {}},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file name inside --base-model, for GGUF checkpoints", "cli": {}}
    )
    batch_size: int = field(default=8, metadata={"help": "eval rows per batch", "cli": {"type": int}})
    max_length: int = field(
        default=1024, metadata={"help": "tokens per eval row (longer rows are cut)", "cli": {"type": int}}
    )
    max_passes: int = field(
        default=12, metadata={"help": "passes over the eval data per search, in all (>= 4)", "cli": {"type": int}}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the sensitivity pass (less memory for long rows)", "cli": {}},
    )
    autocast_dtype: torch.dtype | str | None = field(
        default=None,
        metadata={
            "help": "evaluate under bf16 autocast (faster on GPUs and AMX CPUs, slightly less exact)",
            "cli": {"flags": ["--bf16"], "action": "store_const", "const": "bfloat16"},
        },
    )
    pad_to_max_rank: bool = field(default=False, metadata={"help": "zero-pad every module to one rank", "cli": {}})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out", "cli": {}})
    progress: bool = field(
        default=True,
        metadata={"help": "no progress bars", "cli": {"flags": ["--quiet"], "action": "store_false"}},
    )
    quality: Callable | None = field(
        default=None, metadata={"help": "quality(model) -> float replacing eval loss (Python API only)"}
    )
    higher_is_better: bool = field(default=False, metadata={"help": "`quality` grows with quality (Python API only)"})

    def __post_init__(self) -> None:
        values = [self.tolerance] if isinstance(self.tolerance, (int, float)) else list(self.tolerance)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"`tolerance` must be a number or a list of numbers, got {self.tolerance!r}")
        self.tolerance = values[0] if len(values) == 1 else sorted({float(v) for v in values})
        if not self.budgeted:
            for value in values:
                check_tolerance(value, self.mode)
        if self.max_params is not None and self.avg_rank is not None:
            raise ValueError("give one budget: `max_params` (--max-params) or `avg_rank` (--avg-rank), not both")
        if self.avg_rank is not None and (not math.isfinite(self.avg_rank) or self.avg_rank < 0):
            raise ValueError(f"`avg_rank` must be a non-negative number, got {self.avg_rank}")
        if self.budgeted and isinstance(self.tolerance, list):
            raise ValueError("a parameter budget gives one adapter: give several tolerances or a budget, not both")
        check_max_rank(self.max_rank, self.budgeted)
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.autocast_dtype, str):
            if self.autocast_dtype not in DTYPES[1:]:
                raise ValueError(f"`autocast_dtype` must be one of {DTYPES[1:]}, got {self.autocast_dtype!r}")
            import torch

            self.autocast_dtype = getattr(torch, self.autocast_dtype)
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("choose one of `load_in_4bit` (--load-in-4bit) and `load_in_8bit` (--load-in-8bit)")
        if self.device_map is not None and self.device is not None:
            raise ValueError("give `device` (--device) or `device_map` (--device-map), not both")

    @property
    def budgeted(self) -> bool:
        return self.max_params is not None or self.avg_rank is not None

    @property
    def tolerances(self) -> list[float]:
        return self.tolerance if isinstance(self.tolerance, list) else [self.tolerance]


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `ShrinkOptions` field that has `metadata["cli"]`, with its help text and default."""
    for option in fields(ShrinkOptions):
        if "cli" not in option.metadata:
            continue
        kwargs = dict(option.metadata["cli"])
        flags = kwargs.pop("flags", ["--" + option.name.replace("_", "-")])
        if option.type in ("bool", bool) and "action" not in kwargs:
            kwargs["action"] = "store_true"
        parser.add_argument(*flags, dest=option.name, default=option.default, help=option.metadata["help"], **kwargs)


def options_from_args(args: argparse.Namespace) -> ShrinkOptions:
    return ShrinkOptions(**{f.name: getattr(args, f.name) for f in fields(ShrinkOptions) if "cli" in f.metadata})
