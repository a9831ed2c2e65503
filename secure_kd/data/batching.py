"""Deterministic, resumable batch orders."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np


def epoch_order(n_examples: int, epoch: int, seed: int) -> list[int]:
    """The shuffled order of `range(n_examples)` for one epoch.

    It depends only on `(seed, epoch)` (numpy `SeedSequence([seed, epoch])`), not on how many
    epochs ran before in this process, so a run resumed at epoch `e` sees the same order.
    """
    if n_examples < 0:
        raise ValueError(f"n_examples must be >= 0, got {n_examples}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch]).permutation(n_examples).tolist()


def batches_per_epoch(n_examples: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches one epoch yields."""
    _check_batch_size(batch_size)
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def locate_step(step: int, n_examples: int, batch_size: int, *, drop_last: bool = False) -> tuple[int, int]:
    """The `(epoch, batch)` at which global batch number `step` (0-based) falls, for resuming."""
    per_epoch = batches_per_epoch(n_examples, batch_size, drop_last=drop_last)
    if per_epoch == 0:
        raise ValueError(f"{n_examples} examples give no batch of {batch_size} (drop_last={drop_last})")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return divmod(step, per_epoch)


def batches(
    examples: Sized | int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    epoch: int = 0,
    start_batch: int = 0,
) -> Iterator[list[int]]:
    """Yield lists of example indices for one epoch.

    With `shuffle`, the order is `epoch_order(n, epoch, seed)`; otherwise `0..n-1`. The last,
    smaller batch is dropped when `drop_last`. `start_batch` skips the batches already done, so
    `batches(..., epoch=e, start_batch=b)` continues exactly where an interrupted run stopped
    (see `locate_step`).
    """
    _check_batch_size(batch_size)
    n = examples if isinstance(examples, int) else len(examples)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    order = epoch_order(n, epoch, seed) if shuffle else list(range(n))
    end = n - n % batch_size if drop_last else n
    for start in range(start_batch * batch_size, end, batch_size):
        yield order[start : start + batch_size]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
