"""Schedules: plain functions ``epoch -> value``, as in optax.

Every schedule accepts a Python number or a JAX scalar. Given a Python number (or numpy
scalar) it returns a Python ``float``, so a pruning rate can feed the static counts of
``jaxprune.selection``; given a JAX array (possibly traced) it returns a float32 JAX scalar
and is jittable. Epochs are counted from 0; ``total_epochs`` is T.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import jax
import jax.numpy as jnp

from jaxprune import validate

Epoch = Union[int, float, jax.Array]
Schedule = Callable[[Epoch], Union[float, jax.Array]]

HARD_SHAPES = ("cubic", "linear", "exp")
# Steepness of the 'exp' hard-fraction ramp: h = (1 - e^{-a u}) / (1 - e^{-a}), u in [0, 1].
# With a = 5, h(0.5) = 0.92, a little ahead of the cubic ramp's 0.875.
EXP_RAMP_STEEPNESS = 5.0


def _is_traced(epoch: Epoch) -> bool:
    return isinstance(epoch, jax.Array)


def _check_epochs(total_epochs: int) -> int:
    return validate.positive_int(total_epochs, "total_epochs")


def _check_rate(rate: float) -> float:
    return validate.rate(rate, "pruning rate")


def constant_rate(rate: float) -> Schedule:
    """``P_t = P`` for every epoch (SFP, PFEC)."""
    rate = _check_rate(rate)

    def schedule(epoch: Epoch):
        if _is_traced(epoch):
            return jnp.full(jnp.shape(epoch), rate, jnp.float32)
        return rate

    return schedule


ASFP_SHAPES = ("exp", "cubic")
# The GHFP author's code divides by T + 1e-7 in its cubic rate (asfp_rate, shape='cubic')
CUBIC_EPS = 1e-7


def asfp_rate(rate: float, total_epochs: int, full_from: float | None = 0.95,
              shape: str = "exp") -> Schedule:
    """ASFP's growing rate ``P_t`` after ``t`` completed epochs.

    ``shape='exp'``: ``P (1 - exp(-k t))``, ``k = ln 4 / (T / 8)``, so ``P_0 = 0``,
    ``P_{T/8} = 0.75 P`` and ``P_t -> P`` (methods.md section 3).
    ``shape='cubic'``: ``P (1 - (1 - u)^3)`` with ``u = max(t, 1) / (T + 1e-7)``, the default of
    the GHFP first author's public code, which writes it ``P (1 - (1 - (e + 1) / (T + 1e-7))^3)``
    for the epoch ``e`` just finished (``e + 1 = t``) and uses the epoch-0 value for the selection
    before training (``t = 0``). The ``1e-7`` is the author's; it decides ``int(N P_t)`` where
    ``N P_t`` would otherwise be a whole number.

    As in the public ASFP / GHFP code (methods.md section 7), the full rate ``P`` is forced once
    the epoch just finished, ``e = t - 1``, reaches ``full_from * T`` (default 0.95; None: never),
    so the last selections prune ``int(N P)`` even where ``int(N P_t)`` would stay one short.
    Negative epochs are treated as 0.
    """
    rate = _check_rate(rate)
    total_epochs = _check_epochs(total_epochs)
    validate.one_of(shape, ASFP_SHAPES, "ASFP rate shape")
    k = math.log(4.0) / (total_epochs / 8.0)
    if full_from is not None:
        validate.fraction(full_from, "full_from (a fraction of training, or None)",
                          closed_low=False, closed_high=True)
    force_at = math.inf if full_from is None else float(full_from) * total_epochs + 1.0

    def grow(t, xp):
        if shape == "exp":
            return 1.0 - xp.exp(-k * t)
        u = xp.minimum(xp.maximum(t, 1.0), float(total_epochs)) / (total_epochs + CUBIC_EPS)
        return 1.0 - (1.0 - u) ** 3

    def schedule(epoch: Epoch):
        if _is_traced(epoch):
            t = jnp.maximum(jnp.asarray(epoch, jnp.float32), 0.0)
            return jnp.where(t >= force_at, jnp.float32(rate), rate * grow(t, jnp))
        t = max(float(epoch), 0.0)
        return rate if t >= force_at else rate * grow(t, _HostMath)

    return schedule


class _HostMath:
    """The few ``math`` functions `asfp_rate` needs, under numpy's names (host floats)."""

    exp = staticmethod(math.exp)
    minimum = staticmethod(min)
    maximum = staticmethod(max)


def ghfp_hard_fraction(
    total_epochs: int, end: float = 0.9, shape: str = "cubic"
) -> Schedule:
    """GHFP's share ``h_t`` of the pruned set that is hard after epoch ``t``.

    With ``u = clip((t + 1) / (end * T), 0, 1)``: ``'cubic'`` gives ``1 - (1 - u)^3``
    (methods.md section 4), ``'linear'`` gives ``u``, and ``'exp'`` gives the saturating
    exponential ``(1 - exp(-a u)) / (1 - exp(-a))`` with ``a = EXP_RAMP_STEEPNESS``. All three
    rise monotonically from ``h = 0`` at ``t = -1`` to exactly 1 from ``t + 1 = end * T`` on.
    """
    total_epochs = _check_epochs(total_epochs)
    validate.fraction(end, "end (a fraction of training)", closed_low=False, closed_high=True)
    validate.one_of(shape, HARD_SHAPES, "ramp shape")
    ramp_epochs = float(end) * total_epochs
    a = EXP_RAMP_STEEPNESS

    def schedule(epoch: Epoch):
        traced = _is_traced(epoch)
        xp = jnp if traced else math
        if traced:
            u = jnp.clip((jnp.asarray(epoch, jnp.float32) + 1.0) / ramp_epochs, 0.0, 1.0)
        else:
            u = min(1.0, max(0.0, (float(epoch) + 1.0) / ramp_epochs))
        if shape == "cubic":
            return 1.0 - (1.0 - u) ** 3
        if shape == "linear":
            return u
        h = (1.0 - xp.exp(-a * u)) / (1.0 - math.exp(-a))
        return jnp.minimum(h, 1.0) if traced else min(h, 1.0)  # float32 rounding at u = 1

    return schedule


def srfp_zero_epoch(total_epochs: int, zero_fraction: float) -> int:
    """SRFP's zero point: the first ``t`` with ``alpha_t = 0``, ``T - round(zero_fraction * T)``
    (halves rounded up), so exactly the last ``round(zero_fraction * T)`` epochs run with
    zeroed filters."""
    return total_epochs - math.floor(zero_fraction * total_epochs + 0.5)


def srfp_decay(
    alpha0: float, c: float | None, total_epochs: int, zero_fraction: float = 0.15
) -> Schedule:
    """SRFP's decay factor for soft-pruned filters: ``alpha_t = alpha0 exp(-c t)``.

    ``alpha_t = 0`` for the last ``n0 = round(zero_fraction * T)`` epochs (``t >= T - n0``,
    `srfp_zero_epoch`), so the final pruned filters are exactly zero (methods.md section 3).
    ``c=None`` picks ``c = 3 / t_zero`` (``t_zero`` that zero point), so ``alpha`` has fallen
    to ``alpha0 e^-3`` when it is switched to 0. The value is meant as the mask entry of the
    selected channels (``jaxprune.masks``).
    """
    total_epochs = _check_epochs(total_epochs)
    validate.fraction(alpha0, "alpha0", closed_high=True)
    if c is not None:
        validate.finite_float(c, "decay rate c", minimum=0.0)
    validate.fraction(zero_fraction, "zero_fraction")
    zero_from = srfp_zero_epoch(total_epochs, zero_fraction)
    alpha0, c = float(alpha0), float(3.0 / max(zero_from, 1) if c is None else c)

    def schedule(epoch: Epoch):
        if _is_traced(epoch):
            t = jnp.maximum(jnp.asarray(epoch, jnp.float32), 0.0)
            return jnp.where(t >= zero_from, 0.0, alpha0 * jnp.exp(-c * t))
        t = max(float(epoch), 0.0)
        return 0.0 if t >= zero_from else alpha0 * math.exp(-c * t)

    return schedule


def srfp_decay_author(
    alpha0: float, total_epochs: int, sigma: float = 1e-5, zero_from: float = 0.9
) -> Schedule:
    """The SRFP decay of the GHFP first author's public code (methods.md section 7).

    After ``t`` completed epochs (``e = max(t - 1, 0)`` the epoch just finished; the selection
    before training uses ``e = 0``): ``alpha = alpha0 exp(-c e)`` with
    ``c = ln((alpha0 + 0.01 sigma) / sigma) / T`` (so ``alpha`` would reach about ``sigma`` at
    ``e = T``), and ``alpha = 0`` once ``e >= zero_from * T``.
    """
    total_epochs = _check_epochs(total_epochs)
    validate.fraction(alpha0, "alpha0", closed_high=True)
    if validate.finite_float(sigma, "sigma", minimum=0.0) == 0.0:
        validate.refuse("sigma", sigma, "a finite number > 0")
    validate.fraction(zero_from, "zero_from (a fraction of training)", closed_low=False,
                      closed_high=True)
    alpha0, sigma = float(alpha0), float(sigma)
    c = math.log((alpha0 + 0.01 * sigma) / sigma) / total_epochs
    zero_at = float(zero_from) * total_epochs

    def schedule(epoch: Epoch):
        if _is_traced(epoch):
            e = jnp.maximum(jnp.asarray(epoch, jnp.float32) - 1.0, 0.0)
            return jnp.where(e >= zero_at, 0.0, alpha0 * jnp.exp(-c * e))
        e = max(float(epoch) - 1.0, 0.0)
        return 0.0 if e >= zero_at else alpha0 * math.exp(-c * e)

    return schedule
