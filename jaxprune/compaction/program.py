"""Compaction of any traced program: the model's own jaxpr re-evaluated without the pruned channels.

`jaxprune.compaction.bundled` rebuilds the bundled models through their ``keep_out``/``keep_in``
fields. This module does it for any function that `jaxprune.graph.trace` follows (a Linen
``model.apply``, an NNX model's call), with no model-specific code: the function is traced to
a jaxpr and every equation is evaluated on the narrowed arrays by the ``narrow`` half of its
primitive's rule (`jaxprune.graph.rules`, the registry the trace uses), with its hard-coded
widths, slices, pads and channel counts rewritten to the kept positions:

- elementwise ops (a primitive registered ``'elementwise'`` too), broadcasts, one-to-one
  reshapes, transposes, reductions and pooling over unpruned axes, convolutions (dense and
  depthwise: ``feature_group_count`` becomes the kept count), ``dot_general``,
  ``concatenate``, ``split``, ``slice``, ``pad`` and ``rev`` run narrow;
- any other primitive (a gather, a flatten that merges channels with space, an iota, a
  primitive registered with an axis-pairs function) runs at full width on its operands
  scattered back with zeros and its results are sliced to their kept positions: exact, but not
  faster;
- jit, custom_jvp/custom_vjp and remat calls are inlined (their custom derivatives become the
  autodiff of their primal), scan/cond/while bodies become ``lax.scan``/``lax.switch``/
  ``lax.while_loop`` of narrowed bodies.

Where two operands of an elementwise op keep different channels (the full-width residual stream
of the ``'scatter'`` policy), the operand's missing channels are zeros: what the hard-masked
model's pruned branch emits. `compact_program` checks the result against the masked model on a
sample input and refuses (ValueError) a program where that is not exact.

The plan (the kept positions of every channel axis of every equation) is recorded per input
shape: at each new shape the program is retraced (``jax.make_jaxpr``, cached) and walked by the
tracer again, and the pruned channels are found from the masks through the variables' leaves,
whose channels do not depend on the batch size. So a program whose equations change with the
batch size (``jnp.broadcast_to(cls, (B, 1, D))`` emits no equation at batch 1) compacts at any
batch size and runs at any other, under ``jit`` and ``grad``, and exports (``jax.export``) at
concrete shapes. (Not at symbolic shapes: the dimension arithmetic of a symbolic batch adds
equations to the program.)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.export  # noqa: F401  (jax < 0.8 does not import the submodule by itself)
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.compaction.plan import compact_variables, refuse_empty, surgery
from jaxprune.graph import Body, PruningGraph, leaf_paths, rule_for, run_tracer
from jaxprune.graph.narrow import Keep, PlanBody, bind, full_width, move_all, narrowed, take
from jaxprune.graph.tracer import CALL_PARAMS
from jaxprune.masked_norm import masked_apply
from jaxprune.masks import apply_masks, binarize, validate_masks


def _keeps(ids: list | None, pruned: np.ndarray, comp: np.ndarray) -> Keep | None:
    if ids is None:
        return None
    out = []
    for a in ids:
        dead = pruned[comp[a]] if len(a) else np.zeros(0, bool)
        out.append(np.flatnonzero(~dead) if dead.any() else None)
    return tuple(out)


def _plan(body: Body, pruned: np.ndarray, comp: np.ndarray) -> PlanBody:
    k = lambda ids: _keeps(ids, pruned, comp)  # noqa: E731
    visits = [(v.eqn.primitive.name, [k(i) for i in v.ins], [k(o) for o in v.outs],
               [_plan(b, pruned, comp) for b in v.bodies]) for v in body.visits]
    return PlanBody([k(i) for i in body.consts], [k(i) for i in body.ins],
                     [k(o) for o in body.outs], visits)


# ----------------------------------------------------------------------------- evaluation

class ProgramError(ValueError):
    """The program traced at a new input shape differs from the one the plan was built on."""


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_body(jaxpr: Any, consts: Sequence[Any], plan: PlanBody, args: Sequence[Any]) -> list:
    """Evaluates ``jaxpr`` (its constvars = ``consts`` at full width) on narrowed ``args``."""
    env: dict = {}
    for v, c, k in zip(getattr(jaxpr, "constvars", ()), consts, plan.consts):
        env[v] = take(c, k)
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    if len(jaxpr.eqns) != len(plan.visits):
        raise ProgramError(f"the program has {len(jaxpr.eqns)} equations here and "
                           f"{len(plan.visits)} when it was compacted")
    for eqn, (name, kin, kout, bodies) in zip(jaxpr.eqns, plan.visits):
        if eqn.primitive.name != name:
            raise ProgramError(f"the program runs {eqn.primitive.name!r} where it ran {name!r} when "
                               "it was compacted (it branches on the input shape)")
        vals = [_read(env, v) for v in eqn.invars]
        outs = _eval_eqn(eqn, vals, kin, kout, bodies)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [_read(env, v) for v in jaxpr.outvars]


def _sub(eqn: Any) -> tuple[Any, list]:
    for p in CALL_PARAMS:
        if p in eqn.params:
            sub = eqn.params[p]
            return (sub.jaxpr, list(sub.consts)) if hasattr(sub, "jaxpr") else (sub, [])
    raise AssertionError("internal: no sub-jaxpr")


def _eval_eqn(eqn, vals, kin, kout, bodies) -> list:
    """One equation on narrowed operands, by its primitive's rule (`jaxprune.graph.rules`)."""
    rule = rule_for(eqn.primitive.name)
    if rule is not None and rule.bodies:  # scan, cond, while
        return rule.narrow(eqn, vals, kin, kout, bodies, _eval_body)
    if bodies:  # jit, custom_jvp/vjp, remat: inlined
        inner, consts = _sub(eqn)
        res = _eval_body(inner, consts, bodies[0], vals)
        return [move_all(r, kb, ko, ov.aval.shape)
                for r, kb, ko, ov in zip(res, bodies[0].outs, kout, eqn.outvars)]
    if not any(narrowed(k) for k in list(kin) + list(kout)):
        return bind(eqn, vals, eqn.params)
    if rule is not None and rule.narrow is not None:
        out = rule.narrow(eqn, vals, kin, kout)
        if out is not None:
            return out
    return full_width(eqn, vals, kin, kout)


# ----------------------------------------------------------------------------- the program

class CompactProgram:
    """``fn(variables, *args)`` with the pruned channels removed: call it with the compact
    variables (`compact_program`'s); outputs are narrowed where their channels were pruned.

    Jittable and differentiable; ``jax.export`` exports it at concrete input shapes (`export`).
    Retraces ``fn`` and records its plan (`plan_for`) once per input shape and dtype.
    """

    def __init__(self, fn: Callable[..., Any], dense_specs: Any, masks: Mapping[str, Any],
                 graph: PruningGraph, small_specs: Any):
        self.fn = fn
        self.dense_specs = dense_specs  # variables pytree of ShapeDtypeStructs (dense)
        self.masks = {k: np.asarray(v) for k, v in masks.items()}
        self.graph = graph
        self.small_specs = small_specs
        self._cache: dict = {}

    def plan_for(self, args: Sequence[Any]) -> PlanBody:
        """The plan of ``fn`` traced at the shapes of ``args`` (recorded once per shape)."""
        return self._traced(args)[2]

    def _traced(self, args: Sequence[Any]) -> tuple:
        flat_args, args_def = jax.tree_util.tree_flatten(tuple(args))
        key = (args_def, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in flat_args))
        if key not in self._cache:
            dense_flat, dense_def = jax.tree_util.tree_flatten(self.dense_specs)
            specs = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tuple(args))

            def flat_fn(flat, *a):
                return self.fn(jax.tree_util.tree_unflatten(dense_def, flat), *a)

            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(dense_flat, *specs)
            plan = record_plan(self.fn, self.dense_specs, self.masks, self.graph, specs)
            self._cache[key] = (closed, jax.tree_util.tree_structure(out_shape), plan)
        return self._cache[key]

    def __call__(self, variables: Any, *args: Any) -> Any:
        flat_small, treedef = jax.tree_util.tree_flatten(variables)
        dense_def = jax.tree_util.tree_structure(self.dense_specs)
        if treedef != dense_def:
            raise ValueError(f"variables have the structure {treedef}, expected {dense_def}")
        for x, s in zip(flat_small, jax.tree_util.tree_leaves(self.small_specs)):
            if tuple(np.shape(x)) != tuple(s.shape):
                raise ValueError(f"a compact variable has shape {tuple(np.shape(x))}, expected "
                                 f"{tuple(s.shape)} (pass the compact variables)")
        closed, out_def, plan = self._traced(args)
        flat_args = jax.tree_util.tree_leaves(args)
        outs = _eval_body(closed.jaxpr, closed.consts, plan, list(flat_small) + list(flat_args))
        return jax.tree_util.tree_unflatten(out_def, outs)


def record_plan(fn: Callable[..., Any], variables: Any, masks: Mapping[str, Any],
                graph: PruningGraph, args: Sequence[Any]) -> PlanBody:
    """The kept positions of every channel axis of every equation of ``fn(variables, *args)``
    traced at the shapes of ``args`` (the whole batch): the channels of each group's lead
    filter leaf whose mask is 0 are pruned, with every channel the trace links to them."""
    run = run_tracer(fn, variables, args, graph.residual, per_example=False, record=True)
    n_comp = int(run.comp.max()) + 1 if len(run.comp) else 0
    pruned = np.zeros(n_comp, bool)
    index = {p: i for i, p in enumerate(run.paths)}
    for name, g in graph.groups.items():
        dead = np.flatnonzero(np.asarray(masks[name]) == 0)
        if not len(dead):
            continue
        lead = g.filters()[0]
        if lead.path not in index:
            raise ValueError(f"{lead.path} (group {name!r}) is not a leaf of these variables")
        ids = run.leaf_ids[index[lead.path]][lead.axis]
        pruned[run.comp[ids[lead.index[dead, 0]]]] = True
    return _plan(run.body, pruned, run.comp)


def build_program(fn: Callable[..., Any], variables: Any, masks: Mapping[str, Any],
                  graph: PruningGraph, sample_args: Sequence[Any]) -> CompactProgram:
    """The `CompactProgram` of ``fn`` (``variables`` and ``sample_args`` may be
    ``jax.ShapeDtypeStruct``s: only their shapes are used), its plan recorded at the shapes of
    ``sample_args`` (and at any other shape it is called with); see `compact_program`."""
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    dense = jax.tree_util.tree_map(spec, variables)
    axis_keep = surgery(masks, graph)[0]
    flat, treedef = jax.tree_util.tree_flatten(dense)
    shrunk = []
    for leaf, path in zip(flat, leaf_paths(dense)):
        shape = list(leaf.shape)
        for ax, idx in axis_keep.get(path, {}).items():
            shape[ax] = len(idx)
        shrunk.append(jax.ShapeDtypeStruct(tuple(shape), leaf.dtype))
    small = jax.tree_util.tree_unflatten(treedef, shrunk)
    program = CompactProgram(fn, dense, masks, graph, small)
    program.plan_for(sample_args)
    return program


def compact_program(fn: Callable[..., Any], variables: Any, masks: Mapping[str, Any],
                    graph: PruningGraph, sample_args: Sequence[Any], *, check: bool = True,
                    ) -> tuple[CompactProgram, Any]:
    """Compacts any function `jaxprune.graph.trace` follows: returns ``(program, small_vars)``.

    Args:
      fn: ``fn(variables, *args)``, the function the graph was traced from (inference mode;
        another mode of the same model, e.g. Linen's ``mutable=['batch_stats']``, also works).
      variables: the dense variables (pruned channels need not be zero).
      masks: group name -> ``[C]`` 0/1 (the final hard masks).
      graph: ``trace(fn, variables, *sample_args, residual=...)``.
      sample_args: example inputs; with ``check`` the compact program is compared with the
        hard-masked dense one on them (ValueError beyond a relative 1e-4).

    ``program(small_vars, *args)`` equals ``fn(apply_masks(variables, masks, graph), *args)``
    (`masked_apply` of ``fn`` with ``masks`` when ``graph.normalised``: sums over those channels
    count the kept ones).
    """
    validate_masks(masks, graph)
    refuse_empty(masks)
    program = build_program(fn, variables, masks, graph, sample_args)
    small, _ = compact_variables(variables, masks, graph)
    if check:
        hard = binarize(masks)
        masked = apply_masks(variables, hard, graph)
        # jitted: one compilation each, not one per primitive and narrowed shape
        ref = jax.tree_util.tree_leaves(jax.jit(
            lambda v, m, *a: masked_apply(fn, graph)(v, *a, masks=m))(masked, hard, *sample_args))
        got = jax.tree_util.tree_leaves(jax.jit(program)(small, *sample_args))
        for r, o in zip(ref, got):
            r, o = np.asarray(r, np.float32), np.asarray(o, np.float32)
            if r.shape != o.shape:
                raise ValueError(f"compact output has shape {o.shape}, the masked model's "
                                 f"{r.shape}: an output axis lost channels")
            err = float(np.max(np.abs(r - o))) if r.size else 0.0
            scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
            if err > 1e-4 * scale:
                raise ValueError(f"the compact program differs from the masked model by {err:.3g} "
                                 "on the sample input: a pruned channel's value reaches a kept "
                                 "output through an op that zero-filling cannot reproduce")
    return program, small


def plain_outputs(tree: Any) -> Any:
    """``tree`` with every node that is not a dict, list, tuple or None (a dataclass such as a
    ``flax.struct.dataclass`` or transformers' ``ModelOutput``, a namedtuple, a FrozenDict)
    turned into a dict of its children keyed by their field names: a pytree that
    ``jax.export`` serializes and that loads without the type's Python code."""
    if tree is None or type(tree) in (dict, list, tuple):
        if isinstance(tree, dict):
            return {k: plain_outputs(v) for k, v in tree.items()}
        return None if tree is None else type(tree)(plain_outputs(v) for v in tree)
    children, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    if len(children) == 1 and children[0][1] is tree:  # a leaf
        return tree
    return {_key_name(kp[0]): plain_outputs(c) for kp, c in children}


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def export(program: CompactProgram, small_vars: Any, *args: Any) -> Any:
    """``jax.export.export`` of ``program`` at the shapes of ``args`` (arrays or
    ``jax.ShapeDtypeStruct``s of concrete shapes): a `jax.export.Exported` whose
    ``call(small_vars, *args)`` runs without the model's Python code (``serialize()`` it).
    Its outputs are `plain_outputs` of the program's (a dataclass output becomes a dict)."""
    spec = lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(  # noqa: E731
        np.shape(a), jnp.result_type(a))
    run = jax.jit(lambda v, *a: plain_outputs(program(v, *a)))
    return jax.export.export(run)(jax.tree_util.tree_map(spec, small_vars),
                                  *jax.tree_util.tree_map(spec, args))
