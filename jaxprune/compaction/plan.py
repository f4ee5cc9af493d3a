"""The compaction plan both compaction paths share: which positions of every leaf axis a set
of masks keeps (`surgery`), the same rounded to kernel-friendly counts (`align_masks`), and
the slicing that applies it to any tree of the same structure (`slice_tree`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import PruningGraph, leaf_paths
from jaxprune.masks import axis_plans, validate_masks

AxisKeep = dict[tuple[str, ...], dict[int, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class CompactResult:
    """Output of `compact`.

    Attributes:
      model: the smaller model: a bundled model's ``model.clone(keep_out=..., keep_in=...)``,
        or a `jaxprune.compaction.ProgramModel`.
      variables: its variables (params and batch stats) with the pruned slices removed.
      keep_out: module path -> kept output channel indices (original numbering).
      keep_in: module path -> kept input channel indices (original numbering).
      axis_keep: leaf path -> {axis: kept positions}: the surgery, replayable on any tree of
        the same structure with `slice_tree` (fresh model, optimizer state, EMA params).
      kept: group name -> 0/1 ``[C]``, the channels the compact model has; differs from the
        masks only with ``align > 1``. ``flops.count(graph, kept)`` is the compact model's cost.
    """

    model: Any
    variables: Any
    keep_out: dict[str, tuple[int, ...]]
    keep_in: dict[str, tuple[int, ...]]
    axis_keep: AxisKeep
    kept: dict[str, np.ndarray] | None = None  # 0/1 per group actually kept (after `align`)


def align_masks(masks: Mapping[str, Any], align: int) -> dict[str, np.ndarray]:
    """0/1 keep vectors with each group's kept count rounded UP to a multiple of ``align``.

    The extra channels are the lowest-index pruned ones; they stay in the compact model with
    their (masked, zero) parameters, so outputs are unchanged. Convolution kernels of XLA:CPU
    (and of most accelerators) run much faster on channel counts that are multiples of 8: a
    39-channel 3x3 conv is slower than a 40-channel one. ``align=1`` keeps exactly the masks.
    """
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive int, got {align!r}")
    out = {}
    for n, m in masks.items():
        keep = np.asarray(m) != 0
        want = min(len(keep), -(-int(keep.sum()) // align) * align)
        extra = np.flatnonzero(~keep)[: want - int(keep.sum())]
        keep = keep.copy()
        keep[extra] = True
        out[n] = keep.astype(np.float32)
    return out


def surgery(masks: Mapping[str, Any], graph: PruningGraph
            ) -> tuple[AxisKeep, dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Host-side plan of the compaction: kept positions of every touched leaf axis.

    Returns ``(axis_keep, keep_out, keep_in)``; see `CompactResult`.
    """
    validate_masks(masks, graph)
    keep = {n: (np.asarray(m) != 0) for n, m in masks.items()}
    axis_keep: AxisKeep = {}
    for path, plans in axis_plans(graph, None).items():
        for plan in plans:
            vec = np.concatenate([keep[n] for n in plan.groups] + [np.ones(1, bool)])
            axis_keep.setdefault(path, {})[plan.axis] = np.flatnonzero(vec[plan.index])
    keep_out: dict[str, tuple[int, ...]] = {}
    keep_in: dict[str, tuple[int, ...]] = {}
    for g in graph.groups.values():
        for m in g.members:
            target = keep_out if m.role == "out" else keep_in if m.role == "in" else None
            if target is not None:
                target[m.module] = tuple(int(i) for i in axis_keep[m.path][m.axis])
    return axis_keep, keep_out, keep_in


def slice_tree(tree: Any, axis_keep: AxisKeep, prefix: tuple[str, ...] = (),
               match_suffix: bool = False) -> Any:
    """Applies a recorded surgery to ``tree`` (variables, a params tree, an optax state).

    Args:
      tree: a pytree; a leaf is sliced when its path (``prefix`` + path) is in ``axis_keep``,
        or, with ``match_suffix``, when its path ends with a recorded path without its
        collection (how optax states nest params-shaped trees).
    """
    by_suffix = {p[1:]: v for p, v in axis_keep.items()} if match_suffix else {}
    flat, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for leaf, path in zip(flat, leaf_paths(tree)):
        full = tuple(prefix) + path
        cut = axis_keep.get(full)
        if cut is None and match_suffix:
            cut = next((by_suffix[path[k:]] for k in range(len(path)) if path[k:] in by_suffix),
                       None)
        if cut is not None and np.ndim(leaf) > max(cut):
            leaf = _take(leaf, cut)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _take(leaf: Any, cut: Mapping[int, np.ndarray]) -> Any:
    """``leaf`` restricted to the kept positions ``cut[axis]`` of each cut axis.

    Concrete arrays are sliced on the host (numpy) and put back with their sharding when that is
    replicated: slicing eagerly with ``jnp.take`` compiles one gather per leaf shape, which takes
    minutes for a deep model. Tracers (inside ``jit``) and sharded arrays use ``jnp.take``.
    """
    host = isinstance(leaf, np.ndarray) or (
        isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        and leaf.is_fully_addressable and leaf.sharding.is_fully_replicated)
    if not host:
        for axis, idx in cut.items():
            leaf = jnp.take(leaf, jnp.asarray(idx), axis=axis)
        return leaf
    sliced = np.asarray(leaf)
    for axis, idx in cut.items():
        sliced = np.take(sliced, np.asarray(idx, np.int64), axis=axis)
    if isinstance(leaf, np.ndarray):
        return jnp.asarray(sliced)  # as jnp.take would
    return jax.device_put(sliced, leaf.sharding)


def compact_variables(variables: Any, masks: Mapping[str, Any], graph: PruningGraph
                      ) -> tuple[Any, AxisKeep]:
    """Removes every pruned slice from ``variables``; model-independent."""
    axis_keep, _, _ = surgery(masks, graph)
    return slice_tree(variables, axis_keep), axis_keep


def refuse_empty(masks: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first group whose mask keeps no channel."""
    empty = [g for g, m in masks.items() if not np.any(np.asarray(m) > 0)]
    if empty:
        raise ValueError(f"group {empty[0]!r} keeps no channel (an all-zero mask): compaction "
                         "would build a layer of width 0; keep at least one channel per group")


def axis_keep_to_json(axis_keep: AxisKeep) -> dict[str, dict[str, list[int]]]:
    """JSON-safe form of a surgery (for checkpoint metadata)."""
    return {"/".join(p): {str(a): [int(i) for i in idx] for a, idx in v.items()}
            for p, v in axis_keep.items()}


def axis_keep_from_json(data: Mapping[str, Mapping[str, list[int]]]) -> AxisKeep:
    """The surgery `axis_keep_to_json` wrote."""
    return {tuple(p.split("/")): {int(a): np.asarray(idx, np.int64) for a, idx in v.items()}
            for p, v in data.items()}
