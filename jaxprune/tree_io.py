"""Leaf-level helpers shared by the two on-disk formats (training checkpoints,
`jaxprune.checkpoints`; compact models, `jaxprune.artifact`): JSON-safe metadata, a strict
leaf-by-leaf shape check against a target, and abstract restore targets."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxprune.graph import leaf_paths


def jsonable(value: Any) -> Any:
    """JSON-safe copy of ``value``: numpy/JAX scalars and arrays become Python numbers/lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    if isinstance(value, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in checkpoint metadata (JSON)")


def _shape(leaf: Any) -> tuple[int, ...] | None:
    shape = getattr(leaf, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def check_shapes(stored: Any, target: Any, what: str = "checkpoint") -> None:
    """Raises ValueError unless ``stored`` (a metadata or array tree) matches ``target`` leaf for
    leaf: same leaf paths, same shapes. The message names the path and both shapes."""
    stored_leaves = dict(zip(("/".join(p) for p in leaf_paths(stored)), jax.tree.leaves(stored)))
    target_leaves = dict(zip(("/".join(p) for p in leaf_paths(target)), jax.tree.leaves(target)))
    missing = [p for p in target_leaves if p not in stored_leaves]
    extra = [p for p in stored_leaves if p not in target_leaves]
    if missing or extra:
        raise ValueError(f"{what} does not match the expected structure: leaves missing from the "
                         f"{what}: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected "
                         f"leaves in the {what}: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    bad = [f"leaf {path!r} has shape {_shape(stored_leaves[path])} on disk but the target "
           f"expects {_shape(want)}"
           for path, want in target_leaves.items() if _shape(stored_leaves[path]) != _shape(want)]
    if bad:
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(f"{what} does not match the target shapes (refusing to pad or truncate): "
                         + "; ".join(bad[:8]) + more)


def abstract_target(target: Any, sharding: Any = None) -> Any:
    """``ShapeDtypeStruct`` tree of ``target`` with ``sharding`` (default: the leaf's own, or
    the first local device)."""
    default = SingleDeviceSharding(jax.local_devices()[0])

    def one(x):
        shard = sharding or getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shard)

    return jax.tree.map(one, target)


__all__ = ["jsonable", "check_shapes", "abstract_target"]
