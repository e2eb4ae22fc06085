"""`ElasticLoraConfig`: a PEFT `LoraConfig` whose layers train every rank prefix at once.

PEFT cannot register a new `peft_type` from outside, so the config stays `peft_type=LORA` and registers elastic
subclasses of PEFT's own LoRA layers through PEFT's custom-module dispatch (`dispatch.py`). The extra fields below
are saved in `adapter_config.json`; plain PEFT drops them with a warning when it loads the file, so a max-rank
checkpoint is an ordinary LoRA adapter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from peft import LoraConfig

from .dispatch import register_elastic_modules
from .sampler import rank_support

RANK_SAMPLERS = ("log2", "uniform", "none")
DRAW_UNITS = ("example", "batch")

# Fields that exist only on ElasticLoraConfig; their presence in adapter_config.json marks an elastic adapter.
ELASTIC_FIELDS = ("rank_sampler", "min_rank", "full_rank_prob", "shared_draw_prob", "draw_per", "basis_refresh_steps")


@dataclass
class ElasticLoraConfig(LoraConfig):
    """LoRA trained at maximum rank `r` with nested ("matryoshka") dropout over the rank dimension.

    In training mode each example runs the adapter truncated to a rank `k` drawn at random, once per forward pass
    (every layer at the same `k` by default), so each truncation learns to stand on its own. A truncation keeps the
    top `k` singular directions of each layer's current update `B A`:

        x -> W0 x + scaling * B N[:, :k] M[:k] A x,     B A = (B N)(M A) ordered by singular value,

    with the r x r basis (M, N) found in factored form every `basis_refresh_steps` training passes and no gradient
    through it. A full-rank draw (`full_rank_prob`, half the examples by default) is a plain LoRA step; a truncated
    one still trains all of A and B. `scaling` is PEFT's (`lora_alpha / sqrt(r)` with the default
    `use_rslora=True`, else `lora_alpha / r`).
    A checkpoint is an ordinary PEFT LoRA holding `B` and `A`; shrink and export find the same ordering from it.

    `get_peft_model(model, ElasticLoraConfig())` needs no arguments: every linear layer but the output head is
    adapted at rank 64.
    """

    is_elastic: ClassVar[bool] = True  # how elastic layers tell this config from a plain LoraConfig

    r: int = field(
        default=64, metadata={"help": "Maximum rank: the rank trained and saved; shrink cuts it per layer."}
    )
    lora_alpha: int = field(
        default=16,
        metadata={"help": "Scale numerator: PEFT scaling is lora_alpha / sqrt(r) (rsLoRA, the default) or / r."},
    )
    use_rslora: bool = field(
        default=True,
        metadata={"help": "Scale by lora_alpha / sqrt(r) (rsLoRA), which keeps the update size stable across r."},
    )
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={"help": "Modules to adapt; 'all-linear' adapts every linear layer except the output head."},
    )
    rank_sampler: Literal["log2", "uniform", "none"] = field(
        default="log2",
        metadata={
            "help": (
                "How truncation ranks are drawn in training: 'log2' draws uniformly from the powers of two between "
                "min_rank and r (and r itself), 'uniform' from every integer in [min_rank, r], 'none' always trains "
                "at full rank (plain LoRA)."
            )
        },
    )
    min_rank: int = field(
        default=1, metadata={"help": "Smallest truncation rank drawn in training (1 <= min_rank <= r)."}
    )
    full_rank_prob: float = field(
        default=0.5,
        metadata={
            "help": (
                "Probability that a draw trains the full rank r, on top of the sampler's share of r: that part of the "
                "data trains the full adapter exactly as plain LoRA would, the rest trains truncations. Higher "
                "values favour the full adapter, lower ones the small truncations (docs/results.md measures the "
                "trade-off)."
            )
        },
    )
    shared_draw_prob: float = field(
        default=1.0,
        metadata={
            "help": (
                "Probability that a draw is shared by every layer (the whole model runs at one truncation rank for "
                "that example, full rank included) instead of each layer drawing its own. Independent draws train "
                "the mixed per-layer ranks shrink picks; shared draws train the uniform configurations, the full "
                "model among them. 1 is DyLoRA's one rank for all layers."
            )
        },
    )
    draw_per: Literal["example", "batch"] = field(
        default="example",
        metadata={
            "help": "Draw a truncation rank for every example of a batch ('example') or one per batch ('batch')."
        },
    )
    basis_refresh_steps: int = field(
        default=4,
        metadata={
            "help": (
                "Training recomputes each layer's singular basis every this many training forward passes (each "
                "micro-batch of an accumulated step is one) and reuses it in between; eval, shrink and export always "
                "use the current one. A stale basis still gives exact full-rank steps and rank-k truncations, only "
                "not the best rank-k ones."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_elastic_fields()
        register_elastic_modules(self)
        self.__dict__["_built"] = True

    def __setattr__(self, name, value):
        # PEFT rewrites a config's targets for mixture-of-experts models whose experts transformers v5 stores as 3-D
        # parameters (`target_parameters`, trained by plain `ParamWrapper` LoRA); elastic layers truncate linear
        # layers only, so those targets are dropped with a warning instead of joining the adapter unshrinkably.
        if name == "target_parameters" and value and self.__dict__.get("_built"):
            warn_dropped_parameters(sorted(value))
            value = None
        super().__setattr__(name, value)

    def _validate_elastic_fields(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive int, got {self.r!r}")
        if self.rank_sampler not in RANK_SAMPLERS:
            raise ValueError(f"`rank_sampler` must be one of {RANK_SAMPLERS}, got {self.rank_sampler!r}")
        if self.draw_per not in DRAW_UNITS:
            raise ValueError(f"`draw_per` must be one of {DRAW_UNITS}, got {self.draw_per!r}")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank <= 0:
            raise ValueError(f"`min_rank` must be a positive int, got {self.min_rank!r}")
        if (
            isinstance(self.basis_refresh_steps, bool)
            or not isinstance(self.basis_refresh_steps, int)
            or self.basis_refresh_steps <= 0
        ):
            raise ValueError(f"`basis_refresh_steps` must be a positive int, got {self.basis_refresh_steps!r}")
        if self.min_rank > self.r:
            raise ValueError(f"`min_rank` ({self.min_rank}) must not exceed the maximum rank `r` ({self.r})")
        for name in ("full_rank_prob", "shared_draw_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
        if self.target_parameters:
            raise ValueError(
                f"`target_parameters={self.target_parameters!r}` is not supported by ElasticLoraConfig: it adapts "
                "linear layers (`target_modules`) only"
            )
        unsupported = {
            "use_dora": "DoRA",
            "lora_bias": "LoRA bias",
        }
        for name, what in unsupported.items():
            if getattr(self, name):
                raise ValueError(
                    f"`{name}=True` is not supported by ElasticLoraConfig: {what} has no rank prefix structure "
                    "(and vLLM refuses it); set it to False"
                )
        if self.bias != "none":
            raise ValueError(f"`bias` must be 'none' for ElasticLoraConfig (vLLM refuses others), got {self.bias!r}")

    def rank_support(self, r: int | None = None) -> list[int]:
        """The truncation ranks the sampler draws for a layer of rank `r` (default: `self.r`), ascending."""
        return rank_support(self.r if r is None else r, self.rank_sampler, self.min_rank)


def warn_dropped_parameters(names: list[str]) -> None:
    warnings.warn(
        f"elastic LoRA adapts linear layers only: the 3-D weights PEFT would target with plain LoRA ({names}, the "
        "experts and routers of a mixture-of-experts model) are left frozen; to adapt them, train a plain LoraConfig",
        stacklevel=3,
    )
