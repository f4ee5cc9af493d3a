"""Masked normalisation: a model's apply whose sums over channels count the kept channels only.

A LayerNorm, RMSNorm, GroupNorm (over each group's channels: `jaxprune.graph.tracer`'s
``_group_norm_splits``) or any mean over the channel axis sums over channels; zeroing a pruned
channel's weights leaves it in that sum's count, so the masked model and the compact one (which
no longer has the channel) would compute different statistics. `trace(..., norms='masked')`
lists the groups summed over in ``PruningGraph.normalised``; `masked_apply` turns the model's
apply into the function those groups' masks define, without changing the model's code: the
apply is traced to a jaxpr (per input shape, cached) and re-evaluated with every ``reduce_sum``
over a channel axis of a normalised group replaced by

    sum(x * m) * (n / sum(m))          (m: the axis' mask, 1 at positions of no group)

so that a mean (the sum divided by the full count ``n``) is the mean over the kept channels.
Compaction narrows the same sums (`jaxprune.graph.narrow.reduce_sum`: the sum of the kept
positions times ``n / kept``): with 0/1 masks the masked apply and the compact model are one
function. With all-ones masks every factor is exactly 1: evaluated op by op the result is the
plain model's, bitwise (under ``jit`` XLA may fuse the extra multiply into the reduction and sum
in another order: float32 rounding differences). A channel whose mask comes back to 1 (SFP's
re-selection) is counted again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune.graph import Body, PruningGraph, rule_for, run_tracer
from jaxprune.graph.tracer import CALL_PARAMS


@dataclasses.dataclass(frozen=True, eq=False)
class _Sum:
    """One masked sum: per reduced channel axis, ``(axis, size, [(group, positions, channels)])``."""

    axes: tuple


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or isinstance(x, jax.core.Tracer)


def _plan(body: Body, comp: np.ndarray, owner: Mapping[int, tuple[str, int]]) -> list:
    """Per equation of ``body``: a `_Sum`, a sub-plan (a call holding masked sums), or None."""
    plan: list = []
    for v in body.visits:
        name = v.eqn.primitive.name
        subs = [_plan(b, comp, owner) for b in v.bodies]
        has = any(_has_sites(s) for s in subs)
        rule = rule_for(name)
        if has and (rule is not None and rule.bodies):
            raise ValueError(f"a sum over normalised channels inside '{name}' (a loop or branch) "
                             "is not supported by masked_apply; trace with norms='refuse'")
        if has:
            plan.append(subs[0])
            continue
        if name != "reduce_sum":
            plan.append(None)
            continue
        axes = []
        for a in sorted({ax % len(v.ins[0]) for ax in v.eqn.params["axes"]}):
            ids = v.ins[0][a]
            hits: dict[str, tuple[list, list]] = {}
            for pos, c in enumerate(comp[ids]):
                if int(c) in owner:
                    g, ch = owner[int(c)]
                    hits.setdefault(g, ([], []))
                    hits[g][0].append(pos)
                    hits[g][1].append(ch)
            if hits:
                axes.append((a, len(ids), [(g, np.array(p), np.array(c)) for g, (p, c) in hits.items()]))
        plan.append(_Sum(tuple(axes)) if axes else None)
    return plan


def _has_sites(plan: list) -> bool:
    return any(isinstance(p, _Sum) or (isinstance(p, list) and _has_sites(p)) for p in plan)


def _masked_sum(eqn: Any, x: Any, site: _Sum, masks: Mapping[str, Any]) -> Any:
    """``sum(x * m) * prod(n / sum(m))`` over the reduced channel axes."""
    scale = None
    for axis, n, parts in site.axes:
        m = jnp.ones((n,), jnp.float32)
        for g, pos, ch in parts:
            m = m.at[pos].set(jnp.asarray(masks[g], jnp.float32)[ch])
        shape = [1] * x.ndim
        shape[axis] = n
        x = x * m.astype(x.dtype).reshape(shape)
        f = n / jnp.maximum(jnp.sum(m), jnp.finfo(jnp.float32).tiny)
        scale = f if scale is None else scale * f
    out = eqn.primitive.bind(x, **eqn.params)
    return out * scale.astype(out.dtype)


def _eval(jaxpr: Any, consts: list, plan: list, args: list, masks: Mapping[str, Any]) -> list:
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn, site in zip(jaxpr.eqns, plan):
        vals = [read(v) for v in eqn.invars]
        if isinstance(site, _Sum):
            outs = [_masked_sum(eqn, vals[0], site, masks)]
        elif isinstance(site, list):  # a call (jit, custom_jvp, remat) with masked sums: inlined
            sub = next(eqn.params[p] for p in CALL_PARAMS if p in eqn.params)
            inner, cs = (sub.jaxpr, list(sub.consts)) if hasattr(sub, "jaxpr") else (sub, [])
            outs = _eval(inner, cs, site, vals, masks)
        else:
            outs = _bind(eqn, vals)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: Any, vals: list) -> list:
    """``eqn`` applied to ``vals`` as `jax.core.eval_jaxpr` does (custom rules kept)."""
    got = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = got if isinstance(got, tuple) else ([], got)  # jax < 0.9: (subfuns, params)
    out = eqn.primitive.bind(*subfuns, *vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def masked_apply(apply_fn: Callable[..., Any], graph: PruningGraph) -> Callable[..., Any]:
    """``fn(variables, *args, masks=..., **kwargs)``: ``apply_fn(variables, *args, **kwargs)``
    with every sum over the channels of ``graph.normalised`` taken over the kept channels
    (module docstring). ``masks``: group name -> ``[C]`` (0/1, or soft values, which weight
    the channels); ``variables`` should be masked as usual (`jaxprune.masks.apply_masks`).

    Any call of ``apply_fn`` works (Linen's ``train=True, mutable=[...], rngs=...``): array
    arguments are traced, the others are static. Jittable and differentiable. For a graph
    without normalised groups ``fn`` is ``apply_fn`` itself (``masks`` ignored), so ordinary
    models run unchanged.

    Raises:
      ValueError: a normalised sum inside a loop or a branch (scan, while, cond).
    """
    if not graph.normalised:
        def plain(variables: Any, *args: Any, masks: Any = None, **kwargs: Any) -> Any:
            return apply_fn(variables, *args, **kwargs)

        return plain

    cache: dict = {}

    def fn(variables: Any, *args: Any, masks: Mapping[str, Any], **kwargs: Any) -> Any:
        leaves, tdef = jax.tree_util.tree_flatten((args, kwargs))
        dyn = [i for i, x in enumerate(leaves) if _is_array(x)]
        static = tuple((i, x if _hashable(x) else id(x)) for i, x in enumerate(leaves)
                       if i not in set(dyn))
        flat_vars, vdef = jax.tree_util.tree_flatten(variables)
        spec = lambda a: jax.ShapeDtypeStruct(  # noqa: E731
            np.shape(a), a.dtype if hasattr(a, "dtype") else jnp.result_type(a))
        dyn_specs = [spec(leaves[i]) for i in dyn]
        key = (tdef, static, vdef, tuple((s.shape, str(s.dtype)) for s in dyn_specs),
               tuple((s.shape, str(s.dtype)) for s in map(spec, flat_vars)))

        if key not in cache:
            def call(v: Any, *d: Any) -> Any:
                ls = list(leaves)
                for i, x in zip(dyn, d):
                    ls[i] = x
                a, kw = jax.tree_util.tree_unflatten(tdef, ls)
                return apply_fn(v, *a, **kw)

            vspecs = jax.tree_util.tree_map(spec, variables)
            run = run_tracer(call, vspecs, dyn_specs, graph.residual, per_example=False,
                             record=True)
            out_def = jax.tree_util.tree_structure(jax.eval_shape(call, vspecs, *dyn_specs))
            index = {p: i for i, p in enumerate(run.paths)}
            owner: dict[int, tuple[str, int]] = {}
            for name in graph.normalised:
                lead = graph.groups[name].filters()[0]
                ids = run.leaf_ids[index[lead.path]][lead.axis]
                for ch, row in enumerate(lead.index):
                    owner[int(run.comp[ids[row[0]]])] = (name, ch)
            cache[key] = (run.closed, out_def, _plan(run.body, run.comp, owner))
        closed, out_def, plan = cache[key]
        outs = _eval(closed.jaxpr, list(closed.consts), plan,
                     list(flat_vars) + [leaves[i] for i in dyn], masks)
        return jax.tree_util.tree_unflatten(out_def, outs)

    return fn


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True
