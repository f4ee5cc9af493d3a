"""Compaction: remove pruned channels for real and rebuild a smaller model.

Any Linen or NNX model that `jaxprune.graph.trace` follows is compacted from its own traced
program (`jaxprune.compact_program`: no model-specific code; the result is a
`~jaxprune.compact_program.ProgramModel`). The bundled models have a readable narrow form too:
`compact` slices every leaf that a group touches down to the kept positions and rebuilds the
model through the compactable-model contract (docs/design.md section 6): the model is cloned
with ``keep_out`` / ``keep_in`` (module path -> kept original channel indices of that
conv/dense's output / input), from which it derives its widths and the static re-indexing at
residual adds. The result computes exactly what the masked model computes:
``compact_model.apply(compact_vars, x) == model.apply(apply_masks(variables, binarize(masks),
graph), x)``: a removed channel's BN scale and bias are removed with its filter, so the BN
constant of a zeroed filter never reaches the compact model (methods.md section 6).

``keep_constants=True`` compacts SFP's official final model instead, whose removed channels
were zeroed in their filters only (``apply_masks(..., roles=('out',))``) and so still emit their
BN constants: what those constants contribute downstream (a bias map at each consumer conv, a
constant at each reindexed add operand) is computed on the dense model and carried in the
compact model's ``'carry'`` collection (`jaxprune.models.common.carried`), so that
``compact_model.apply(compact_vars, x) == model.apply(apply_masks(variables, binarize(masks),
graph, roles=('out',)), x)`` in inference mode (running BN statistics), at the spatial size of
``sample_input``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import flax
import flax.linen as nn

from jaxprune.graph import PruningGraph, leaf_paths
from jaxprune.masks import _plans, apply_masks, binarize, validate_masks
from jaxprune.models.common import CARRY, CARRY_SITES

# the members SFP's official code zeroes: only the filters (a removed channel keeps its BN)
FILTERS_ONLY = ("out",)

AxisKeep = dict[tuple[str, ...], dict[int, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class CompactResult:
    """Output of `compact`.

    Attributes:
      model: the rebuilt, smaller model (``model.clone(keep_out=..., keep_in=...)``).
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
    for path, plans in _plans(graph, None).items():
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


def compact(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
            align: int = 1, *, keep_constants: bool = False, sample_input: Any = None
            ) -> CompactResult:
    """Builds the physically smaller model and variables (see module docstring).

    ``model`` is a bundled model (a Linen module with ``keep_out`` and ``keep_in`` fields: it is
    cloned narrow), or any other Linen module or NNX model that `jaxprune.graph.trace`
    follows: its program is compacted (`jaxprune.compact_program`) and ``model`` of the result
    is a `jaxprune.compact_program.ProgramModel` (``apply(variables, x, **kwargs)``; for NNX,
    ``variables`` is `jaxprune.pruner.nnx_variables`'s dict), checked against the masked
    model on ``sample_input``, which it needs. Channels whose mask is 0 are
    removed; the kept ones are copied unchanged. With ``align > 1`` each group keeps a
    multiple of ``align`` channels (`align_masks`): faster kernels, same outputs.
    ``keep_constants=True`` (bundled models, with ``sample_input``, a batch of model inputs)
    carries the BN constants of the removed channels, as SFP's official final model keeps them;
    the result is checked against the filters-only masked model on ``sample_input`` (ValueError
    if the model has no `carried` hook where a constant flows).
    """
    if not (hasattr(model, "keep_out") and hasattr(model, "keep_in")):
        return _compact_any(model, variables, masks, graph, align, keep_constants, sample_input)
    validate_masks(masks, graph)
    from jaxprune.masks import check_tree

    check_tree(variables, graph)
    empty = [g for g, m in masks.items() if not np.any(np.asarray(m) > 0)]
    if empty:
        raise ValueError(f"group {empty[0]!r} keeps no channel (an all-zero mask): compaction "
                         "would build a layer of width 0; keep at least one channel per group")
    kept = align_masks(masks, align)
    old_out = dict(getattr(model, "keep_out") or {})
    old_in = dict(getattr(model, "keep_in") or {})
    if keep_constants:
        if sample_input is None:
            raise ValueError("keep_constants=True needs sample_input= (a batch of model inputs): "
                             "the carried constants are computed by running the dense model")
        if old_out or old_in:
            raise ValueError("keep_constants=True compacts a dense model; this one is already "
                             "compact (non-empty keep_out/keep_in)")
        variables = apply_masks(variables, binarize(masks), graph, roles=FILTERS_ONLY)
    elif align > 1:
        variables = apply_masks(variables, binarize(masks), graph)
    axis_keep, keep_out, keep_in = surgery(kept, graph)
    new_out = _compose(old_out, keep_out)
    new_in = _compose(old_in, keep_in)
    from flax.core import FrozenDict

    new_model = model.clone(keep_out=FrozenDict(new_out), keep_in=FrozenDict(new_in))
    new_vars = slice_tree(variables, axis_keep)
    if keep_constants:
        new_vars = carry_constants(model, variables, new_model, new_vars, new_in, new_out,
                                   jnp.asarray(sample_input))
    return CompactResult(new_model, new_vars, new_out, new_in, axis_keep, kept)


def _compact_any(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
                 align: int, keep_constants: bool, sample_input: Any) -> CompactResult:
    """`compact` of a model without the keep contract: its traced program, compacted."""
    import inspect

    from jaxprune.compact_program import ProgramModel, compact_program
    from jaxprune.masks import check_tree

    name = type(model).__name__
    if keep_constants:
        raise ValueError(f"keep_constants=True needs a bundled model (keep_out/keep_in and "
                         f"`carried` hooks); {name} is compacted from its program, which removes "
                         "the pruned channels' BN constants with them (SFP(final_bn='zero'))")
    if sample_input is None:
        raise ValueError(f"compacting {name}, which has no keep_out/keep_in fields, traces its "
                         "program: pass sample_input= (a batch of model inputs)")
    try:
        from flax import nnx
        is_nnx = isinstance(model, nnx.Module)
    except ImportError:  # pragma: no cover - flax is a dependency
        is_nnx = False
    if is_nnx:
        from jaxprune.pruner import nnx_apply

        call = nnx_apply(model)
        infer: dict = {}
    elif isinstance(model, nn.Module):
        call = model.apply
        infer = {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
    else:
        raise TypeError(f"compact takes a Flax Linen module or an NNX model, got {name}")
    validate_masks(masks, graph)
    check_tree(variables, graph)
    kept = align_masks(masks, align)
    if align > 1:
        variables = apply_masks(variables, binarize(masks), graph)
    fn = lambda v, x: call(v, x, **infer)  # noqa: E731
    program, small = compact_program(fn, variables, kept, graph, (jnp.asarray(sample_input),))
    axis_keep, keep_out, keep_in = surgery(kept, graph)
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    pm = ProgramModel(call, jax.tree_util.tree_map(spec, variables),
                      {k: np.asarray(v) for k, v in kept.items()}, graph)
    pm._programs[repr(sorted(infer.items()))] = program
    return CompactResult(pm, small, keep_out, keep_in, axis_keep, kept)


def _probes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two different inputs: what removed channels emit must not depend on the input."""
    return x, 1.0 - 0.5 * x


def _consumer_inputs(model: Any, variables: Any, x: jax.Array, paths: set[str]) -> dict:
    """Module path -> (standalone clone, its input) of every conv/dense in ``paths``."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
            path = "/".join(mod.path)
            if path in paths:
                seen[path] = (mod.clone(parent=None), args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x)
    return seen


def _check_constant(name: str, values: Sequence[jax.Array]) -> np.ndarray:
    """The first example of ``values[0]``, after checking that every example of every probe's
    value is the same (a removed channel's output is a constant of the weights)."""
    first = np.asarray(values[0][0], np.float32)
    scale = max(1.0, float(np.max(np.abs(first)))) if first.size else 1.0
    for v in values:
        if not np.allclose(np.asarray(v, np.float32), first[None], rtol=0, atol=1e-5 * scale):
            raise ValueError(f"keep_constants: what the removed channels feed into {name!r} depends "
                             "on the input, so it cannot be carried as a constant")
    return first


def carry_constants(model: Any, ref_vars: Any, small: Any, small_vars: Any,
                    keep_in: Mapping[str, tuple[int, ...]], keep_out: Mapping[str, tuple[int, ...]],
                    x: jax.Array) -> Any:
    """``small_vars`` with a ``'carry'`` collection that makes the compact model ``small``
    compute what the dense ``model`` computes with ``ref_vars`` (filters-only masked: removed
    channels emit constants). Two kinds of constants are carried:

    - at a conv/dense whose input lost channels: what the lost (constant) input channels added
      to its kept outputs: ``conv(x * removed) - conv(0)``, a map over the output positions (so
      zero padding at the borders is exact);
    - at a reindexed add operand (`jaxprune.models.common.carried_reindex`): the dense model's
      values at the positions the compact operand lacks.

    Raises ValueError when the compact model, with them, differs from the dense one on ``x``.
    """
    # the constants are weights: computed (and checked) in float32 whatever the compute dtype,
    # else a bfloat16 model would carry bf16-rounded constants (~1e-2 off)
    model, small = _float32(model), _float32(small)
    carry: dict[tuple[str, ...], np.ndarray] = {}
    probes = _probes(x)
    seen = [_consumer_inputs(model, ref_vars, p, set(keep_in)) for p in probes]
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(ref_vars["params"]), sep="/")
    for path, kept in keep_in.items():
        if path not in seen[0]:
            continue
        mod, x_in = seen[0][path]
        removed = np.ones(x_in.shape[-1], np.float32)
        removed[np.asarray(kept, np.int64)] = 0.0
        if not removed.any():
            continue
        p = {k[len(path) + 1:]: v for k, v in params.items() if k.startswith(path + "/")}
        p = flax.traverse_util.unflatten_dict(p, sep="/")
        contrib = [mod.apply({"params": p}, s[path][1] * removed) - mod.apply({"params": p}, 0 * s[path][1])
                   for s in seen]
        value = _check_constant(path, contrib)
        value = value[..., np.asarray(keep_out.get(path, range(value.shape[-1])), np.int64)]
        if np.any(value):
            carry[tuple(path.split("/")[:-1]) + (path.split("/")[-1] + "_const",)] = value
    with_convs = _with_carry(small_vars, carry)
    dense_sites = [model.apply(ref_vars, p, mutable=[CARRY_SITES])[1].get(CARRY_SITES, {})
                   for p in probes]
    small_sites = small.apply(with_convs, x, mutable=[CARRY_SITES])[1].get(CARRY_SITES, {})
    dense_flat = [flax.traverse_util.flatten_dict(flax.core.unfreeze(d)) for d in dense_sites]
    for key, ((_, dst, present),) in flax.traverse_util.flatten_dict(flax.core.unfreeze(small_sites)).items():
        missing = 1.0 - np.asarray(present)
        if not missing.any():
            continue
        vals = [np.asarray(d[key][0][0])[..., np.asarray(dst)] * missing for d in dense_flat]
        value = _check_constant("/".join(key), vals)
        if np.any(value):
            carry[key[:-1] + (key[-1] + "_const",)] = value
    out = _with_carry(small_vars, carry)
    ref = model.apply(ref_vars, probes[1])
    got = np.asarray(small.apply(out, probes[1]), np.float32)
    # a missing hook costs O(1); bf16 compute rounds at ~1e-2
    tol = max(1e-4, 16 * float(jnp.finfo(ref.dtype).eps))
    ref = np.asarray(ref, np.float32)
    err = float(np.max(np.abs(ref - got)))
    if err > tol * max(1.0, float(np.max(np.abs(ref)))):
        raise ValueError(f"keep_constants: the compact {type(small).__name__} differs from the "
                         f"masked model by up to {err:.3g}: the model has no `carried` hook where "
                         "a removed channel's constant flows (see jaxprune.models.common.carried)")
    return out


def _float32(model: Any) -> Any:
    """``model`` computing in float32 (a bundled model with another ``dtype`` is cloned)."""
    dtype = getattr(model, "dtype", None)
    return model if dtype is None or jnp.dtype(dtype) == jnp.float32 else model.clone(dtype=jnp.float32)


def _with_carry(variables: Any, carry: Mapping[tuple[str, ...], np.ndarray]) -> Any:
    """``variables`` with ``carry`` (path tuple -> array) as its ``'carry'`` collection."""
    out = {k: v for k, v in dict(variables).items() if k != CARRY}
    if carry:
        out[CARRY] = flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                                        for k, v in carry.items()})
    return out


def _compose(old: Mapping[str, tuple[int, ...]], new: Mapping[str, tuple[int, ...]]
             ) -> dict[str, tuple[int, ...]]:
    """Keeps indices in the ORIGINAL numbering when an already compact model is compacted."""
    out = dict(old)
    for k, idx in new.items():
        out[k] = tuple(old[k][i] for i in idx) if k in old else tuple(idx)
    return out


def axis_keep_to_json(axis_keep: AxisKeep) -> dict[str, dict[str, list[int]]]:
    """JSON-safe form of a surgery (for checkpoint metadata)."""
    return {"/".join(p): {str(a): [int(i) for i in idx] for a, idx in v.items()}
            for p, v in axis_keep.items()}


def axis_keep_from_json(data: Mapping[str, Mapping[str, list[int]]]) -> AxisKeep:
    return {tuple(p.split("/")): {int(a): np.asarray(idx, np.int64) for a, idx in v.items()}
            for p, v in data.items()}
