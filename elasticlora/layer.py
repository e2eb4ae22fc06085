"""Elastic LoRA layers: PEFT's own LoRA layers with a prefix mask over the rank dimension.

Nothing of LoRA is re-implemented here. Each elastic layer is a subclass of a PEFT LoRA layer (`nn.Linear`,
transformers `Conv1D`, bitsandbytes `Linear8bitLt`/`Linear4bit`) whose `lora_variant` is `ElasticVariant`, so PEFT's
forward, merge and mixed-batch code paths call into the variant. For an input `x` of shape (B, ..., in) and
`truncation_basis='index'` the variant computes

    h = A x                                  # (B, ..., r)
    y = W0 x + scaling * B (h * m)           # m: (B, 1, ..., r), m[b, j] = s(k_b) c_j if j < k_b else 0

in training, with `k_b` drawn per example (or per batch), a prefix scale `s(k)` and fixed component weights `c_j`
(`truncation_scaling='prefix'`: `s(k) = (r / k) ** truncation_scale_power`, `c_j = 1`; 'component': `s(k) = 1` and
`c_j` from `ElasticLoraConfig.component_weights`). That costs O(B * T * r) against the O(B * T * r * width) of the
LoRA matmuls. At a fixed truncation `k` (eval, shrink, export) it slices instead: `scaling * B[:, :k] (g_k * A[:k] x)`
with `g_k = s(k) c[:k]`, which is cheaper than full rank.

Under `truncation_basis='svd'` (the default) the components are instead those of the update in its singular
basis: `B A = (B N)(M A)` with r x r matrices from `svd_basis`, so a training draw computes `B (h - N ((1 - m) * (M
h)))` (full-rank rows are exactly `B h`) with a basis recomputed every `basis_refresh_steps` optimizer steps, and a
fixed truncation `B N[:, :k] (M[:k] A x)` from the current basis; the weights are all 1.

With component weights, the parameter `lora_B` holds `B / c` (so Adam moves component j at a speed proportional to
`c_j`) and the state dict holds `B` itself: a saved checkpoint is a plain LoRA at full rank.

Draws are a pure function of (torch seed, process rank, layer, call count), from a private generator: they are
reproducible, independent across layers and across data-parallel processes, and identical when gradient
checkpointing recomputes a forward pass during backward.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear, LoraLayer, LoraVariant
from peft.utils.other import transpose

from .config import ElasticLoraConfig

_MASK64 = (1 << 64) - 1
# the last call's draws from the stream every layer shares (see `ElasticState._shared_uniforms`)
_SHARED_STREAM: dict[str, Any] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 31)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing recomputes a forward."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class ElasticState:
    """Per-(layer, adapter) runtime state; not part of the state dict."""

    r: int
    support: list[int]  # truncation ranks the sampler draws, ascending; the last is r
    probs: list[float]
    scales: list[float]  # s(k) for each k in support
    scale_power: float  # s(k) = (r / k) ** scale_power (0 under component scaling)
    weights: list[float]  # c_j, the fixed weight of component j (all 1 under prefix scaling)
    shared_prob: float
    draw_per: str
    basis: str = "index"  # "svd": truncations keep the top singular directions of B A (see `svd_basis`)
    basis_refresh_steps: int = 1  # optimizer steps a training basis is reused for
    layer_key: int = 0
    rank: int | None = None  # fixed truncation; None = full rank in eval, sampled in training
    merged_rank: int | None = None
    calls: int = 0
    last_draw: torch.Tensor | None = None
    _tables: dict[tuple, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: ElasticLoraConfig, r: int, target_name: str) -> ElasticState:
        support = config.rank_support(r)
        n = len(support)
        probs = [(1.0 - config.full_rank_prob) / n] * n
        probs[-1] += config.full_rank_prob
        return cls(
            r=r,
            support=support,
            probs=probs,
            scales=[config.prefix_scale(r, k) for k in support],
            scale_power=config.truncation_scale_power
            if config.truncation_scaling == "prefix" and config.truncation_basis == "index"
            else 0.0,
            weights=config.component_weights(r),
            shared_prob=config.shared_draw_prob,
            draw_per=config.draw_per,
            basis=config.truncation_basis,
            basis_refresh_steps=config.basis_refresh_steps,
            layer_key=zlib.crc32(target_name.encode()),
        )

    @property
    def samples(self) -> bool:
        return len(self.support) > 1

    @cached_property
    def weighted(self) -> bool:
        """Whether components carry weights other than 1 (then full rank is not a plain `B A`)."""
        return any(w != 1.0 for w in self.weights)

    def scale_at(self, k: int) -> float:
        return (self.r / k) ** self.scale_power

    def gains(self, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(k,) weight of each component in the prefix of rank k: `s(k) * c[:k]`."""
        key = ("gains", k, device, dtype)
        if key not in self._tables:
            gains = torch.tensor(self.weights[:k], dtype=torch.float64) * self.scale_at(k)
            self._tables[key] = gains.to(device=device, dtype=dtype)
        return self._tables[key]

    def _device_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        if key not in self._tables:
            cdf = torch.tensor(self.probs, dtype=torch.float64).cumsum(0)
            cdf[-1] = 1.0  # guard against rounding: searchsorted(u < 1) must stay in range
            prefix = torch.arange(self.r)[None, :] < torch.tensor(self.support)[:, None]  # (n, r)
            masks = prefix.to(torch.float64) * torch.tensor(self.scales, dtype=torch.float64)[:, None]
            masks = masks * torch.tensor(self.weights, dtype=torch.float64)
            self._tables[key] = (cdf.to(device=device, dtype=torch.float32), masks.to(device=device, dtype=dtype))
        return self._tables[key]

    def _generator(self, key: int, device: torch.device) -> torch.Generator:
        seed = torch.initial_seed()
        for part in (_process_rank(), key, self.calls):
            seed = _splitmix64(seed ^ part)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed & ((1 << 63) - 1))
        return generator

    def _shared_uniforms(self, n_draws: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The key-0 stream's draws for this call (the quantile, then the share test): the same in every layer, so
        the first layer of a forward pass draws them and the others reuse them."""
        key = (torch.initial_seed(), _process_rank(), self.calls, n_draws, device)
        if _SHARED_STREAM.get("key") != key:
            shared = self._generator(0, device)
            uniforms = tuple(torch.rand(n_draws, generator=shared, device=device) for _ in range(2))
            _SHARED_STREAM.update(key=key, uniforms=uniforms)
        return _SHARED_STREAM["uniforms"]

    def draw(self, n_draws: int, device: torch.device) -> torch.Tensor:
        """Indices into `support`, one per draw; reused as-is while gradient checkpointing recomputes.

        Each draw inverts the sampler's CDF at a uniform `u`: the layer's own stream (keyed by its name) or, with
        probability `shared_prob`, a stream keyed by 0 that every layer reproduces at the same call, so those draws
        pick the same quantile, and so the same rank, in every layer.
        """
        if _in_backward() and self.last_draw is not None and self.last_draw.shape[0] == n_draws:
            return self.last_draw
        self.calls += 1
        cdf, _ = self._device_tables(device, torch.float32)
        if self.shared_prob < 1.0:
            u = torch.rand(n_draws, generator=self._generator(self.layer_key, device), device=device)
        if self.shared_prob > 0.0:
            u_shared, u_share = self._shared_uniforms(n_draws, device)
            u = torch.where(u_share < self.shared_prob, u_shared, u) if self.shared_prob < 1.0 else u_shared
        self.last_draw = torch.searchsorted(cdf, u, right=True).clamp_(max=len(self.support) - 1)
        return self.last_draw

    def training_mask(self, h: torch.Tensor) -> torch.Tensor:
        """Scaled prefix mask broadcastable to the rank activations `h` (B, ..., r)."""
        per_example = self.draw_per == "example" and h.dim() > 1
        n_draws = h.shape[0] if per_example else 1
        idx = self.draw(n_draws, h.device)
        _, masks = self._device_tables(h.device, h.dtype)
        mask = masks.index_select(0, idx)  # (n_draws, r)
        if not per_example:
            return mask[0]
        return mask.view(n_draws, *([1] * (h.dim() - 2)), self.r)

    def drawn_ranks(self) -> torch.Tensor | None:
        """The truncation ranks of the last training draw (for inspection and tests)."""
        if self.last_draw is None:
            return None
        return torch.tensor(self.support, device=self.last_draw.device)[self.last_draw]


def _effective_rank(state: ElasticState, rank: int | None) -> int:
    return state.r if rank is None else min(rank, state.r)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run r x r linear algebra on one CPU thread: LAPACK's threads cost far more than these small problems (one
    32 x 32 `eigh` took 1-20 ms on two threads of a busy 2-core CPU against 0.08 ms on one)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _svd_basis(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N), r x r in fp32, with `N M = I` and `B A = (B N)(M A)`, whose k leading components give the best rank-k
    approximation of `B A`.

    With `A A^T = L L^T` (L = Q diag(sqrt(lam)) from its eigendecomposition) the rows of `L^-1 A` are orthonormal, so
    the singular vectors of `B A` are those of `B L`: `(B L)^T (B L) = V diag(s^2) V^T`, and M = V^T L^-1, N = L V.
    O((in + out) r^2): two Gram matrices and two r x r eigendecompositions, with no host synchronisation.
    """
    with _one_cpu_thread(weight_a.device):
        return _svd_basis_of(weight_a.float(), weight_b.float())


def _svd_basis_of(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # non-finite factors (a diverged run) give a finite basis, so the outputs are non-finite as plain LoRA's are
    lam, q = torch.linalg.eigh(torch.nan_to_num(a @ a.T, 0.0, 0.0, 0.0))  # defined however ill-conditioned A is
    root = lam.clamp_min(lam.max().clamp_min(1e-30) * 1e-12).sqrt()  # a rank-deficient A: whiten its range
    low, low_inv = q * root, (q / root).T
    bl = b @ low
    _, v = torch.linalg.eigh(torch.nan_to_num(bl.T @ bl, 0.0, 0.0, 0.0))
    v = v.flip(-1)  # by decreasing singular value
    return v.T @ low_inv, low @ v


def svd_basis(
    state: ElasticState, weight_a: torch.Tensor, weight_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_svd_basis` of a layer's factors, cached until either parameter changes (the optimizer step bumps their
    version counters), so eval passes and checkpointed recomputation reuse it."""
    return _cached_basis(state, weight_a, weight_b)[1:3]


def _cached_basis(state: ElasticState, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
    """(key, M, N, {k: prefix factors}): the factors cached for a basis go stale with it."""
    key = _factor_key(weight_a, weight_b)
    cached = state._tables.get("basis")
    if cached is None or cached[0] != key:
        cached = (key, *_svd_basis(weight_a, weight_b), {})
        state._tables["basis"] = cached
    return cached


def _factor_key(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
    """Changes whenever the optimizer changes either factor (an in-place update bumps the version counter)."""
    return (weight_a.data_ptr(), weight_a._version, weight_b.data_ptr(), weight_b._version, weight_a.device)


def _training_basis(state: ElasticState, weight_a: torch.Tensor, weight_b: torch.Tensor, dtype: torch.dtype):
    """(M, N) in `dtype` for a training pass, from a basis recomputed every `basis_refresh_steps` optimizer steps.

    A step is a change of the factors between training forwards, so the micro-batches of an accumulated step count
    once; a forward that gradient checkpointing recomputes during backward reuses what its first run used."""
    key = _factor_key(weight_a, weight_b)
    cached = state._tables.get("training")
    if cached is None or (cached["key"] != key and not _in_backward()):
        if cached is None or cached["age"] + 1 >= state.basis_refresh_steps:
            _, m, n, _ = _cached_basis(state, weight_a, weight_b)
            cached = {"basis": (m, n), "age": 0}
        else:
            cached["age"] += 1
        cached["key"] = key
        state._tables["training"] = cached
    if cached.get("dtype") != dtype:
        cached.update(dtype=dtype, cast=tuple(t.to(dtype) for t in cached["basis"]))
    return cached["cast"]


def prefix_factors(module: LoraLayer, adapter: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `(A_k, B_k)`, (k, in) and (out, k), of the rank-k truncation (component weights folded into B_k, PEFT's
    `scaling` not): `B_k A_k` is the update at rank k over `scaling`. In the singular basis they are cached and carry
    no gradient."""
    state: ElasticState = module.elastic_state[adapter]
    weight_a = module.lora_A[adapter].weight
    weight_b = module.lora_B[adapter].weight
    if state.basis == "svd":
        _, m, n, factors = _cached_basis(state, weight_a, weight_b)
        if k not in factors:
            with torch.no_grad():
                factors[k] = (m[:k] @ weight_a.float(), weight_b.float() @ n[:, :k])
        return factors[k]
    return weight_a[:k].float(), weight_b[:, :k].float() * state.gains(k, weight_b.device, torch.float32)


def elastic_delta_weight(module: LoraLayer, adapter: str, rank: int | None = None) -> torch.Tensor:
    """The weight update `scaling * s(k) * B[:, :k] A[:k]` in the base weight's layout, at `rank` (None: full)."""
    state: ElasticState = module.elastic_state[adapter]
    k = _effective_rank(state, rank)
    weight_a = module.lora_A[adapter].weight
    weight_b = module.lora_B[adapter].weight
    dtype = weight_b.dtype
    if k == 0:
        delta = torch.zeros(weight_b.shape[0], weight_a.shape[1], device=weight_b.device, dtype=dtype)
        return transpose(delta, module.fan_in_fan_out)
    # fp32 accumulation: CPUs are slow and inexact at half-precision matmuls
    factor_a, factor_b = prefix_factors(module, adapter, k)
    delta = (factor_b @ factor_a) * module.scaling[adapter]
    return transpose(delta.to(dtype), module.fan_in_fan_out)


def _scale_columns(value: torch.Tensor, weights: torch.Tensor, inverse: bool) -> torch.Tensor:
    """`value * weights` (or `/`) over the last dim, in fp32; a DTensor sharded along its rows scales its shard."""
    local = value.to_local() if hasattr(value, "to_local") else value
    weights = weights.to(local.device, torch.float32)
    scaled = (local.float() / weights if inverse else local.float() * weights).to(local.dtype)
    if local is value:
        return scaled
    if any(getattr(p, "dim", None) == value.dim() - 1 for p in value.placements):
        raise NotImplementedError("lora_B sharded along the rank dimension is not supported with component weights")
    return type(value).from_local(
        scaled, value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
    )


def _fold_on_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = _scale_columns(state_dict[key].detach(), module.elastic_component_weights, inverse=False)


def _unfold_on_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = _scale_columns(state_dict[key], module.elastic_component_weights, inverse=True)


def _attach_component_weights(lora_b: nn.Linear, weights: list[float]) -> None:
    """Make `lora_B`'s state dict hold `B = param * c` (and loading divide by `c`), so checkpoints are plain LoRA.

    The parameter PEFT just initialised becomes `B / c`, so the update at init is the one `init_lora_weights` asked
    for (zero by default; PiSSA, OLoRA, random B and the like keep their meaning).
    """
    first = not hasattr(lora_b, "elastic_component_weights")
    lora_b.elastic_component_weights = torch.tensor(weights, dtype=torch.float32)
    if first:
        with torch.no_grad():
            lora_b.weight.copy_(_scale_columns(lora_b.weight, lora_b.elastic_component_weights, inverse=True))
        # public since torch 2.5; the private name has the same signature in 2.4
        register = getattr(lora_b, "register_state_dict_post_hook", None) or lora_b._register_state_dict_hook
        register(_fold_on_save)
        lora_b.register_load_state_dict_pre_hook(_unfold_on_load)


class ElasticVariant(LoraVariant):
    """The LoRA variant behind every elastic layer: a rank-prefix mask in training, slicing at a fixed rank."""

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: ElasticLoraConfig, **kwargs: Any) -> None:
        if not hasattr(module, "elastic_state"):
            module.elastic_state = {}
        target_name = kwargs.get("target_name") or getattr(module, "elastic_target_name", "")
        state = ElasticState.from_config(config, module.r[adapter_name], target_name)
        module.elastic_state[adapter_name] = state
        if state.weighted:
            _attach_component_weights(module.lora_B[adapter_name], state.weights)

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
        lora_a = module.lora_A[active_adapter]
        lora_b = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        # PEFT's layer has already cast x where it casts for vanilla LoRA (not under autocast for bitsandbytes)
        if state.rank is None and module.training and state.samples:
            h = lora_a(dropout(x))  # (B, ..., r)
            if state.basis == "index":
                return result + lora_b(h * state.training_mask(h)) * scaling
            # drop the trailing singular directions: h - N ((1 - m) * (M h)), so full-rank rows stay exactly h
            m, n = _training_basis(state, lora_a.weight, lora_b.weight, h.dtype)
            tail = F.linear(h, m) * (1 - state.training_mask(h))
            return result + lora_b(h - F.linear(tail, n)) * scaling
        k = _effective_rank(state, state.rank)
        if k == state.r:  # through the lora_A module, whose output hook `shrink.sensitivity` reads
            h = lora_a(dropout(x))
            return result + lora_b(h * state.gains(k, h.device, h.dtype) if state.weighted else h) * scaling
        if k == 0:
            return result
        if state.basis == "svd":  # the factors export writes, so eval and the export agree to rounding
            if torch.is_grad_enabled() and (lora_a.weight.requires_grad or lora_b.weight.requires_grad):
                m, n = svd_basis(state, lora_a.weight, lora_b.weight)
                weight_a = m[:k].to(lora_a.weight.dtype) @ lora_a.weight
                weight_b = lora_b.weight @ n[:, :k].to(lora_b.weight.dtype)
            else:
                weight_a, weight_b = prefix_factors(module, active_adapter, k)
                weight_a, weight_b = weight_a.to(lora_a.weight.dtype), weight_b.to(lora_b.weight.dtype)
            return result + F.linear(F.linear(dropout(x), weight_a), weight_b) * scaling
        h = F.linear(dropout(x), lora_a.weight[:k])  # (B, ..., k)
        if not state.weighted:
            return result + F.linear(h, lora_b.weight[:, :k]) * (scaling * state.scale_at(k))
        return result + F.linear(h * state.gains(k, h.device, h.dtype), lora_b.weight[:, :k]) * scaling


class ElasticLayerMixin:
    """What every elastic layer adds to its PEFT LoRA base class."""

    other_param_names = LoraLayer.other_param_names + ("elastic_state",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ElasticLoraConfig, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # bitsandbytes layers do not forward `target_name` to `update_layer`; fix the draw key up here
        self.elastic_target_name = kwargs.get("target_name", "")
        for state in self.elastic_state.values():
            state.layer_key = zlib.crc32(self.elastic_target_name.encode())

    def resolve_lora_variant(self, *, config, **kwargs):
        if isinstance(config, ElasticLoraConfig):
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


class ElasticLinear(ElasticLayerMixin, Linear):
    def __repr__(self) -> str:
        return "elastic" + super().__repr__()


def _make_conv1d(target: nn.Module, adapter_name: str, config: ElasticLoraConfig, **kwargs) -> ElasticLinear:
    # transformers' Conv1D stores its weight as (in, out); PEFT's own dispatch flags that with fan_in_fan_out
    config.fan_in_fan_out = True
    return ElasticLinear(target, adapter_name, config=config, is_target_conv_1d_layer=True, **kwargs)


def _make_linear(target: nn.Module, adapter_name: str, config: ElasticLoraConfig, **kwargs) -> ElasticLinear:
    config.fan_in_fan_out = False
    return ElasticLinear(target, adapter_name, config=config, **kwargs)


def register_elastic_modules(config: ElasticLoraConfig) -> None:
    """Map the layer types elastic LoRA supports to their elastic layers, most specific first.

    Order matters: PEFT's custom dispatch takes the first `isinstance` match, and bitsandbytes layers subclass
    `nn.Linear`.
    """
    from transformers.pytorch_utils import Conv1D

    from .bnb import bnb_factories

    mapping: dict[type, Any] = bnb_factories()
    mapping[Conv1D] = _make_conv1d
    mapping[nn.Linear] = _make_linear
    config._register_custom_module(mapping)
