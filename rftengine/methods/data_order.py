"""The deterministic data order and per-step seeds: pure functions of (seed, position or
step), so a resumed run draws the same batches and samples as an uninterrupted one."""

from __future__ import annotations

import math

import torch


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a pure function of (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def batch_indices(n: int, batch_size: int, position: int, seed: int, shuffle: bool = True) -> list[int]:
    """Indices of the batch that starts at global ``position`` (examples consumed so far).

    Epoch ``e`` covers positions ``[e*n, (e+1)*n)``; a batch that crosses the boundary takes the
    rest from the next epoch's order, so every batch is full and resuming at any position gives
    the same batches as an uninterrupted run.
    """
    if n <= 0:
        raise ValueError("data must hold at least one example, got 0")
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = epoch_permutation(n, seed, epoch, shuffle)
        take = min(batch_size - len(out), n - offset)
        out.extend(order[offset:offset + take])
        position += take
    return out


def total_steps(config, n_examples: int, per_step: int) -> int:
    """``config.max_steps`` if set, else enough steps for ``config.num_epochs`` passes."""
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.num_epochs * n_examples / per_step))


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A per-step seed (rollout sampling, minibatch shuffles) independent of global RNG."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)
