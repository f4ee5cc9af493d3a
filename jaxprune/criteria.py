"""Filter importance criteria: ``(variables, graph) -> {group name: float32 [C]}``.

Higher score = more important; selection rules (``jaxprune.selection``) prune the lowest.
A criterion reads only the parameter slices named by each group's members (see
``docs/design.md`` sections 1-4):

- the *filters* of a group are its role-``'out'`` members: for member ``m``, channel ``c``'s
  filter is ``leaf`` gathered at ``m.index[c]`` along ``m.axis``, flattened. A group with
  several producers (a coupled residual group) owns one filter slice per producer.
- ``bn_scale`` reads the role-``'vector'`` members whose leaf is named ``'scale'``.

All criteria are pure and jittable with the graph held static (close over it:
``jax.jit(lambda v: l1_norm(v, graph))``); the member indices are numpy constants.
Scores are computed in float32 whatever the parameter dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Scores = dict[str, jax.Array]
Criterion = Callable[[Any, Any], Scores]


def _leaf(variables: Any, path: tuple[str, ...]) -> jax.Array:
    node = variables
    for key in path:
        try:
            # an NNX state keeps an nnx.List / nnx.Sequential index as an int; paths say '0'
            node = node[int(key)] if key.isdigit() and key not in node else node[key]
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(
                f"leaf path {path!r} not found in the variables (missing key {key!r})"
            ) from err
    # NNX states hold variable wrappers; their array is `.value`.
    if not hasattr(node, "shape") and hasattr(node, "value"):
        node = node.value
    return jnp.asarray(node, jnp.float32)


def _slices(variables: Any, member: Any) -> jax.Array:
    """``[C, D]``: row c is channel c's slice of the member's leaf, flattened."""
    leaf = _leaf(variables, member.path)
    index = np.asarray(member.index)
    channels = index.shape[0]
    gathered = jnp.take(leaf, index.reshape(-1), axis=member.axis)
    # index.reshape(-1) is row-major, so channel c's m positions are contiguous.
    return jnp.moveaxis(gathered, member.axis, 0).reshape(channels, -1)


def _filters_by_producer(variables: Any, group: Any) -> list[jax.Array]:
    """One ``[C, D_p]`` filter matrix per producer module (its 'out' members concatenated)."""
    by_module: dict[str, list[jax.Array]] = {}
    for member in group.members:
        if member.role == "out":
            module = "/".join(member.path[1:-1])
            by_module.setdefault(module, []).append(_slices(variables, member))
    if not by_module:
        raise ValueError(
            f"group {group.name!r} has no role-'out' member (no filters to score)"
        )
    return [jnp.concatenate(parts, axis=1) for parts in by_module.values()]


def l1_norm(variables: Any, graph: Any) -> Scores:
    """PFEC score: ``sum |w|`` over each channel's filters (all producers concatenated)."""
    return {
        name: sum(jnp.sum(jnp.abs(f), axis=1) for f in _filters_by_producer(variables, g))
        for name, g in graph.groups.items()
    }


def l2_norm(variables: Any, graph: Any) -> Scores:
    """SFP score: ``sqrt(sum w^2)`` over each channel's filters (all producers concatenated)."""
    return {
        name: jnp.sqrt(
            sum(jnp.sum(jnp.square(f), axis=1) for f in _filters_by_producer(variables, g))
        )
        for name, g in graph.groups.items()
    }


def _distance_sums(filters: jax.Array) -> jax.Array:
    """``[C]``: sum over the other rows of the Euclidean distance to each row of ``[C, D]``."""
    # Distances do not depend on the origin; centring keeps the Gram-matrix form accurate
    # in float32 when filters are large and close together.
    x = filters - jnp.mean(filters, axis=0, keepdims=True)
    sq = jnp.sum(jnp.square(x), axis=1)
    gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)
    return jnp.sum(jnp.sqrt(d2), axis=1)


def fpgm(variables: Any, graph: Any) -> Scores:
    """FPGM score (He et al., CVPR 2019): sum of Euclidean distances to the other filters.

    Filters near the geometric median of their layer (small distance sum) are redundant and
    pruned first, so the sum itself is the score. In a coupled group each producer's filters
    form their own layer; the per-producer sums are added.
    """
    return {
        name: sum(_distance_sums(f) for f in _filters_by_producer(variables, g))
        for name, g in graph.groups.items()
    }


def bn_scale(variables: Any, graph: Any) -> Scores:
    """Network-slimming score: ``|gamma|`` summed over every BN scale (``'scale'`` vector) of the group."""
    scores = {}
    for name, group in graph.groups.items():
        parts = [
            jnp.sum(jnp.abs(_slices(variables, m)), axis=1)
            for m in group.members
            if m.role == "vector" and m.path[-1] == "scale"
        ]
        if not parts:
            raise ValueError(
                f"group {name!r} has no BatchNorm scale (no role-'vector' member named "
                "'scale'); bn_scale needs a BN after every pruned producer"
            )
        scores[name] = sum(parts)
    return scores


CRITERIA: Mapping[str, Criterion] = {
    "l1": l1_norm,
    "l2": l2_norm,
    "fpgm": fpgm,
    "bn_scale": bn_scale,
}


def get_criterion(name: str) -> Criterion:
    """The criterion registered under ``name`` (one of ``CRITERIA``)."""
    try:
        return CRITERIA[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown criterion {name!r}; allowed: {', '.join(sorted(CRITERIA))}"
        ) from None
