"""Constant folding for the trace: the concrete values a trace keeps of integer/bool index
arrays and one-hot channel selections, and the numpy evaluation of the index arithmetic that
builds static gather indices (``jnp.take``, ``x[..., idx]``). Channel identity never depends on
float values, so nothing else is folded."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

FOLD_MAX_SIZE = 1 << 20
SELECTION_MAX_SIZE = 1 << 24  # one-hot channel moves: [kept, width], width up to 2048+ in ImageNet ResNets


def is_index_dtype(dtype) -> bool:
    """Whether ``dtype`` holds indices (integer or bool), the only values a trace folds."""
    return dtype is not None and (np.issubdtype(dtype, np.integer)
                                  or np.issubdtype(dtype, np.bool_))


def const_value(aval, c) -> np.ndarray | None:
    """The value a trace remembers of a constant: index arrays, and small float 0/1 matrices
    (`jaxprune.models.common.gather_channels`' one-hot selections); else None."""
    dtype = getattr(aval, "dtype", None)
    if is_index_dtype(dtype):
        return np.asarray(c)
    if (dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(aval.shape) == 2
            and int(np.prod(aval.shape)) <= SELECTION_MAX_SIZE):
        v = np.asarray(c, np.float32)
        if np.isin(v, (0.0, 1.0)).all():
            return v
    return None


def selection_rows(value: np.ndarray, contracting: int) -> np.ndarray | None:
    """For a 0/1 matrix with at most one 1 per column (along ``contracting``, the summed axis):
    the row of each column's 1, -1 where a column is all zeros; None for any other matrix."""
    if value.ndim != 2 or not np.isin(value, (0.0, 1.0)).all():
        return None
    m = value if contracting == 0 else value.T
    if (m.sum(axis=0) > 1).any():
        return None
    return np.where(m.any(axis=0), m.argmax(axis=0), -1)


def _fold_broadcast(v, p, shape):
    x = v[0]
    dims = p["broadcast_dimensions"]
    kept = [x.shape[dims.index(k)] if k in dims else 1 for k in range(len(shape))]
    return np.broadcast_to(np.reshape(x, kept), shape)


def _fold_iota(v, p, shape):
    d = p["dimension"]
    return np.broadcast_to(
        np.arange(shape[d]).reshape([-1 if k == d else 1 for k in range(len(shape))]), shape)


def _fold_select_n(v, p, shape):
    pred, *cases = v
    return np.choose(np.asarray(pred).astype(np.int64), [np.broadcast_to(c, shape) for c in cases])


# numpy evaluation of the index arithmetic `fold` performs: name -> (values, params, shape)
_FOLD: dict[str, Callable[..., Any]] = {
    "add": lambda v, p, s: v[0] + v[1],
    "sub": lambda v, p, s: v[0] - v[1],
    "mul": lambda v, p, s: v[0] * v[1],
    "neg": lambda v, p, s: -v[0],
    "max": lambda v, p, s: np.maximum(v[0], v[1]),
    "min": lambda v, p, s: np.minimum(v[0], v[1]),
    "lt": lambda v, p, s: v[0] < v[1],
    "le": lambda v, p, s: v[0] <= v[1],
    "gt": lambda v, p, s: v[0] > v[1],
    "ge": lambda v, p, s: v[0] >= v[1],
    "eq": lambda v, p, s: v[0] == v[1],
    "ne": lambda v, p, s: v[0] != v[1],
    "and": lambda v, p, s: v[0] & v[1],
    "or": lambda v, p, s: v[0] | v[1],
    "not": lambda v, p, s: ~v[0],
    "clamp": lambda v, p, s: np.clip(v[1], v[0], v[2]),
    "select_n": _fold_select_n,
    "broadcast_in_dim": _fold_broadcast,
    "convert_element_type": lambda v, p, s: v[0],
    "copy": lambda v, p, s: v[0],
    "copy_p": lambda v, p, s: v[0],
    "reshape": lambda v, p, s: np.reshape(v[0], s),
    "squeeze": lambda v, p, s: np.reshape(v[0], s),
    "transpose": lambda v, p, s: np.transpose(v[0], p["permutation"]),
    "concatenate": lambda v, p, s: np.concatenate(v, axis=p["dimension"]),
    "iota": _fold_iota,
}


def fold(name: str, values: list, params: Any, aval: Any) -> np.ndarray | None:
    """The value of primitive ``name`` applied to the concrete ``values``, for the index
    arithmetic listed in ``_FOLD`` (integer/bool results up to `FOLD_MAX_SIZE` elements); else None."""
    impl = _FOLD.get(name)
    if impl is None:
        return None
    dtype = getattr(aval, "dtype", None)
    if not is_index_dtype(dtype):
        return None
    if int(np.prod(aval.shape)) > FOLD_MAX_SIZE:
        return None
    if any(v is None for v in values):
        return None
    try:
        out = np.asarray(impl(values, params, aval.shape))
    except Exception:  # pragma: no cover - an unexpected parameter form: leave unknown
        return None
    if out.shape != tuple(aval.shape):
        return None
    return out.astype(dtype)
