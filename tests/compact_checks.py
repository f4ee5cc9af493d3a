"""Checks shared by the compaction tests: random masks and "every pruned tensor shrinks"."""

from __future__ import annotations

import jax
import numpy as np

from jaxprune.graph import leaf_paths


def random_masks(graph, rate: float, seed: int = 0) -> dict[str, np.ndarray]:
    """0/1 masks pruning ``round(rate * size)`` random channels of every group (at least one,
    at most ``size - 1``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, g in graph.groups.items():
        m = np.zeros(g.size, np.float32)
        dead = min(g.size - 1, max(1, int(round(rate * g.size))))  # at least one pruned
        m[rng.choice(g.size, g.size - dead, replace=False)] = 1
        out[name] = m
    return out


def assert_pruned_tensors_shrink(small_variables, variables, graph, masks) -> dict:
    """Every leaf axis a group prunes is smaller in ``small_variables`` by exactly the pruned
    counts of the groups along it (a leaf axis can hold several groups: a conv reading a
    concatenation). Returns ``(path, axis) -> channels removed``."""
    small = dict(zip(leaf_paths(small_variables), jax.tree_util.tree_leaves(small_variables)))
    dense = dict(zip(leaf_paths(variables), jax.tree_util.tree_leaves(variables)))
    shrink = {}
    for name, g in graph.groups.items():
        dead = int((np.asarray(masks[name]) == 0).sum())
        for m in g.members:
            shrink[m.path, m.axis] = shrink.get((m.path, m.axis), 0) + dead * m.index.shape[1]
    for (path, axis), n in shrink.items():
        assert small[path].shape[axis] == dense[path].shape[axis] - n, (path, axis)
    return shrink
