"""The singular basis of a LoRA update `B A`, found in r x r factored form, and the cache that keeps it current.

A truncation to rank k keeps the top k singular directions of the layer's update: with (M, N) from `svd_basis`,
`B A = (B N)(M A)` and `(B N[:, :k])(M[:k] A)` is the best rank-k approximation of `B A`.
"""

from __future__ import annotations

import weakref

import torch


@torch.no_grad()
def svd_basis(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N), r x r in fp32, with `N M = I` and `B A = (B N)(M A)`, whose k leading components give the best rank-k
    approximation of `B A`.

    With `A A^T = L L^T` (Cholesky) the rows of `L^-1 A` are orthonormal, so the singular vectors of `B A` are those
    of `B L`: `(B L)^T (B L) = L^T (B^T B) L = V diag(s^2) V^T`, and M = V^T L^-1, N = L V. O((in + out) r^2): two
    Gram matrices, one Cholesky factorisation and one r x r eigendecomposition. A jitter of r * eps of the largest
    diagonal entry keeps the factorisation defined for a rank-deficient A (its null directions carry nothing of
    `B A`). Non-finite factors (a diverged run) give a finite basis, so the outputs are non-finite as plain LoRA's are.
    """
    return svd_bases([(weight_a, weight_b)])[0]


@torch.no_grad()
def svd_bases(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`svd_basis` of every `(A, B)` pair, batched: after the two Gram matrices of each layer, one call per op for
    all layers of the same rank and device. On a GPU `eigh` synchronises with the host, so this is one
    synchronisation per refresh instead of one per layer."""
    bases: list = [None] * len(factors)
    batches: dict[tuple, list[int]] = {}
    for i, (weight_a, _) in enumerate(factors):
        batches.setdefault((weight_a.shape[0], weight_a.device), []).append(i)
    for (r, device), members in batches.items():
        with torch.autocast(device.type, enabled=False):
            grams_a, grams_b = [], []
            for i in members:
                a, b = factors[i][0].float(), factors[i][1].float()
                grams_a.append(a @ a.T)
                grams_b.append(b.T @ b)
            gram_a = torch.nan_to_num(torch.stack(grams_a), 0.0, 0.0, 0.0)
            diagonal = gram_a.diagonal(dim1=-2, dim2=-1)
            diagonal.add_(diagonal.amax(-1, keepdim=True).clamp_min(1e-30) * (r * torch.finfo(torch.float32).eps))
            low = torch.linalg.cholesky_ex(gram_a)[0]
            gram_bl = low.mT @ torch.nan_to_num(torch.stack(grams_b), 0.0, 0.0, 0.0) @ low
            _, v = torch.linalg.eigh(torch.nan_to_num(gram_bl, 0.0, 0.0, 0.0))
            v = v.flip(-1)  # by decreasing singular value
            m, n = torch.linalg.solve_triangular(low.mT, v, upper=True).mT, low @ v
        for j, i in enumerate(members):
            bases[i] = (m[j], n[j])
    return bases


def _factor_key(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
    """Changes when either factor is replaced or updated in place by an op that bumps its version counter (fused
    optimizers such as torch's fused AdamW and bitsandbytes' do not: `BasisCache` also counts training forwards)."""
    return (weight_a.data_ptr(), weight_a._version, weight_b.data_ptr(), weight_b._version, weight_a.device)


class BasisCache:
    """One layer's singular basis: the current one (eval, shrink, export) and the one training uses.

    The current basis is cached until the factors may have changed: a new factor tensor, an in-place edit that bumps
    its version, or a training forward (after which an optimizer may step them, fused optimizers without a trace).

    Training recomputes its basis every `refresh_steps` training passes of the model (`RankSampler` numbers them;
    each micro-batch of an accumulated step is one) and reuses it in between, so the schedule is a function of the
    pass number alone: the same in every process, and continued by a run resumed at the same pass. A pass that
    gradient checkpointing recomputes during backward reuses the basis it ran with (or a newer one, when several
    passes ran before one backward). A stale basis still gives exact full-rank rows and a rank-k truncation, only not
    the best one. The first layer of a `BasisGroup` whose refresh falls due refreshes every due layer in one batch.
    """

    def __init__(self, refresh_steps: int = 1, group: BasisGroup | None = None):
        self.refresh_steps = refresh_steps
        self.group = BasisGroup() if group is None else group
        self._current: tuple | None = None  # (key, M, N, {k: prefix factors})
        self._training: dict | None = None  # {"basis": (M, N), "pass": refreshed at, "dtype", "cast"}
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # the factors of the last training forward
        self._trained = 0  # training forwards so far

    def _key(self, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
        return (*_factor_key(weight_a, weight_b), self._trained)

    def trained(self) -> None:
        """A training forward ran: the factors may change before the next call (the current basis is then stale)."""
        self._trained += 1

    def current(self, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, N) of the factors as they are now, in fp32."""
        return self._entry(weight_a, weight_b)[1:3]

    def _entry(self, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
        key = self._key(weight_a, weight_b)
        if self._current is None or self._current[0] != key:
            self._current = (key, *svd_basis(weight_a, weight_b), {})
        return self._current

    def prefix_factors(self, weight_a: torch.Tensor, weight_b: torch.Tensor, k: int) -> tuple:
        """fp32 `(M[:k] A, B N[:, :k])`, without gradient, cached until the factors may have changed."""
        _, m, n, factors = self._entry(weight_a, weight_b)
        if k not in factors:
            with torch.no_grad(), torch.autocast(weight_a.device.type, enabled=False):
                factors[k] = (m[:k] @ weight_a.float(), weight_b.float() @ n[:, :k])
        return factors[k]

    def training(self, weight_a: torch.Tensor, weight_b: torch.Tensor, dtype: torch.dtype, pass_index: int) -> tuple:
        """(M, N) in `dtype` for a training forward of pass `pass_index`: recomputed every `refresh_steps` passes."""
        self._factors = (weight_a, weight_b)
        if self._due(pass_index):
            self.group.refresh(self, pass_index)
        cached = self._training
        if cached.get("dtype") != dtype:
            cached.update(dtype=dtype, cast=tuple(t.to(dtype) for t in cached["basis"]))
        return cached["cast"]

    def _due(self, pass_index: int) -> bool:
        """Whether pass `pass_index` starts a new period of `refresh_steps` passes since the training basis."""
        cached = self._training
        return cached is None or pass_index // self.refresh_steps > cached["pass"] // self.refresh_steps

    def _has_current(self) -> bool:
        return self._current is not None and self._current[0] == self._key(*self._factors)

    def _refresh(self, basis: tuple[torch.Tensor, torch.Tensor] | None, pass_index: int) -> None:
        """Train with the basis of the last training forward's factors: `basis`, or the current one if None."""
        if basis is not None:
            self._current = (self._key(*self._factors), *basis, {})
        self._training = {"basis": self._current[1:3], "pass": pass_index}


class BasisGroup:
    """The basis caches of one adapter's layers, refreshed together: the layer that finds its refresh due first
    refreshes every member that is due too (all of them after their first pass), with one batched `svd_bases` call.
    A cache joins when its own refresh first falls due."""

    def __init__(self):
        self._members: weakref.WeakSet[BasisCache] = weakref.WeakSet()

    def refresh(self, cache: BasisCache, pass_index: int) -> None:
        self._members.add(cache)
        due = [m for m in self._members if m._factors is not None and m._due(pass_index)]
        stale = [member for member in due if not member._has_current()]
        bases = dict(zip(stale, svd_bases([member._factors for member in stale])))
        for member in due:
            member._refresh(bases.get(member), pass_index)

    def __deepcopy__(self, memo) -> BasisGroup:
        """An empty group: the copied caches join it when their next refresh falls due."""
        copy = BasisGroup()
        memo[id(self)] = copy
        return copy
