"""Batch orders: pure functions of ``(seed, epoch)``, so a run resumed mid-training sees the same
order (`epoch_batches`, drop-last), and evaluation batches that cover every example exactly
once with a weight mask for the padded tail (`eval_batches`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["num_batches", "epoch_batches", "eval_batches"]


def num_batches(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches :func:`epoch_batches` / :func:`eval_batches` produce."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def epoch_batches(
    num_examples: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True
) -> np.ndarray | list[np.ndarray]:
    """Shuffled index batches of one epoch, a pure function of ``(seed, epoch)``.

    The order is the permutation drawn by ``np.random.default_rng((seed, epoch))``, so resuming
    at any epoch/step reproduces the original order.  With ``drop_last=True`` (the default) the
    result is an ``int64 [num_batches, batch_size]`` array and the incomplete tail is dropped;
    with ``drop_last=False`` it is a list of 1-D arrays whose last one may be shorter.
    """
    if num_examples < 0 or seed < 0 or epoch < 0:
        raise ValueError("num_examples, seed and epoch must be non-negative")
    nb = num_batches(num_examples, batch_size, drop_last)
    perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
    if drop_last:
        return perm[: nb * batch_size].reshape(nb, batch_size)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(nb)]


def eval_batches(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequential batches covering every example exactly once, for exact evaluation.

    Returns ``(indices int64 [nb, batch_size], weights float32 [nb, batch_size])``.  The last
    batch is padded with index 0 and weight 0, so ``sum(weights * correct)`` counts each example
    once and every batch has the same shape (one compiled eval step).
    """
    nb = num_batches(num_examples, batch_size, drop_last=False)
    idx = np.zeros(nb * batch_size, np.int64)
    idx[:num_examples] = np.arange(num_examples)
    w = np.zeros(nb * batch_size, np.float32)
    w[:num_examples] = 1.0
    return idx.reshape(nb, batch_size), w.reshape(nb, batch_size)
