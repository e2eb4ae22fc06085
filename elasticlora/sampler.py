"""The truncation ranks of one training forward pass, drawn once for every elastic layer of a model.

One `RankSampler` serves every layer of an elastic adapter in one model (it lives on the adapter's
`ElasticRuntime`, `runtime.py`, which also starts the passes). When a pass starts, the sampler forgets the last
draws; the first elastic layer that runs in training mode then makes them for the whole pass, on the host, as a
(draws, layers) table of ranks. Each layer call gets a `Truncation` from its column: which rows are truncated and
their ranks, as index and mask tensors copied to the device once per distinct column of the pass (with shared
draws, once per pass), so a layer computes the truncation on the truncated rows alone, with no host
synchronisation. So:

- each example runs at one rank in every layer (with probability `shared_draw_prob`; otherwise each layer draws its
  own), and a module called twice in one pass uses the same ranks both times;
- consecutive draws are spread evenly over the rank distribution (a low-discrepancy sequence, see `_draw`), so every
  pass and micro-batch holds each rank in close to its share;
- the draws are a pure function of (torch's initial seed, the process rank, the draws so far): runs are
  reproducible, and data-parallel processes draw independently. `state_dict` / `load_state_dict` carry the draws so
  far across a checkpoint, so a resumed run continues the sequence.

A layer whose input rows are not the pass's examples (e.g. the experts of a mixture-of-experts layer, which see
routed tokens) runs the whole call at the pass's first rank.
"""

from __future__ import annotations

import math

import torch

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

    @property
    def current_pass(self) -> _Pass | None:
        """The draws of the pass under way (None: the next training layer call draws for a new pass)."""
        return self._pass

    def new_pass(self, current: _Pass | None = None) -> None:
        """Forget the current draws (the next training layer call draws for a new pass), or go back to `current`'s."""
        self._pass = current

    def state_dict(self) -> dict[str, int]:
        """Where the run is in the draw sequence: what a checkpoint keeps to continue it."""
        return {"passes": self.passes, "draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("passes", "draws"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"rank sampler state: `{key}` must be a non-negative int, got {value!r}")
        self.passes, self.draws = state["passes"], state["draws"]

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
            n_draws = h.shape[0] if self.per_example and h.dim() > 1 else 1
            index = self.passes
            self._pass = self._last = _Pass(self._draw(n_draws), self._ranks, index)
        return self._pass.truncation(column, h)

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
    """One forward pass's draws: its number, the host table, which layers run at full rank throughout, and the
    truncations made from the table for each distinct (ranks, device, dtype, shape of the activations), shared by the
    columns (layers) that drew the same ranks."""

    def __init__(self, table: torch.Tensor, max_ranks: list[int], index: int):
        self.table = table
        self.index = index  # the pass's number in the run
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
