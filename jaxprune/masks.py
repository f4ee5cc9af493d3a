"""Masks: one float vector ``[C]`` per prunable group, and pure transforms that apply them.

A mask value multiplies every slice of its channel: 1 keeps it, 0 prunes it, values in between
decay it (SRFP). Masks never have the size of a kernel: each leaf axis touched by groups gets a
static gather index into the concatenated group vectors, built once at trace time, so applying
masks inside `jax.jit` costs one gather and one multiply per touched leaf axis and changing
mask values never recompiles.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import PruningGraph, leaf_paths

Masks = dict[str, jax.Array]


def init_masks(graph: PruningGraph, dtype=jnp.float32) -> Masks:
    """All-ones masks, one ``[C]`` vector per group."""
    return {name: jnp.ones((g.size,), dtype) for name, g in graph.groups.items()}


def validate_masks(masks: Mapping[str, Any], graph: PruningGraph) -> None:
    """Raises ValueError if ``masks`` does not have one ``[C]`` vector per group of ``graph``."""
    expected = graph.group_sizes()
    unknown = sorted(set(masks) - set(expected))
    missing = sorted(set(expected) - set(masks))
    if unknown or missing:
        raise ValueError(
            f"masks do not match the graph: unknown groups {unknown}, missing groups {missing}; "
            f"the graph's groups are {sorted(expected)}")
    for name, size in expected.items():
        shape = tuple(np.shape(masks[name]))
        if shape != (size,):
            raise ValueError(f"mask for group {name!r} has shape {shape}; expected ({size},)")


def check_tree(tree: Any, graph: PruningGraph, prefix: Sequence[str] = ()) -> None:
    """Raises ValueError unless every leaf of ``tree`` (paths with ``prefix`` prepended) is a
    variable the graph was traced with, of the same shape: a tree of another model (or a wrong
    ``prefix``) would otherwise be masked silently not at all, or wrongly."""
    known = {leaf.path: tuple(leaf.shape) for leaf in graph.leaves}
    flat = jax.tree_util.tree_leaves(tree)
    paths = [tuple(prefix) + p for p in leaf_paths(tree)]
    unknown = [p for p in paths if p not in known]
    if unknown:
        hint = "" if prefix else " (a params tree needs prefix=('params',))"
        raise ValueError(f"the tree does not match the graph: {len(unknown)} of its {len(paths)} leaves "
                         f"are not variables the graph was traced with, e.g. "
                         f"{'/'.join(unknown[0])}{hint}")
    for p, leaf in zip(paths, flat):
        if tuple(np.shape(leaf)) != known[p]:
            raise ValueError(f"leaf {'/'.join(p)} has shape {tuple(np.shape(leaf))} but the graph "
                             f"was traced with {known[p]}: variables of another model?")


class AxisPlan(NamedTuple):
    """Which group channel each position of one leaf axis belongs to."""

    axis: int
    groups: tuple[str, ...]
    index: np.ndarray  # [axis_size] into concat(masks[g] for g in groups) + [1.0]


def axis_plans(graph: PruningGraph, roles: Collection[str] | None
               ) -> dict[tuple[str, ...], list[AxisPlan]]:
    """Leaf path -> the `AxisPlan` of each of its axes that groups touch (members of ``roles``;
    None: all)."""
    per_axis: dict[tuple[tuple[str, ...], int], list[tuple[str, Any]]] = {}
    for name, g in graph.groups.items():
        for m in g.members:
            if roles is None or m.role in roles:
                per_axis.setdefault((m.path, m.axis), []).append((name, m))
    sizes = {leaf.path: leaf.shape for leaf in graph.leaves}
    plans: dict[tuple[str, ...], list[AxisPlan]] = {}
    for (path, axis), entries in per_axis.items():
        names = tuple(dict.fromkeys(n for n, _ in entries))
        offsets = dict(zip(names, np.cumsum([0] + [graph.groups[n].size for n in names])))
        total = sum(graph.groups[n].size for n in names)
        index = np.full(sizes[path][axis], total, np.int32)
        for n, m in entries:
            index[m.index] = offsets[n] + np.arange(m.index.shape[0])[:, None]
        plans.setdefault(path, []).append(AxisPlan(axis, names, index))
    return plans


def _multiplier(plan: AxisPlan, masks: Mapping[str, jax.Array], ndim: int, dtype) -> jax.Array:
    vec = jnp.concatenate([jnp.asarray(masks[n], dtype) for n in plan.groups]
                          + [jnp.ones((1,), dtype)])
    shape = [1] * ndim
    shape[plan.axis] = plan.index.shape[0]
    return vec[plan.index].reshape(shape)


def apply_masks(tree: Any, masks: Mapping[str, jax.Array], graph: PruningGraph,
                roles: Collection[str] | None = None, prefix: Sequence[str] = ()) -> Any:
    """Multiplies every group slice found in ``tree`` by its channel's mask value.

    Args:
      tree: the variables pytree, or a sub-tree of it (gradients, params) whose leaf paths
        are the variables' paths with ``prefix`` removed (``prefix=('params',)`` for a
        params tree).
      masks: group name -> ``[C]`` vector.
      graph: the `PruningGraph` the masks belong to.
      roles: restrict to members of these roles (``{'out'}``: only the filters, as SFP's
        official code does); default all members (filters, BN entries, consumers' inputs).
      prefix: path prefix of ``tree`` inside the variables.

    Returns:
      A tree of the same structure; leaves untouched by groups are returned as they are.
    """
    validate_masks(masks, graph)
    check_tree(tree, graph, prefix)
    plans = axis_plans(graph, roles)
    flat, treedef = jax.tree_util.tree_flatten(tree)
    paths = leaf_paths(tree)
    out = []
    for leaf, path in zip(flat, paths):
        for plan in plans.get(tuple(prefix) + path, ()):
            leaf = leaf * _multiplier(plan, masks, leaf.ndim, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def mask_optimizer_state(opt_state: Any, masks: Mapping[str, jax.Array],
                         graph: PruningGraph, collection: str = "params") -> Any:
    """Masks every params-shaped leaf of an optax state (momentum, Adam moments, ...).

    A leaf of ``opt_state`` is matched to a parameter when its path ends with the parameter's
    path inside ``collection`` and its shape equals the parameter's.
    """
    validate_masks(masks, graph)
    plans = {p[1:]: v for p, v in axis_plans(graph, None).items() if p[0] == collection}
    shapes = {leaf.path[1:]: leaf.shape for leaf in graph.leaves if leaf.path[0] == collection}
    flat, treedef = jax.tree_util.tree_flatten(opt_state)
    paths = leaf_paths(opt_state)
    out = []
    for leaf, path in zip(flat, paths):
        for k in range(len(path)):
            sub = path[k:]
            if sub in plans and tuple(np.shape(leaf)) == shapes[sub]:
                for plan in plans[sub]:
                    leaf = leaf * _multiplier(plan, masks, leaf.ndim, leaf.dtype)
                break
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def zero_channels(variables: Mapping[str, Any], hard: Mapping[str, jax.Array],
                  graph: PruningGraph) -> dict:
    """``variables`` (``{'params': ..., 'batch_stats': ...}``; any collections with the graph's
    paths) with every member slice of the hard-pruned channels (0 in ``hard``) zeroed: filters,
    BN scale/bias and running statistics, the consumers' input slices. What a method does when
    it hardens channels; their optimizer moments are the optimizer's business
    (`hard_masked` clears them at its next update). Empty collections are returned as they
    are."""
    out = dict(variables)
    for col, tree in variables.items():
        if jax.tree_util.tree_leaves(tree):
            out[col] = apply_masks(tree, hard, graph, prefix=(col,))
    return out


def keep_indices(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Group name -> sorted indices of the channels whose mask is nonzero (host arrays)."""
    return {n: np.flatnonzero(np.asarray(m) != 0) for n, m in masks.items()}


def check_hard_masks(masks: Mapping[str, Any], what: str = "masks") -> None:
    """Raises ValueError naming the group, the channel and the value unless every mask value is
    exactly 0 or 1. For the hard masks a final model is built from (compaction's input, a
    method's ``finalize``): a decayed (SRFP), NaN or out-of-range value there would silently
    give a compact model that differs from the masked one. Soft masks during training are
    not checked."""
    for name, m in masks.items():
        arr = np.asarray(jax.device_get(m), np.float64).reshape(-1)
        bad = np.flatnonzero(~((arr == 0.0) | (arr == 1.0)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{what}: group {name!r} channel {i} has mask value {float(arr[i])!r} "
                             f"({bad.size} non-binary value(s)); hard masks must be 0 or 1")


def binarize(masks: Mapping[str, jax.Array]) -> Masks:
    """1 where a mask is nonzero, else 0 (decayed SRFP channels count as kept)."""
    return {n: (m != 0).astype(jnp.float32) for n, m in masks.items()}


class HardMaskedState(NamedTuple):
    """State of `hard_masked`: the wrapped optimizer's state (masks travel as an argument)."""

    inner: Any


def hard_masked(inner: Any, graph: PruningGraph, prefix: Sequence[str] = ("params",),
                mask_gradients: bool = True):
    """``inner`` (any optax transform, e.g. a whole ``optax.chain``) with the hard-pruned
    channels frozen at zero.

    Call ``update(grads, state, params, masks=masks)`` with the hard masks (0 = pruned). The
    gradients of pruned channels are zeroed before ``inner`` sees them, its updates are masked
    after, and every params-shaped leaf of its state (momentum, Adam moments) is masked too
    (`mask_optimizer_state`) before and after ``inner`` runs, so with the params already
    masked the pruned channels stay exactly zero whatever momentum or weight decay ``inner``
    applies, and the moments of a channel are gone from the first update after it is
    hard-pruned (a method that grows the hard set never touches the optimizer state). Kept channels are updated exactly as ``inner``
    alone would (for element-wise optimizers such as SGD and Adam). Extra keyword arguments
    are passed on to ``inner``. ``prefix``: the path of the updated tree inside the variables
    (``('params',)`` for a Linen params tree and inside an ``nnx.Optimizer`` alike).

    ``mask_gradients=False`` leaves the gradients to ``inner`` as they are and masks only its
    updates and state: the same result for an element-wise ``inner`` (SGD, momentum, weight
    decay, Adam), not for one that mixes channels (global-norm clipping, per-leaf trust
    ratios). jaxprune's train step uses it with the papers' SGD, which keeps its compiled
    program, and hence every recorded run, bit for bit (a multiply fused into the gradient
    computation changes XLA's fusion and the last bit of some updates).
    """
    import optax

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return HardMaskedState(inner.init(params))

    def update_fn(updates, state, params=None, *, masks=None, **extra):
        if masks is None:
            raise ValueError("hard_masked.update needs masks=...: the current hard group masks")
        if mask_gradients:
            updates = apply_masks(updates, masks, graph, prefix=prefix)
        # moments of channels hardened since the last update (a grown hard set) go first
        inner_state = mask_optimizer_state(state.inner, masks, graph, collection=prefix[0])
        updates, inner_state = inner.update(updates, inner_state, params, **extra)
        updates = apply_masks(updates, masks, graph, prefix=prefix)
        inner_state = mask_optimizer_state(inner_state, masks, graph, collection=prefix[0])
        return updates, HardMaskedState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
