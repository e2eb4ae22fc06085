"""Elastic LoRA layers: PEFT's own LoRA layers whose update can be truncated to its top singular directions.

Nothing of LoRA is re-implemented here. Each elastic layer is a subclass of a PEFT LoRA layer (`nn.Linear`,
transformers `Conv1D`, bitsandbytes `Linear8bitLt`/`Linear4bit`, see `dispatch.py`) whose `lora_variant` is
`ElasticVariant`, so PEFT's forward, merge and mixed-batch code paths call into the variant. With the layer's
singular basis `B A = (B N)(M A)` (`basis.py`) and an input `x` of shape (B, ..., in):

    h = A x                                              # (B, ..., r)
    y[b] = W0 x[b] + scaling * B h[b]                     # k_b = r
    y[b] = W0 x[b] + scaling * B N[:, :k_b] M[:k_b] h[b]  # k_b < r

in training, with the rank `k_b` of example b drawn once per forward pass for every layer (`sampler.py`; the
adapter's `ElasticRuntime` in `runtime.py` holds the sampler, the basis group and the hooks): full-rank rows are
exactly a plain LoRA step, and a truncated row still trains every component of A and B, through the top `k_b`
singular directions of the current update (only the truncated rows pay for the extra r x k products). At a fixed
rank k (eval, shrink, export) the layer computes `scaling * (B N[:, :k]) (M[:k] A) x`, the best rank-k
approximation of the update, which is what export writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._peft_compat import LoraLayer, LoraLinear, LoraVariant, transpose
from .basis import BasisCache
from .runtime import ElasticRuntime, runtime_for_new_layer
from .sampler import Truncation


@dataclass
class ElasticState:
    """Per-(layer, adapter) runtime state; not part of the state dict."""

    r: int
    runtime: ElasticRuntime  # the adapter's sampler, basis group and hooks, shared by its layers in one model
    column: int  # this layer's column in the sampler's draws
    basis: BasisCache
    samples: bool  # whether training ever truncates this layer
    rank: int | None = None  # fixed truncation; None = full rank in eval, drawn ranks in training
    merged_rank: int | None = None


def _effective_rank(state: ElasticState, rank: int | None) -> int:
    return state.r if rank is None else min(rank, state.r)


def prefix_factors(module: LoraLayer, adapter: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `(A_k, B_k)`, (k, in) and (out, k), of the rank-k truncation (PEFT's `scaling` not folded in): `B_k A_k`
    is the best rank-k approximation of `B A`. Cached until the factors change; no gradient."""
    state: ElasticState = module.elastic_state[adapter]
    return state.basis.prefix_factors(module.lora_A[adapter].weight, module.lora_B[adapter].weight, k)


def elastic_delta_weight(module: LoraLayer, adapter: str, rank: int | None = None) -> torch.Tensor:
    """The weight update `scaling * B_k A_k` at `rank` (None: full) in the base weight's layout."""
    state: ElasticState = module.elastic_state[adapter]
    k = _effective_rank(state, rank)
    weight_a = module.lora_A[adapter].weight
    weight_b = module.lora_B[adapter].weight
    if k == 0:
        delta = torch.zeros(weight_b.shape[0], weight_a.shape[1], device=weight_b.device, dtype=weight_b.dtype)
        return transpose(delta, module.fan_in_fan_out)
    # fp32 accumulation: CPUs are slow and inexact at half-precision matmuls
    factor_a, factor_b = (weight_a.float(), weight_b.float()) if k == state.r else prefix_factors(module, adapter, k)
    delta = (factor_b @ factor_a) * module.scaling[adapter]
    return transpose(delta.to(weight_b.dtype), module.fan_in_fan_out)


class _Truncate(torch.autograd.Function):
    """`h` with the rows `rows` (None: every row) replaced by `N_k (keep * M_k h)`. Linear in `h`, and the basis
    `M_k`, `N_k` takes no gradient, so the backward pass is the same projection, transposed, of the rows of the
    incoming gradient: one autograd node where separate ops would record five, and no backward kernel over all of
    `h` but one copy (`scripts/bench_overhead.py --truncation-only` times both)."""

    @staticmethod
    def forward(ctx, h, m_k, n_k, rows, keep):
        ctx.save_for_backward(m_k, n_k, rows, keep)
        return _project(h, rows, m_k, keep, n_k)

    @staticmethod
    def backward(ctx, grad):
        m_k, n_k, rows, keep = ctx.saved_tensors
        return _project(grad, rows, n_k.T, keep, m_k.T), None, None, None, None


def _project(h: torch.Tensor, rows, first: torch.Tensor, keep, second: torch.Tensor) -> torch.Tensor:
    """`h` with the rows `rows` (None: all) replaced by `second (keep * first h)`, out of place."""
    selected = h if rows is None else h.index_select(0, rows)
    z = F.linear(selected, first)
    if keep is not None:
        z = z.mul_(keep)
    selected = F.linear(z, second)
    return selected if rows is None else h.index_put((rows,), selected)


def truncate(h: torch.Tensor, cut: Truncation, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """`h` (B, ..., r) with each row of `cut.rows` projected on its top singular components, `N_k M_k h`; the other
    rows are untouched, so they train exactly as plain LoRA. Costs O(k r) per truncated token and a copy of `h`."""
    return _Truncate.apply(h, m[: cut.k], n[:, : cut.k], cut.rows, cut.keep)


class ElasticVariant(LoraVariant):
    """The LoRA variant behind every elastic layer: drawn truncations in training, a fixed rank otherwise."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: Any, **kwargs: Any) -> None:
        if not hasattr(module, "elastic_state"):
            module.elastic_state = {}
        runtime = runtime_for_new_layer(config, adapter_name)
        r = module.r[adapter_name]
        module.elastic_state[adapter_name] = ElasticState(
            r=r,
            runtime=runtime,
            column=runtime.register(r),
            basis=BasisCache(config.basis_refresh_steps, runtime.bases),
            samples=runtime.sampler.samples(r),
        )

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        state = module.elastic_state[active_adapter]
        state.merged_rank = state.rank
        return orig_weight + elastic_delta_weight(module, active_adapter, state.rank).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        state = module.elastic_state[active_adapter]
        state.merged_rank = state.rank
        orig_weight.data += elastic_delta_weight(module, active_adapter, state.rank).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        state = module.elastic_state[active_adapter]
        delta = elastic_delta_weight(module, active_adapter, state.merged_rank)
        state.merged_rank = None
        return orig_weight.data - delta.to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        state: ElasticState = module.elastic_state[active_adapter]
        output = _elastic_forward(module, state, active_adapter, x, result)
        weight_a, weight_b = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        if torch.is_grad_enabled() and (weight_a.requires_grad or weight_b.requires_grad):
            state.basis.trained()  # an optimizer may now change A and B
        return output


def _elastic_forward(
    module: LoraLayer, state: ElasticState, active_adapter: str, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    lora_a = module.lora_A[active_adapter]
    lora_b = module.lora_B[active_adapter]
    dropout = module.lora_dropout[active_adapter]
    scaling = module.scaling[active_adapter]
    # PEFT's layer has already cast x where it casts for vanilla LoRA (not under autocast for bitsandbytes)
    k = _effective_rank(state, state.rank)
    if state.rank is None and module.training and state.samples:
        h = lora_a(dropout(x))  # (B, ..., r)
        cut = state.runtime.truncation(state.column, h)
        if cut is None:  # every row at full rank: a plain LoRA step
            return result + lora_b(h) * scaling
        pass_index = state.runtime.sampler.current_pass.index
        m, n = state.basis.training(lora_a.weight, lora_b.weight, h.dtype, pass_index)
        return result + lora_b(truncate(h, cut, m, n)) * scaling
    if k == state.r:  # through the lora_A module, whose output hook `sensitivity` reads
        return result + lora_b(lora_a(dropout(x))) * scaling
    if k == 0:
        return result
    weight_a, weight_b = lora_a.weight, lora_b.weight
    if torch.is_grad_enabled() and (weight_a.requires_grad or weight_b.requires_grad):
        m, n = state.basis.current(weight_a, weight_b)  # training at a fixed rank: gradient through A and B
        factor_a, factor_b = m[:k].to(weight_a.dtype) @ weight_a, weight_b @ n[:, :k].to(weight_b.dtype)
    else:  # the factors export writes, so eval and the export agree to rounding
        factor_a, factor_b = prefix_factors(module, active_adapter, k)
        factor_a, factor_b = factor_a.to(weight_a.dtype), factor_b.to(weight_b.dtype)
    return result + F.linear(F.linear(dropout(x), factor_a), factor_b) * scaling


class ElasticLayerMixin:
    """What every elastic layer adds to its PEFT LoRA base class."""

    other_param_names = LoraLayer.other_param_names + ("elastic_state",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.elastic_target_name = kwargs.get("target_name", "")

    def resolve_lora_variant(self, *, config, **kwargs):
        if getattr(config, "is_elastic", False):  # an ElasticLoraConfig (a plain LoraConfig for another adapter)
            return ElasticVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter in getattr(self, "elastic_state", {}):
            return elastic_delta_weight(self, adapter, self.elastic_state[adapter].rank)
        return super().get_delta_weight(adapter)

    def set_elastic_rank(self, rank: int | None, adapter_name: str) -> None:
        """Run this layer at truncation `rank` (0 drops the adapter, None restores full rank / training draws)."""
        state = self.elastic_state[adapter_name]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= state.r):
            raise ValueError(f"rank for {self.elastic_target_name!r} must be an int in [0, {state.r}], got {rank!r}")
        if self.merged:
            raise ValueError("cannot change the rank of a merged adapter; call `unmerge_adapter()` first")
        state.rank = rank

    def drawn_ranks(self, adapter_name: str = "default") -> torch.Tensor | None:
        """This layer's ranks in the last training forward pass (one per example, or one per batch), on the host."""
        state = self.elastic_state[adapter_name]
        return state.runtime.sampler.last_ranks(state.column)


class ElasticLinear(ElasticLayerMixin, LoraLinear):
    def __repr__(self) -> str:
        return "elastic" + super().__repr__()
