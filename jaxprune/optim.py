"""The optimizer and learning-rate schedules of the papers' recipes.

- `make_optimizer`: PyTorch-style SGD (weight decay added to the gradient, then Nesterov
  momentum, then the learning rate), as in the papers' code.
- `sfp_cifar_schedule`, `step_schedule`, `constant_schedule`: ``step -> lr`` optax schedules.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
import optax


def _check_finite(name: str, value: object) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a finite real number >= 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if isinstance(value, bool) or not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def make_optimizer(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
    """PyTorch ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` as an optax chain.

    ``g <- g + weight_decay * p`` (on every parameter, BN scales and biases included, as the
    papers' code), then ``buf <- momentum * buf + g``, ``update = g + momentum * buf``
    (Nesterov) or ``buf``, then ``p <- p - lr * update``. The chain always has the same two
    members (``add_decayed_weights``, ``sgd``) so the optimizer state's structure, and hence
    the checkpoints, do not depend on the hyper-parameters.
    """
    if not callable(learning_rate):
        _check_finite("learning_rate", learning_rate)
    _check_finite("momentum", momentum)
    _check_finite("weight_decay", weight_decay)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum > 0 (as in PyTorch)")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None, nesterov=nesterov),
    )

def step_schedule(
    steps_per_epoch: int,
    base_lr: float = 0.1,
    boundaries: Sequence[float] = (30, 60, 90),
    factor: float = 0.1,
    warmup_epochs: float = 0,
    warmup_lr: float | None = None,
) -> optax.Schedule:
    """Piecewise-constant LR over epochs as an optax schedule of the step count.

    ``boundaries`` and ``warmup_epochs`` are in epochs and may be fractional (a shortened
    recipe keeps each phase's share of training); each becomes the step
    ``round(epochs * steps_per_epoch)``. ``warmup_lr`` before the warm-up step, else
    ``base_lr * factor ** (number of boundary steps <= step)``. The defaults are the ImageNet
    recipe (0.1, x0.1 at epochs 30, 60, 90). The values are computed once in float64 and
    rounded to float32, as PyTorch multiplies its Python-float LR.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    _check_finite("base_lr", base_lr)
    _check_finite("factor", factor)
    if warmup_lr is not None:
        _check_finite("warmup_lr", warmup_lr)
    bounds = [float(b) for b in boundaries]
    if bounds != sorted(bounds) or any(not (b >= 0) or not np.isfinite(b) for b in bounds):
        raise ValueError(f"boundaries must be sorted non-negative epochs, got {tuple(boundaries)}")
    if not (warmup_epochs >= 0 and np.isfinite(warmup_epochs)):
        raise ValueError(f"warmup_epochs must be a finite number >= 0, got {warmup_epochs}")
    if warmup_epochs and warmup_lr is None:
        raise ValueError("warmup_epochs > 0 needs warmup_lr")
    values = jnp.asarray([base_lr * factor**k for k in range(len(bounds) + 1)], jnp.float32)
    bound_steps = jnp.asarray([int(round(b * steps_per_epoch)) for b in bounds], jnp.int32)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_epochs and warmup_steps == 0:
        warmup_steps = 1  # a scaled-down warm-up still happens, for one step

    def schedule(count):
        step = jnp.asarray(count, jnp.int32)
        lr = values[jnp.sum(step >= bound_steps)] if bounds else values[0]
        if warmup_steps:
            lr = jnp.where(step < warmup_steps, jnp.float32(warmup_lr), lr)
        return lr

    return schedule

def sfp_cifar_schedule(
    steps_per_epoch: int,
    base_lr: float = 0.1,
    warmup_lr: float = 0.01,
    boundaries: Sequence[float] = (60, 120, 160),
    factor: float = 0.2,
    warmup_epochs: float = 1.0,
) -> optax.Schedule:
    """The official SFP CIFAR recipe (methods.md section 2): 0.01 for the first epoch, then 0.1,
    x0.2 at epochs 60, 120 and 160 (a shortened recipe scales ``warmup_epochs`` too)."""
    return step_schedule(steps_per_epoch, base_lr, boundaries, factor,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr)

def constant_schedule(learning_rate: float) -> optax.Schedule:
    """A constant LR (PFEC retraining: 0.001), as a float32 scalar like the other schedules."""
    _check_finite("learning_rate", learning_rate)
    value = np.float32(learning_rate)

    def schedule(count):
        del count
        return jnp.asarray(value)

    return schedule


__all__ = [
    "make_optimizer",
    "step_schedule",
    "sfp_cifar_schedule",
    "constant_schedule",
]
