"""Shared pieces of the bundled models: the compaction contract (design.md section 6).

Every bundled Linen model has two fields

- ``keep_out``: module path -> sorted ORIGINAL indices of the output channels a conv/dense keeps;
- ``keep_in``:  module path -> sorted original indices of the input channels it still reads;

both ``FrozenDict``s of int tuples, empty by default (the dense model). A conv's ``features`` is
``width(keep_out, path, dense_width)``. Where two activations meet in a residual ``add`` both are
moved into the output's channel positions with :func:`reindex` (zeros where an operand has no
channel), so a compacted model computes exactly what the masked dense model computes.

Constants of removed channels (SFP's official final model zeroes only the filters, so a
removed channel still emits its BN constant): a model marks with :func:`carried` every conv /
dense output and every reindexed operand of an add. ``jaxprune.compaction.compact(...,
keep_constants=True)`` reads the dense model's operands at those points (collection
``'carry_sites'``) and stores what the removed channels contributed there in the compact
model's ``'carry'`` collection, which :func:`carried` adds back.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax
from flax.core import FrozenDict

Keep = Mapping[str, tuple[int, ...]]

EMPTY: FrozenDict = FrozenDict()

# BatchNorm hyper-parameters of every bundled model (PyTorch's momentum 0.1 == Flax's 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def freeze_keep(keep: Keep | None) -> FrozenDict:
    """Normalise a keep mapping to a hashable ``FrozenDict[str, tuple[int, ...]]``.

    Accepts dicts/FrozenDicts whose values are any int sequences (lists from JSON, numpy arrays).
    """
    if keep is None:
        return EMPTY
    if isinstance(keep, FrozenDict) and all(
        isinstance(v, tuple) and all(type(i) is int for i in v) for v in keep.values()
    ):
        return keep
    return FrozenDict({str(k): tuple(int(i) for i in np.asarray(v).reshape(-1)) for k, v in dict(keep).items()})


def sub_keep(keep: Keep, prefix: str) -> FrozenDict:
    """The entries of ``keep`` under module ``prefix``, with ``prefix + '/'`` stripped."""
    p = prefix + "/"
    return FrozenDict({k[len(p):]: v for k, v in keep.items() if k.startswith(p)})


def width(keep_out: Keep, path: str, default: int) -> int:
    """Number of output channels of module ``path``: ``len(keep_out[path])`` or ``default``."""
    if path in keep_out:
        return len(keep_out[path])
    return int(default)


def positions(keep: Keep, path: str, default_width: int) -> tuple[int, ...]:
    """Original channel positions recorded for ``path``: ``keep[path]`` or ``range(default_width)``."""
    if path in keep:
        return tuple(keep[path])
    return tuple(range(int(default_width)))


def reindex_plan(src: Sequence[int], dst: Sequence[int]) -> tuple[str, Any]:
    """How :func:`reindex` moves channels from positions ``src`` to positions ``dst``.

    Returns one of ``('identity', None)``, ``('pad', (start, stop, lo, hi))`` (take
    ``x[..., start:stop]`` then pad ``lo`` zeros before and ``hi`` after) or
    ``('gather', index)`` with ``index`` an int numpy array into ``concat([x, 0])``
    (``index == len(src)`` picks the zero channel).
    """
    src = tuple(int(p) for p in src)
    dst = tuple(int(p) for p in dst)
    if src == dst:
        return "identity", None
    where = {p: i for i, p in enumerate(src)}
    idx = [where.get(p, -1) for p in dst]
    hits = [j for j, i in enumerate(idx) if i >= 0]
    if hits:
        first, last = hits[0], hits[-1]
        run = idx[first:last + 1]
        contiguous = all(i >= 0 for i in run) and all(b == a + 1 for a, b in zip(run, run[1:]))
    else:
        first, last, contiguous = 0, -1, True
    if contiguous:
        if hits:
            start, stop = run[0], run[-1] + 1
        else:
            start = stop = 0
        lo = first if hits else len(dst)
        hi = len(dst) - 1 - last if hits else 0
        return "pad", (start, stop, lo, hi)
    index = np.asarray([i if i >= 0 else len(src) for i in idx], dtype=np.int32)
    return "gather", index


def gather_channels(x: jnp.ndarray, index: Sequence[int] | np.ndarray, axis: int = -1) -> jnp.ndarray:
    """``x``'s entries along ``axis`` at the static positions ``index``; ``index ==
    x.shape[axis]`` gives a zero entry.

    For floating ``x`` this is a matmul with a one-hot matrix at ``Precision.HIGHEST`` (each
    output is one input times 1 plus zeros: exact, for finite ``x``) instead of a gather: a
    gather along the channel axis makes XLA:CPU transpose the activation and back
    (`experiments/bench/compact_profile.py --gathers`; BENCHMARKS.md), and a one-hot
    matmul is what TPUs do best. Other dtypes use ``jnp.take``.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    index = np.asarray(index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() > n):
        raise ValueError(f"gather_channels: index out of range [0, {n}] for an axis of {n}: {index.tolist()}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if (index < n).all():
            return jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        return jnp.take(jnp.pad(x, pad), jnp.asarray(index, jnp.int32), axis=axis)
    onehot = np.zeros((n + 1, index.size), np.float32)
    onehot[index, np.arange(index.size)] = 1.0
    y = jnp.tensordot(x, jnp.asarray(onehot[:n], x.dtype), axes=((axis,), (0,)),
                      precision=lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def materialize(x: Any) -> Any:
    """``x`` unchanged, kept as one buffer by the compiler: the output of a residual block.

    An ``lax.optimization_barrier``, so XLA cannot fuse the elementwise chain that produced
    ``x`` into ``x``'s consumers. A residual stream is such a chain (add, BN, ReLU from block
    to block), and XLA:CPU's fusion duplicates it into every consumer that wants another
    layout: each weight-gradient transpose recomputed the stream from the start of its stage,
    so a ResNet-56 train step cost 1.3-1.7x more per MAC than a ResNet-20's
    (``experiments/bench/torch_vs_jax.py --sections scaling``; BENCHMARKS.md).
    XLA:CPU turns barriers into control dependencies before fusion unless its
    ``cse_barrier_expander`` pass is disabled, which `jaxprune.perf.RECOMMENDED_CPU_FLAGS` does
    (without the flag the barrier is gone before fusion). It never changes a value (the
    gradients are bitwise equal either way, tested); on GPU/TPU it is not measured yet.
    """
    return lax.optimization_barrier(x)


def reindex(x: jnp.ndarray, src: Sequence[int], dst: Sequence[int]) -> jnp.ndarray:
    """Move the channels (last axis) of ``x`` from original positions ``src`` to positions ``dst``.

    ``x.shape[-1] == len(src)``; the result has ``len(dst)`` channels: channel ``j`` is x's channel
    at position ``dst[j]`` if that position is in ``src``, else zeros. Positions of ``src`` not in
    ``dst`` are dropped. ``x`` itself when ``src == dst``; a slice + ``jnp.pad`` when the result is
    zeros + a contiguous run of x's channels + zeros (the dense option-A shortcut); otherwise
    :func:`gather_channels` with the static index of :func:`reindex_plan`.
    """
    src = tuple(int(p) for p in src)
    if x.shape[-1] != len(src):
        raise ValueError(f"reindex: x has {x.shape[-1]} channels but src lists {len(src)} positions")
    kind, plan = reindex_plan(src, dst)
    if kind == "identity":
        return x
    if kind == "pad":
        start, stop, lo, hi = plan
        if (start, stop) != (0, x.shape[-1]):
            x = x[..., start:stop]
        if lo or hi:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(lo, hi)])
        return x
    return gather_channels(x, plan, axis=-1)


CARRY = "carry"
CARRY_SITES = "carry_sites"


def carried(module: Any, name: str, x: jnp.ndarray, dst: Sequence[int] | None = None,
            src: Sequence[int] | None = None) -> jnp.ndarray:
    """``x`` plus the carried constant ``name + '_const'`` of ``module``'s ``'carry'``
    collection, when the (compact) model has one; otherwise ``x`` unchanged.

    ``x`` is a conv / dense output named ``name`` (the removed input channels' contribution is
    carried), or an operand reindexed from positions ``src`` to ``dst`` (the constants of the
    positions of ``dst`` missing from ``src`` are carried). The dense model records ``x`` (and
    ``dst``, ``src``) in ``'carry_sites'`` when that collection is mutable, outside ``init``
    (`jaxprune.compaction` reads it); otherwise the call costs nothing.
    """
    if dst is not None and module.is_mutable_collection(CARRY_SITES) and not module.is_initializing():
        present = np.isin(np.asarray(dst), np.asarray(src)).astype(np.float32)
        module.sow(CARRY_SITES, name, (x, jnp.asarray(np.asarray(dst), jnp.int32), jnp.asarray(present)))
    var = name + "_const"
    if module.has_variable(CARRY, var):
        x = x + module.get_variable(CARRY, var).astype(x.dtype)
    return x


def carried_reindex(module: Any, name: str, x: jnp.ndarray, src: Sequence[int],
                    dst: Sequence[int]) -> jnp.ndarray:
    """:func:`reindex` of ``x`` from ``src`` to ``dst`` as site ``name`` of :func:`carried`."""
    return carried(module, name, reindex(x, src, dst), dst=dst, src=src)


def conv_init():
    """He (fan-out, normal) initialisation of conv kernels, as in the reference ResNet code."""
    import jax.nn.initializers as init

    return init.variance_scaling(2.0, "fan_out", "normal")


def dtype_name(dtype: Any) -> str | None:
    """JSON-safe name of a dtype field (``None`` stays ``None``)."""
    if dtype is None:
        return None
    return jnp.dtype(dtype).name


def dtype_from_name(name: str | None) -> Any:
    """Inverse of :func:`dtype_name`: ``'float32' -> jnp.float32``."""
    if name is None:
        return None
    return getattr(jnp, name)


class KeepMixin:
    """Normalises ``keep_out`` / ``keep_in`` fields to hashable FrozenDicts after construction.

    Mixed into the bundled Linen modules (before ``nn.Module`` in the bases), so that
    ``model.clone(keep_out={...plain dict of lists...})`` still gives a hashable model.
    """

    def __post_init__(self):
        for f in ("keep_out", "keep_in"):
            if hasattr(self, f):
                object.__setattr__(self, f, freeze_keep(getattr(self, f)))
        super().__post_init__()
