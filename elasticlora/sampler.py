"""The truncation ranks of one training forward pass, drawn once for every elastic layer of a model.

One `RankSampler` serves every layer of an elastic adapter (it lives on the adapter's `ElasticLoraConfig`). When the
model's outermost module starts a forward pass, the sampler forgets the last draws; the first elastic layer that
runs in training mode then makes them for the whole pass, on the host, as a (draws, layers) table of ranks. Each
layer call gets a `Truncation` from its column: which rows are truncated and their ranks, as index and mask tensors
copied to the device once per distinct column of the pass (with shared draws, once per pass), so a layer computes
the truncation on the truncated rows alone, with no host synchronisation. So:

- each example runs at one rank in every layer (with probability `shared_draw_prob`; otherwise each layer draws its
  own), and a module called twice in one pass uses the same ranks both times;
- gradient checkpointing, which re-runs blocks during the backward pass but not the outermost module, finds the
  table of the pass it recomputes. When several passes run before one backward, a hook on each pass's outputs puts
  that pass's table back as soon as the backward pass reaches them, before any of its blocks are recomputed;
- consecutive draws are spread evenly over the rank distribution (a low-discrepancy sequence, see `_draw`), so every
  pass and micro-batch holds each rank in close to its share;
- the draws are a pure function of (torch's initial seed, the process rank, the draws so far): runs are
  reproducible, and data-parallel processes draw independently.

Which module is outermost is read from the Python call stack: when a layer is built, the outermost module whose
method is running (`get_peft_model` builds the layers inside `PeftModel.__init__`, so that is the `PeftModel` it
returns); if that module is gone by the first training draw (PEFT's `inject_adapter_in_model` drops its wrapper),
the outermost module whose `forward` is running then. `get_elastic_model` and `load_elastic` hook the model they
return explicitly. A training loop that calls an inner module directly, bypassing the hooked one, never starts a
new pass: hook that module with `elasticlora.attach_sampler(module)`. A layer whose input rows are not the pass's
examples (e.g. the experts of a mixture-of-experts layer, which see routed tokens) runs the whole call at the pass's
first rank.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn as nn

_MASK64 = (1 << 64) - 1
_INV_GOLDEN = (math.sqrt(5) - 1) / 2


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 31)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def rank_support(r: int, rank_sampler: str, min_rank: int) -> list[int]:
    """The truncation ranks drawn for a layer of rank `r`, ascending (the last is `r`)."""
    low = min(min_rank, r)
    if rank_sampler == "none":
        return [r]
    if rank_sampler == "uniform":
        return list(range(low, r + 1))
    return sorted({2**i for i in range(int(math.log2(r)) + 1) if low <= 2**i <= r} | {r})


def _outermost_module(method: str | None = None) -> nn.Module | None:
    """The module whose method (`method` only, if given) is outermost on the Python call stack."""
    outermost = None
    frame = inspect.currentframe()
    while frame is not None:
        module = frame.f_locals.get("self") if method in (None, frame.f_code.co_name) else None
        if isinstance(module, nn.Module):
            outermost = module
        frame = frame.f_back
    return outermost


def _tensors(output) -> Iterator[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):  # transformers' ModelOutput too
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


class RankSampler:
    """Draws each training forward pass's truncation ranks for every layer registered with it."""

    def __init__(self, rank_sampler: str, min_rank: int, full_rank_prob: float, shared_prob: float, per_example: bool):
        self.rank_sampler = rank_sampler
        self.min_rank = min_rank
        self.full_rank_prob = full_rank_prob
        self.shared_prob = shared_prob
        self.per_example = per_example
        self.passes = 0  # forward passes whose draws were made
        self.draws = 0  # draws made (rows of every pass's table)
        self._ranks: list[int] = []  # the maximum rank of each registered layer
        self._pass: _Pass | None = None  # the current pass's draws
        self._last: _Pass | None = None  # the last pass drawn
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the modules whose forward starts a pass

    @classmethod
    def from_config(cls, config) -> RankSampler:
        return cls(
            config.rank_sampler,
            config.min_rank,
            config.full_rank_prob,
            config.shared_draw_prob,
            config.draw_per == "example",
        )

    def register(self, r: int) -> int:
        """A layer of maximum rank `r` joins; returns its column in every pass's table."""
        self._ranks.append(r)
        root = _outermost_module()
        if root is not None:
            self.attach(root)
        return len(self._ranks) - 1

    def samples(self, r: int) -> bool:
        """Whether a layer of rank `r` ever trains below full rank."""
        return len(rank_support(r, self.rank_sampler, self.min_rank)) > 1

    def probabilities(self, r: int) -> dict[int, float]:
        """The probability of each rank a draw gives a layer of rank `r`."""
        support = rank_support(r, self.rank_sampler, self.min_rank)
        probs = dict.fromkeys(support, (1.0 - self.full_rank_prob) / len(support))
        probs[r] += self.full_rank_prob
        return probs

    def attach(self, root: nn.Module) -> None:
        """Start a new pass whenever `root` starts a forward pass."""
        if root in self._roots:
            return
        self._roots.add(root)
        root.register_forward_pre_hook(self._begin)
        root.register_forward_hook(self._end)

    def new_pass(self) -> None:
        """Forget the current draws: the next training layer call draws for a new pass."""
        self._pass = None

    def _begin(self, module: nn.Module, args) -> None:
        self.new_pass()

    def _end(self, module: nn.Module, args, output) -> None:
        current = self._pass
        if current is None or not torch.is_grad_enabled():
            return
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, current=current: self._restore(current))

    def _restore(self, current: _Pass) -> None:
        self._pass = current

    def _draw(self, n_draws: int) -> torch.Tensor:
        """(n_draws, layers) ranks: rank r with probability `full_rank_prob`, else from the sampler's support.

        The shared quantile of the t-th draw of the run is `frac(u0 + t / golden ratio)` (a Weyl sequence with a
        random start `u0`), not an independent uniform: any run of consecutive draws, a pass, a micro-batch or a
        window of steps, then holds each rank in close to its share (at the defaults, 16 draws hold 8 to 10 full
        ranks, standard deviation 0.5, where independent draws give 2.0), so the training signal per rank varies
        less from step to step. Per-layer draws (`shared_draw_prob < 1`) stay independent."""
        base = _splitmix64(torch.initial_seed() ^ _process_rank())
        n_layers = len(self._ranks)
        t = torch.arange(self.draws, self.draws + n_draws, dtype=torch.float64)
        u = ((base / 2.0**64 + t * _INV_GOLDEN) % 1.0)[:, None].expand(n_draws, n_layers)
        if self.shared_prob < 1.0:  # the independent part: one generator per pass
            generator = torch.Generator().manual_seed(_splitmix64(base ^ self.passes) & ((1 << 63) - 1))
            own = torch.rand(n_draws, n_layers, generator=generator, dtype=torch.float64)
            shared = torch.rand(n_draws, 1, generator=generator, dtype=torch.float64) < self.shared_prob  # per example
            u = torch.where(shared, u, own)
        self.passes += 1
        self.draws += n_draws
        table = torch.empty(n_draws, n_layers, dtype=torch.int64)
        ranks = torch.tensor(self._ranks)  # (layers,)
        for r in set(self._ranks):  # one inverse CDF per distinct maximum rank
            probs = self.probabilities(r)
            cdf = torch.tensor(list(probs.values()), dtype=torch.float64).cumsum(0)
            columns = (ranks == r).nonzero().squeeze(1)
            index = torch.searchsorted(cdf, u[:, columns].contiguous(), right=True).clamp_(max=len(probs) - 1)
            table[:, columns] = torch.tensor(list(probs))[index]
        return table

    def truncation(self, column: int, h: torch.Tensor) -> Truncation | None:
        """Which rows of one layer's rank activations `h` (B, ..., r) the current pass truncates, and to which rank;
        None when the layer runs at full rank for every row. When the rows of `h` are not the pass's examples, the
        whole call runs at the pass's first rank."""
        if self._pass is None:
            if not self._roots:  # the module hooked when the layers were built is gone
                root = _outermost_module("forward")
                if root is not None:
                    self.attach(root)
            n_draws = h.shape[0] if self.per_example and h.dim() > 1 else 1
            self._pass = self._last = _Pass(self._draw(n_draws), self._ranks)
        return self._pass.truncation(column, h)

    def __deepcopy__(self, memo) -> RankSampler:
        """A copy with the same settings and layers, hooked to no module yet (a copied model's hooks call it)."""
        copy = RankSampler(self.rank_sampler, self.min_rank, self.full_rank_prob, self.shared_prob, self.per_example)
        copy._ranks, copy.passes, copy.draws = list(self._ranks), self.passes, self.draws
        memo[id(self)] = copy
        return copy

    def last_ranks(self, column: int) -> torch.Tensor | None:
        """The ranks of one layer in the last pass drawn, on the host; None before the first draw."""
        return None if self._last is None else self._last.table[:, column].clone()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, without waiting for the work queued there: a copy from pageable host memory to a
    GPU waits until the stream is idle, one from pinned memory does not (PyTorch's caching host allocator keeps the
    pinned source until the copy is done)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class Truncation:
    """The truncated rows of one layer call: `rows` (indices on the device; None: every row) keep their first `k`
    singular components, times `keep` (n_rows, 1, ..., k) where their ranks differ (None: all at rank `k`)."""

    def __init__(self, ranks: torch.Tensor, r: int, h: torch.Tensor):
        truncated = (ranks < r).nonzero().squeeze(1)
        kept = ranks[truncated]
        self.k = int(kept.max())
        self.rows = None if len(truncated) == len(ranks) else _to_device(truncated, h.device)
        self.keep = None
        if (kept != self.k).any():
            keep = (torch.arange(self.k) < kept[:, None]).to(h.dtype)  # (n_rows, k)
            self.keep = _to_device(keep.view(len(kept), *(1,) * (h.dim() - 2), self.k), h.device)


class _Pass:
    """One forward pass's draws: the host table, which layers run at full rank throughout, and the truncations made
    from the table for each distinct (ranks, device, dtype, shape of the activations), shared by the columns (layers)
    that drew the same ranks."""

    def __init__(self, table: torch.Tensor, max_ranks: list[int]):
        self.table = table
        self.max_ranks = max_ranks
        self.full = (table == torch.tensor(max_ranks)).all(0).tolist()
        self.truncations: dict[tuple, Truncation] = {}
        self.calls: dict[tuple, Truncation | None] = {}  # by (column, activations): no host work on a repeat

    def truncation(self, column: int, h: torch.Tensor) -> Truncation | None:
        if self.full[column]:
            return None
        call = (column, h.device, h.dtype, h.dim(), h.shape[0])
        if call not in self.calls:
            self.calls[call] = self._truncation(column, h)
        return self.calls[call]

    def _truncation(self, column: int, h: torch.Tensor) -> Truncation | None:
        r, ranks = self.max_ranks[column], self.table[:, column]
        if h.dim() < 2 or len(ranks) != h.shape[0]:  # rows that are not the pass's examples: its first rank
            ranks = ranks[:1]
            if ranks[0] == r:
                return None
        key = (tuple(ranks.tolist()), r, h.device, h.dtype, h.dim())
        if key not in self.truncations:
            self.truncations[key] = Truncation(ranks, r, h)
        return self.truncations[key]
