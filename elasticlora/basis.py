"""The singular basis of a LoRA update `B A`, found in r x r factored form, and the cache that keeps it current.

A truncation to rank k keeps the top k singular directions of the layer's update: with (M, N) from `svd_basis`,
`B A = (B N)(M A)` and `(B N[:, :k])(M[:k] A)` is the best rank-k approximation of `B A`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


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
def svd_basis(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N), r x r in fp32, with `N M = I` and `B A = (B N)(M A)`, whose k leading components give the best rank-k
    approximation of `B A`.

    With `A A^T = L L^T` (Cholesky) the rows of `L^-1 A` are orthonormal, so the singular vectors of `B A` are those
    of `B L`: `(B L)^T (B L) = V diag(s^2) V^T`, and M = V^T L^-1, N = L V. O((in + out) r^2): two
    Gram matrices, one Cholesky factorisation and one r x r eigendecomposition, with no host synchronisation. A
    jitter of r * eps of the largest diagonal entry keeps the factorisation defined for a rank-deficient A (its null
    directions carry nothing of `B A`). Non-finite factors (a diverged run) give a finite basis, so the outputs are
    non-finite as plain LoRA's are.
    """
    with _one_cpu_thread(weight_a.device), torch.autocast(weight_a.device.type, enabled=False):
        a, b = weight_a.float(), weight_b.float()
        gram = torch.nan_to_num(a @ a.T, 0.0, 0.0, 0.0)
        r = gram.shape[0]
        gram.diagonal().add_(gram.diagonal().amax().clamp_min(1e-30) * (r * torch.finfo(torch.float32).eps))
        low = torch.linalg.cholesky_ex(gram)[0]
        bl = b @ low
        _, v = torch.linalg.eigh(torch.nan_to_num(bl.T @ bl, 0.0, 0.0, 0.0))
        v = v.flip(-1)  # by decreasing singular value
        return torch.linalg.solve_triangular(low.T, v, upper=True).T, low @ v


def _factor_key(weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
    """Changes whenever the optimizer changes either factor (an in-place update bumps the version counter)."""
    return (weight_a.data_ptr(), weight_a._version, weight_b.data_ptr(), weight_b._version, weight_a.device)


class BasisCache:
    """One layer's singular basis: the current one (eval, shrink, export) and the one training uses.

    Training recomputes the basis every `refresh_steps` optimizer steps and reuses it in between. A step is a change
    of the factors between training forwards, so the micro-batches of an accumulated step count once, and a forward
    that gradient checkpointing recomputes during backward (the factors have not changed since) reuses what its
    first run used. A stale basis still gives exact full-rank rows and a rank-k truncation, only not the best one.
    """

    def __init__(self, refresh_steps: int = 1):
        self.refresh_steps = refresh_steps
        self._current: tuple | None = None  # (key, M, N, {k: prefix factors})
        self._training: dict | None = None

    def current(self, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, N) of the factors as they are now, in fp32."""
        return self._entry(weight_a, weight_b)[1:3]

    def _entry(self, weight_a: torch.Tensor, weight_b: torch.Tensor) -> tuple:
        key = _factor_key(weight_a, weight_b)
        if self._current is None or self._current[0] != key:
            self._current = (key, *svd_basis(weight_a, weight_b), {})
        return self._current

    def prefix_factors(self, weight_a: torch.Tensor, weight_b: torch.Tensor, k: int) -> tuple:
        """fp32 `(M[:k] A, B N[:, :k])`, without gradient, cached until the factors change."""
        _, m, n, factors = self._entry(weight_a, weight_b)
        if k not in factors:
            with torch.no_grad(), torch.autocast(weight_a.device.type, enabled=False):
                factors[k] = (m[:k] @ weight_a.float(), weight_b.float() @ n[:, :k])
        return factors[k]

    def training(self, weight_a: torch.Tensor, weight_b: torch.Tensor, dtype: torch.dtype) -> tuple:
        """(M, N) in `dtype` for a training forward: recomputed every `refresh_steps` optimizer steps."""
        key = _factor_key(weight_a, weight_b)
        cached = self._training
        if cached is None or cached["key"] != key:
            if cached is None or cached["age"] + 1 >= self.refresh_steps:
                cached = {"basis": self.current(weight_a, weight_b), "age": 0}
            else:
                cached["age"] += 1
            cached["key"] = key
            self._training = cached
        if cached.get("dtype") != dtype:
            cached.update(dtype=dtype, cast=tuple(t.to(dtype) for t in cached["basis"]))
        return cached["cast"]
