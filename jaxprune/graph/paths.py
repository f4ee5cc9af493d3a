"""Leaf paths of variable pytrees, with ``flax.nnx`` states named as Linen variables."""

from __future__ import annotations

from typing import Any

import jax


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: Any) -> list[tuple[str, ...]]:
    """Paths (tuples of strings) of the leaves of ``tree`` in flatten order.

    ``flax.nnx`` trees are named like Linen variables: the ``'value'`` key inside each
    ``nnx.Variable`` is dropped and, when ``tree`` is an ``nnx.State`` (``nnx.split``'s), the
    variable's collection name leads the path, so ``nnx.split(model)[1]`` has the leaf paths
    ``('params', 'conv1', 'kernel')``, ``('batch_stats', 'bn1', 'mean')``: module paths and
    ``LeafInfo.is_param`` then mean the same for both APIs.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_key_str(k) for k in kp) for kp, _ in flat]
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return paths
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    top, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)
    if not any(is_var(node) for _, node in top):
        return paths
    root_state = isinstance(tree, nnx.State)
    out: list[tuple[str, ...]] = []
    i = 0
    for kp, node in top:
        if not is_var(node):
            out.append(paths[i])
            i += 1
            continue
        base = tuple(_key_str(k) for k in kp)
        coll = (_variable_collection(type(node)),) if root_state else ()
        n = len(jax.tree_util.tree_leaves(node))
        out.extend(coll + base + p[len(base) + 1:] for p in paths[i:i + n])  # drop 'value'
        i += n
    return out


def _variable_collection(cls: type) -> str:
    """Collection name of an ``nnx.Variable`` type: ``Param -> 'params'``, as Linen's."""
    from flax.nnx import variablelib

    try:
        return variablelib.variable_name_from_type(cls)
    except Exception:  # an unregistered Variable subclass
        return cls.__name__.lower()
