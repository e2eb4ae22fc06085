"""What each module's rank costs: one forward+backward pass gives every module a cost curve over ranks 0..r, and an
allocation turns the curves into one path of configurations from full rank to empty (steps 1 and 2 of `shrink`).

For module m with rank activations in its singular basis `z = M A x` and `u = dL/dz`, truncating to k changes the
loss, to first order per token, by `v_k = -sum_{i >= k} u_i z_i`; all r + 1 candidates come from one cumulative sum.
The cost curve `c_m(k) = sum over tokens of v_k ** 2` is a Fisher-style estimate of the loss increase (up to one
factor shared by all modules, which `shrink`'s measured bisection absorbs). Minimising
`sum_m c_m(k_m) + lam * params_m(k_m)` splits per module; its solutions, as lam grows, walk the lower convex hulls of
the cost curves, and sorting every hull step by its price (cost increase per parameter saved) gives the path.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from tqdm.auto import tqdm

from .evaluate import batch_loss_sum, model_device
from .loading import release_host_memory
from .ranks import active_adapter_name, lora_layers, singular_basis, truncated


@contextlib.contextmanager
def _checkpointed(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each transformer block's activations in the backward pass (non-reentrant checkpointing).

    transformers checkpoints a block only when the block itself is in training mode; only the blocks' own flags are
    set, so every layer inside (dropout, elastic draws) stays in eval mode.
    """
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError("gradient checkpointing needs a transformers model with checkpointable blocks; this has none")
    saved = [(m.training, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func")) for m in blocks]
    for m in blocks:
        m.training, m.gradient_checkpointing = True, True
        m._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    try:
        yield
    finally:
        for m, (training, checkpointing, func) in zip(blocks, saved):
            m.training, m.gradient_checkpointing = training, checkpointing
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


@dataclass
class Sensitivity:
    """What the sensitivity pass measured: the cost curves, and the full-rank loss its forward passes computed."""

    costs: dict[str, torch.Tensor]  # c_m(k), k = 0..r_m
    loss: float  # mean loss per scored token at full rank
    tokens: int  # scored tokens


def sensitivity(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    adapter_name: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
) -> Sensitivity:
    """Estimated loss increase `c_m(k)` for truncating each module alone to k = 0..r_m (one forward+backward pass).

    Works on elastic layers and on a plain PEFT LoRA model's layers (in their singular basis, computed here).
    Memory stays below one training step's at the eval batch size: every parameter is frozen and the graph starts at
    the input embeddings, so the backward pass computes activation gradients only (no weight gradient, and no
    module input kept for one).
    """
    layers = lora_layers(model, adapter_name)
    adapter = active_adapter_name(model, adapter_name)
    costs = {name: torch.zeros(layer.r[adapter] + 1, dtype=torch.float64) for name, layer in layers.items()}
    handles = []

    def attach(name: str, layer: nn.Module) -> None:
        r = layer.r[adapter]
        # components in the singular basis: z = M h, and dL/dz = N^T dL/dh
        basis = [t.double() for t in singular_basis(layer, adapter)]

        def on_forward(module, inputs, h):
            def on_grad(u):
                z, u = h.detach().double() @ basis[0].T, u.double() @ basis[1]
                p = (u * z).reshape(-1, r)  # (N, r): per-token u_i z_i
                prefix = torch.nn.functional.pad(p.cumsum(1), (1, 0))  # (N, r + 1): sum_{i<k} u_i z_i
                v = prefix - prefix[:, -1:]  # (N, r + 1): first-order loss change of truncating to k
                costs[name] += v.square().sum(0).cpu()

            if h.requires_grad:
                h.register_hook(on_grad)

        handles.append(layer.lora_A[adapter].register_forward_hook(on_forward))

    for name, layer in layers.items():
        attach(name, layer)
    # with every parameter frozen, gradients start at the input embeddings: the backward pass computes activation
    # gradients only, and no module input is kept for a weight gradient
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True)))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = model_device(model)
    total, tokens = 0.0, 0
    model.eval()
    try:
        with truncated(model, None, adapter), _checkpointed(model, gradient_checkpointing):
            for p in params:
                p.requires_grad_(False)
            for batch in tqdm(batches, desc="sensitivity", disable=not progress, leave=False):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, count = batch_loss_sum(model, batch, device)
                loss.backward()
                total, tokens = total + loss.item(), tokens + count
                if device.type == "cpu":
                    release_host_memory()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if tokens == 0:
        raise ValueError("the eval batches hold no tokens to score")
    return Sensitivity(costs, total / tokens, tokens)


def _lower_hull(costs: torch.Tensor) -> list[int]:
    """Ranks on the lower convex hull of the points (k, costs[k]), ascending in k (always includes 0 and r)."""
    hull: list[int] = []
    for k in range(len(costs)):
        while len(hull) >= 2:
            k0, k1 = hull[-2], hull[-1]
            # drop k1 if it lies on or above the segment k0 -> k
            if (costs[k1] - costs[k0]) * (k - k0) >= (costs[k] - costs[k0]) * (k1 - k0):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocation_path(costs: dict[str, torch.Tensor], widths: dict[str, int]) -> list[dict[str, int]]:
    """Configurations from full rank to all-zero, parameters falling, ordered by marginal cost per parameter.

    `widths[m]` is the parameter cost of one rank of module m (in_features + out_features).
    """
    steps = []
    start = {}
    for name, c in costs.items():
        c = c.double()
        # the full rank is the reference: never let a truncation estimate look better than it
        c = torch.maximum(c, torch.zeros_like(c))
        c[-1] = 0.0
        hull = _lower_hull(c)
        start[name] = hull[-1]
        for lo, hi in zip(hull[:-1], hull[1:]):
            price = float(c[lo] - c[hi]) / (widths[name] * (hi - lo))
            steps.append((price, name, lo))
    # a module's own hull steps come in increasing price, so sorting keeps each module's ranks decreasing
    steps.sort(key=lambda step: step[0])
    path = [dict(start)]
    current = dict(start)
    for _, name, rank in steps:
        current[name] = rank
        path.append(dict(current))
    return path
