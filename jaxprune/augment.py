"""On-device preprocessing of uint8 image batches: per-channel normalisation and the CIFAR
augmentation (random horizontal flip + 4-pixel zero pad + random crop, optionally Cutout), all
jitted.

Padding is applied to the ``[0, 1]`` image *before* normalisation, so a padded pixel is
``-mean / std`` exactly as in the PyTorch pipeline (``ToTensor -> RandomCrop(padding=4) ->
Normalize``). ``mean``/``std`` are per-channel constants in 0..1 units (`jaxprune.data`'s
``CIFAR10_MEAN`` and friends, or a data set's own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["normalize", "augment_params", "augment_batch", "cutout_centres", "cutout"]


def _stats(mean, std, dtype=jnp.float32):
    return jnp.asarray(mean, dtype), jnp.asarray(std, dtype)


@jax.jit
def normalize(images: jax.Array, mean, std) -> jax.Array:
    """``(images / 255 - mean) / std`` in float32, per channel (last axis). Eval preprocessing."""
    m, s = _stats(mean, std)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - m) / s


@functools.partial(jax.jit, static_argnames=("batch_size", "pad", "flip"))
def augment_params(rng: jax.Array, batch_size: int, pad: int = 4, flip: bool = True):
    """The random draws :func:`augment_batch` uses for ``rng``.

    Returns ``(offsets int32 [B, 2], flips bool [B])``: the (row, col) corner of each crop in the
    padded image (uniform in ``0..2*pad``) and whether each example is mirrored.  The crop is
    taken first and then mirrored (the same distribution as flip-then-crop, offsets being
    symmetric).  The crop key and the flip key are split from ``rng`` the same way whatever
    ``pad``/``flip`` are.
    """
    k_crop, k_flip = jax.random.split(rng)
    if pad > 0:
        offsets = jax.random.randint(k_crop, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    else:
        offsets = jnp.zeros((batch_size, 2), jnp.int32)
    if flip:
        flips = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), bool)
    return offsets, flips


def cutout_centres(rng: jax.Array, batch_size: int, height: int, width: int) -> jax.Array:
    """``int32 [B, 2]``: the (row, col) centre of each Cutout square, uniform over the image.

    Drawn from ``fold_in(rng, 2)``, a key :func:`augment_params` never uses, so switching Cutout
    on leaves the crop and flip draws of the same ``rng`` unchanged.
    """
    key = jax.random.fold_in(rng, 2)
    rows = jax.random.randint(key, (batch_size,), 0, height, dtype=jnp.int32)
    cols = jax.random.randint(jax.random.fold_in(key, 1), (batch_size,), 0, width, dtype=jnp.int32)
    return jnp.stack([rows, cols], axis=1)


def cutout(x: jax.Array, centres: jax.Array, length: int) -> jax.Array:
    """Cutout (DeVries & Taylor 2017, as its reference code): zeroes, in every channel, the
    pixels of rows ``[y - length // 2, y + length // 2)`` and columns ``[x - length // 2,
    x + length // 2)`` around each centre ``(y, x)``, clipped to the image. ``x`` is
    ``[B, H, W, C]``, already normalised (the zeros are zeros of the normalised input).
    """
    _, h, w, _ = x.shape
    half = length // 2
    rows = jnp.arange(h, dtype=jnp.int32)[None, :]
    cols = jnp.arange(w, dtype=jnp.int32)[None, :]
    y, xc = centres[:, 0:1], centres[:, 1:2]
    in_rows = (rows >= y - half) & (rows < y + half)  # [B, H]
    in_cols = (cols >= xc - half) & (cols < xc + half)  # [B, W]
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return jnp.where(hole[..., None], jnp.zeros((), x.dtype), x)


@functools.partial(jax.jit, static_argnames=("pad", "flip", "cutout_length"))
def augment_batch(rng: jax.Array, images, mean, std, pad: int = 4, flip: bool = True,
                  cutout_length: int = 0) -> jax.Array:
    """CIFAR training augmentation on device: zero pad + random crop + random flip + normalise.

    ``images`` is ``uint8 [B, H, W, C]``.  Each image is scaled to ``[0, 1]``, padded with ``pad``
    zeros on every side, cropped back to ``H x W`` at a random offset, mirrored left-right with
    probability 1/2 (``flip=True``) and normalised with ``mean``/``std`` (0..1 units) -- so padded
    pixels come out as ``-mean / std``, as in the PyTorch recipe.  ``cutout_length > 0`` then
    applies :func:`cutout` with that side at :func:`cutout_centres` (after normalisation, as the
    PyTorch ``Cutout`` transform placed after ``Normalize``).  Pure and jittable; the crop and flip
    draws are those of :func:`augment_params`.  Returns ``float32 [B, H, W, C]``.
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    b, h, w, c = x.shape
    offsets, flips = augment_params(rng, b, pad, flip)
    if pad > 0:
        xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
        x = jax.vmap(crop)(xp, offsets)
    if flip:
        x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
    m, s = _stats(mean, std)
    x = (x - m) / s
    if cutout_length > 0:
        x = cutout(x, cutout_centres(rng, b, h, w), cutout_length)
    return x
