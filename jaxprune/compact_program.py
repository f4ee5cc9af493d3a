"""Compaction of any traced program: the model's own jaxpr re-evaluated without the pruned channels.

`compaction.compact` rebuilds the bundled models through their ``keep_out``/``keep_in`` fields.
This module does it for any function that `jaxprune.graph.trace` follows (a Linen
``model.apply``, an NNX model's call), with no model-specific code: the function is traced to
a jaxpr and every equation is evaluated on the narrowed arrays, with its hard-coded widths,
slices, pads and channel counts rewritten to the kept positions:

- elementwise ops, broadcasts, one-to-one reshapes, transposes, reductions and pooling over
  unpruned axes, convolutions (dense and depthwise: ``feature_group_count`` becomes the kept
  count), ``dot_general``, ``concatenate``, ``split``, ``slice``, ``pad`` and ``rev`` run
  narrow;
- any other primitive (a gather, a flatten that merges channels with space, an iota, a user
  primitive) runs at full width on its operands scattered back with zeros and its results are
  sliced to their kept positions: exact, but not faster;
- jit, custom_jvp/custom_vjp and remat calls are inlined (their custom derivatives become the
  autodiff of their primal), scan/cond/while bodies become ``lax.scan``/``lax.switch``/
  ``lax.while_loop`` of narrowed bodies.

Where two operands of an elementwise op keep different channels (the full-width residual stream
of the ``'scatter'`` policy), the operand's missing channels are zeros: what the hard-masked
model's pruned branch emits. `compact_program` checks the result against the masked model on a
sample input and refuses (ValueError) a program where that is not exact.

The program is retraced at each new input shape (``jax.make_jaxpr``, cached) and paired,
equation by equation, with the plan recorded at build time, so the compact function runs at any
batch size, under ``jit`` and ``grad``, and exports (``jax.export``) at concrete shapes. (Not at
symbolic shapes: the dimension arithmetic of a symbolic batch adds equations to the program.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.export  # noqa: F401  (jax < 0.8 does not import the submodule by itself)
import jax.numpy as jnp
import numpy as np

from jaxprune.graph import Body, PruningGraph, leaf_paths, run_tracer
from jaxprune.models.common import gather_channels

Keep = tuple  # per axis: np.ndarray of kept positions, or None (every position kept)


def _keeps(ids: list | None, pruned: np.ndarray, comp: np.ndarray) -> Keep | None:
    if ids is None:
        return None
    out = []
    for a in ids:
        dead = pruned[comp[a]] if len(a) else np.zeros(0, bool)
        out.append(np.flatnonzero(~dead) if dead.any() else None)
    return tuple(out)


@dataclasses.dataclass(eq=False)
class _PlanBody:
    consts: list  # Keep per constvar
    ins: list
    outs: list
    visits: list  # (primitive name, in keeps, out keeps, [bodies])


def _plan(body: Body, pruned: np.ndarray, comp: np.ndarray) -> _PlanBody:
    k = lambda ids: _keeps(ids, pruned, comp)  # noqa: E731
    visits = [(v.eqn.primitive.name, [k(i) for i in v.ins], [k(o) for o in v.outs],
               [_plan(b, pruned, comp) for b in v.bodies]) for v in body.visits]
    return _PlanBody([k(i) for i in body.consts], [k(i) for i in body.ins],
                     [k(o) for o in body.outs], visits)


def _narrowed(keep: Keep | None) -> bool:
    return keep is not None and any(a is not None for a in keep)


# ----------------------------------------------------------------------------- array moves

def take(x: Any, keep: Keep | None) -> Any:
    """``x`` restricted to the kept positions of every axis."""
    if not _narrowed(keep):
        return x
    for ax, idx in enumerate(keep):
        if idx is not None:
            x = jnp.take(x, jnp.asarray(idx, jnp.int32), axis=ax)
    return x


def _move(x: Any, axis: int, src: np.ndarray | None, dst: np.ndarray | None, n: int) -> Any:
    """Axis ``axis`` of ``x`` from kept positions ``src`` to kept positions ``dst`` of an axis of
    full size ``n`` (None: all ``n``); positions of ``dst`` missing from ``src`` are zeros
    (`jaxprune.models.common.gather_channels`: a one-hot matmul, exact for finite ``x``)."""
    if src is None and dst is None:
        return x
    s = np.arange(n) if src is None else np.asarray(src)
    d = np.arange(n) if dst is None else np.asarray(dst)
    if len(s) == len(d) and np.array_equal(s, d):
        return x
    pos = np.searchsorted(s, d)
    hit = (pos < len(s)) & (s[np.minimum(pos, len(s) - 1)] == d) if len(s) else np.zeros(len(d), bool)
    return gather_channels(x, np.where(hit, pos, len(s)), axis=axis)


def _expand(x: Any, keep: Keep | None, shape: Sequence[int]) -> Any:
    """``x`` back at full width, zeros at the removed positions."""
    if not _narrowed(keep):
        return x
    for ax, idx in enumerate(keep):
        if idx is not None:
            x = _move(x, ax, idx, None, shape[ax])
    return x


def _narrow_shape(aval: Any, keep: Keep | None) -> tuple:
    shape = tuple(aval.shape)
    if keep is None:
        return shape
    return tuple(len(k) if k is not None else d for k, d in zip(keep, shape))


# ----------------------------------------------------------------------------- evaluation

class ProgramError(ValueError):
    """The program traced at a new input shape differs from the one the plan was built on."""


def _read(env: dict, v: Any) -> Any:
    from jax.extend import core as jcore

    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_body(jaxpr: Any, consts: Sequence[Any], plan: _PlanBody, args: Sequence[Any]) -> list:
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
    for p in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if p in eqn.params:
            sub = eqn.params[p]
            return (sub.jaxpr, list(sub.consts)) if hasattr(sub, "jaxpr") else (sub, [])
    raise AssertionError("internal: no sub-jaxpr")


def _eval_eqn(eqn, vals, kin, kout, bodies) -> list:
    name = eqn.primitive.name
    if name == "scan":
        return _scan(eqn, vals, kin, kout, bodies)
    if name == "cond":
        return _cond(eqn, vals, kin, kout, bodies)
    if name == "while":
        return _while(eqn, vals, kin, kout, bodies)
    if bodies:  # jit, custom_jvp/vjp, remat: inlined
        inner, consts = _sub(eqn)
        res = _eval_body(inner, consts, bodies[0], vals)
        return [_move_all(r, kb, ko, ov.aval.shape)
                for r, kb, ko, ov in zip(res, bodies[0].outs, kout, eqn.outvars)]
    if not any(_narrowed(k) for k in list(kin) + list(kout)):
        return _bind(eqn, vals, eqn.params)
    rule = _NARROW.get(name)
    if rule is None and name in _ELEMENTWISE:
        rule = _elementwise
    if rule is not None:
        out = rule(eqn, vals, kin, kout)
        if out is not None:
            return out
    return _full_width(eqn, vals, kin, kout)


def _bind(eqn, vals, params) -> list:
    out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _move_all(x, src: Keep | None, dst: Keep | None, shape) -> Any:
    if not (_narrowed(src) or _narrowed(dst)):
        return x
    src = src or (None,) * len(shape)
    dst = dst or (None,) * len(shape)
    for ax in range(len(shape)):
        x = _move(x, ax, src[ax], dst[ax], shape[ax])
    return x


def _full_width(eqn, vals, kin, kout) -> list:
    """Any primitive: run it on the operands at full width (zeros at removed positions), then
    slice its results."""
    full = [_expand(x, k, v.aval.shape) if k is not None else x
            for x, k, v in zip(vals, kin, eqn.invars)]
    return [take(o, k) for o, k in zip(_bind(eqn, full, eqn.params), kout)]


# -- narrow rules: return the results, or None to fall back to `_full_width`

def _elementwise(eqn, vals, kin, kout):
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    xs = []
    for x, k, v in zip(vals, kin, eqn.invars):
        shape = getattr(v.aval, "shape", ())
        if k is not None and len(shape) == len(out.shape):
            for ax, (s, d) in enumerate(zip(shape, out.shape)):
                if s == d:
                    x = _move(x, ax, k[ax], ko[ax], d)
                elif k[ax] is not None:
                    return None
        xs.append(x)
    return _bind(eqn, xs, eqn.params)


def _broadcast_in_dim(eqn, vals, kin, kout):
    if len(eqn.invars) != 1:
        return None
    (x,), (k,), out = vals, kin, eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if eqn.invars[0].aval.shape[i] == out.shape[d]:
            x = _move(x, i, k[i], ko[d], out.shape[d])
        elif k[i] is not None:
            return None
    return _bind(eqn, [x], dict(eqn.params, shape=_narrow_shape(out, kout[0])))


def _reshape(eqn, vals, kin, kout):
    if eqn.params.get("dimensions") is not None or len(eqn.invars) != 1:
        return None
    shp_in, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval
    a = [i for i, d in enumerate(shp_in) if d != 1]
    b = [i for i, d in enumerate(out.shape) if d != 1]
    if [shp_in[i] for i in a] != [out.shape[j] for j in b]:
        return None  # merges or splits axes
    x, k = vals[0], kin[0]
    ko = kout[0] or (None,) * len(out.shape)
    for i, j in zip(a, b):
        x = _move(x, i, k[i], ko[j], shp_in[i])
    return _bind(eqn, [x], dict(eqn.params, new_sizes=_narrow_shape(out, kout[0])))


def _transpose(eqn, vals, kin, kout):
    x, k = vals[0], kin[0]
    ko = kout[0] or (None,) * len(k)
    shp = eqn.invars[0].aval.shape
    for i, p in enumerate(eqn.params["permutation"]):
        x = _move(x, p, k[p], ko[i], shp[p])
    return _bind(eqn, [x], eqn.params)


def _squeeze(eqn, vals, kin, kout):
    x, k = vals[0], kin[0]
    shp = eqn.invars[0].aval.shape
    dims = {d % len(shp) for d in eqn.params["dimensions"]}
    ko = kout[0] or (None,) * (len(shp) - len(dims))
    for j, i in enumerate([i for i in range(len(shp)) if i not in dims]):
        x = _move(x, i, k[i], ko[j], shp[i])
    return _bind(eqn, [x], eqn.params)


def _reduce(eqn, vals, kin, kout):
    x, k = vals[0], kin[0]
    axes = {a % len(k) for a in eqn.params["axes"]}
    if any(k[a] is not None for a in axes):
        return None
    shp = eqn.invars[0].aval.shape
    ko = kout[0] or (None,) * (len(shp) - len(axes))
    for j, i in enumerate([i for i in range(len(shp)) if i not in axes]):
        x = _move(x, i, k[i], ko[j], shp[i])
    return _bind(eqn, [x], eqn.params)


def _windowed(eqn, vals, kin, kout):
    p, k = eqn.params, kin[0]
    for ax, idx in enumerate(k):
        if idx is not None and not (p["window_dimensions"][ax] == 1 and p["window_strides"][ax] == 1
                                    and tuple(p["padding"][ax]) == (0, 0)):
            return None
    if kout[0] is None or any((a is None) != (b is None) or (a is not None and not np.array_equal(a, b))
                              for a, b in zip(k, kout[0])):
        return None
    return _bind(eqn, vals[:1], p)


def _conv(eqn, vals, kin, kout):
    p = eqn.params
    if p["batch_group_count"] != 1:
        return None
    lhs, rhs = vals
    kl = kin[0] or (None,) * lhs.ndim
    kr = kin[1] or (None,) * rhs.ndim
    ko = kout[0] or (None,) * lhs.ndim
    dn = p["dimension_numbers"]
    lb, lf = dn.lhs_spec[:2]
    ro, ri = dn.rhs_spec[:2]
    of = dn.out_spec[1]
    n_in = eqn.invars[0].aval.shape[lf]
    g = p["feature_group_count"]
    params = p
    if g == 1:
        lhs = _move(lhs, lf, kl[lf], kr[ri], n_in)
    elif eqn.invars[1].aval.shape[ri] == 1 and g == n_in == eqn.invars[1].aval.shape[ro]:
        lhs = _move(lhs, lf, kl[lf], kr[ro], n_in)  # depthwise: one filter per input channel
        params = dict(p, feature_group_count=int(lhs.shape[lf]))
    elif any(k is not None for k in (kl[lf], kr[ri], kr[ro])):
        return None
    out = _bind(eqn, [lhs, rhs], params)
    n_out = eqn.outvars[0].aval.shape[of]
    return [_move(out[0], of, kr[ro], ko[of], n_out)]


def _dot_general(eqn, vals, kin, kout):
    lhs, rhs = vals
    kl = kin[0] or (None,) * lhs.ndim
    kr = kin[1] or (None,) * rhs.ndim
    (lc, rc), (lbd, rbd) = eqn.params["dimension_numbers"]
    shp = eqn.invars[0].aval.shape
    for a, b in list(zip(lc, rc)) + list(zip(lbd, rbd)):
        lhs = _move(lhs, a, kl[a], kr[b], shp[a])
    out = _bind(eqn, [lhs, rhs], eqn.params)[0]
    want = _narrow_shape(eqn.outvars[0].aval, kout[0])
    return [out] if tuple(out.shape) == want else None


def _concatenate(eqn, vals, kin, kout):
    d = eqn.params["dimension"]
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    xs = []
    for x, k, v in zip(vals, kin, eqn.invars):
        k = k or (None,) * len(out.shape)
        for ax in range(len(out.shape)):
            if ax != d:
                x = _move(x, ax, k[ax], ko[ax], out.shape[ax])
        xs.append(x)
    res = _bind(eqn, xs, eqn.params)
    return res if tuple(res[0].shape) == _narrow_shape(out, kout[0]) else None


def _split(eqn, vals, kin, kout):
    axis = eqn.params["axis"]
    x, k = vals[0], kin[0]
    shp = eqn.invars[0].aval.shape
    outs = [o.aval for o in eqn.outvars]
    ko0 = kout[0] or (None,) * len(shp)
    for ax in range(len(shp)):
        if ax != axis:
            if any((ko or (None,) * len(shp))[ax] is not None and not np.array_equal(
                    (ko or (None,) * len(shp))[ax], ko0[ax]) for ko in kout):
                return None
            x = _move(x, ax, k[ax], ko0[ax], shp[ax])
    sizes = tuple(_narrow_shape(o, ko)[axis] for o, ko in zip(outs, kout))
    if sum(sizes) != x.shape[axis]:
        return None
    return _bind(eqn, [x], dict(eqn.params, sizes=sizes))


def _slice(eqn, vals, kin, kout):
    p = eqn.params
    x, k = vals[0], kin[0]
    shp = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(shp)
    strides = p["strides"] or (1,) * len(shp)
    start, limit, step = list(p["start_indices"]), list(p["limit_indices"]), list(strides)
    for ax in range(len(shp)):
        if k[ax] is None and ko[ax] is None:
            continue
        dst = np.arange(out.shape[ax]) if ko[ax] is None else ko[ax]
        x = _move(x, ax, k[ax], int(start[ax]) + dst * int(step[ax]), shp[ax])
        start[ax], limit[ax], step[ax] = 0, len(dst), 1
    return _bind(eqn, [x], dict(p, start_indices=tuple(start), limit_indices=tuple(limit),
                                strides=tuple(step)))


def _pad(eqn, vals, kin, kout):
    x, value = vals
    k = kin[0]
    shp = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(shp)
    config = list(eqn.params["padding_config"])
    for ax in range(len(shp)):
        if k[ax] is None and ko[ax] is None:
            continue
        lo, _, interior = (int(c) for c in config[ax])
        dst = np.arange(out.shape[ax]) if ko[ax] is None else np.asarray(ko[ax])
        off = dst - lo
        j = off // (interior + 1)
        real = (off >= 0) & (off % (interior + 1) == 0) & (j < shp[ax])
        s = np.arange(shp[ax]) if k[ax] is None else np.asarray(k[ax])
        pos = np.searchsorted(s, j)
        hit = real & (pos < len(s))
        if len(s):  # an input whose channels were all removed has no real position left
            hit &= s[np.minimum(pos, len(s) - 1)] == j
        if (real & ~hit).any():
            return None
        slot = list(x.shape)
        slot[ax] = 1
        x = jnp.concatenate([x, jnp.broadcast_to(jnp.asarray(value, x.dtype), slot)], axis=ax)
        x = jnp.take(x, jnp.asarray(np.where(hit, pos, len(s)), jnp.int32), axis=ax)
        config[ax] = (0, 0, 0)
    return _bind(eqn, [x, value], dict(eqn.params, padding_config=tuple(config)))


def _rev(eqn, vals, kin, kout):
    return _bind(eqn, vals, eqn.params)


# ----------------------------------------------------------------------------- control flow

def _scan(eqn, vals, kin, kout, bodies):
    p = eqn.params
    closed, plan = p["jaxpr"], bodies[0]
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]
    shapes = [v.aval.shape for v in eqn.invars]
    consts = [_move_all(c, kc, kb, s) for c, kc, kb, s in zip(consts, kin[:nc], plan.ins[:nc], shapes)]
    init = [_move_all(c, kc, kb, s) for c, kc, kb, s in
            zip(init, kin[nc:nc + ncar], plan.ins[nc:nc + ncar], shapes[nc:nc + ncar])]

    def body(carry, x):
        res = _eval_body(closed.jaxpr, closed.consts, plan, list(consts) + list(carry) + list(x))
        carry_out = [_move_all(r, kb, ki, ov.aval.shape) for r, kb, ki, ov in
                     zip(res[:ncar], plan.outs[:ncar], plan.ins[nc:nc + ncar], closed.jaxpr.outvars)]
        return carry_out, res[ncar:]

    carry, ys = jax.lax.scan(body, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"])
    outs = list(carry) + list(ys)
    inner = list(plan.ins[nc:nc + ncar]) + [None if k is None else (None,) + tuple(k)
                                             for k in plan.outs[ncar:]]
    return [_move_all(o, ki, ko, ov.aval.shape) for o, ki, ko, ov in zip(outs, inner, kout, eqn.outvars)]


def _cond(eqn, vals, kin, kout, bodies):
    index, ops = vals[0], vals[1:]

    def branch(closed, plan):
        def f(*args):
            a = [_move_all(x, ko, ki, v.aval.shape) for x, ko, ki, v in
                 zip(args, kin[1:], plan.ins, eqn.invars[1:])]
            res = _eval_body(closed.jaxpr, closed.consts, plan, a)
            return [_move_all(r, kb, ko, ov.aval.shape) for r, kb, ko, ov in
                    zip(res, plan.outs, kout, eqn.outvars)]
        return f

    fns = [branch(c, pl) for c, pl in zip(eqn.params["branches"], bodies)]
    return list(jax.lax.switch(index, fns, *ops))


def _while(eqn, vals, kin, kout, bodies):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cplan, bplan = bodies
    cconsts, bconsts, carry = vals[:nc], vals[nc:nc + nb], vals[nc + nb:]
    kcarry = kin[nc + nb:]
    shapes = [v.aval.shape for v in eqn.invars[nc + nb:]]

    def cond_fn(c):
        a = [_move_all(x, kc, ki, s) for x, kc, ki, s in zip(c, kcarry, cplan.ins[nc:], shapes)]
        return _eval_body(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts, cplan, list(cconsts) + a)[0]

    def body_fn(c):
        a = [_move_all(x, kc, ki, s) for x, kc, ki, s in zip(c, kcarry, bplan.ins[nb:], shapes)]
        res = _eval_body(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts, bplan, list(bconsts) + a)
        return [_move_all(r, kb, kc, s) for r, kb, kc, s in zip(res, bplan.outs, kcarry, shapes)]

    out = jax.lax.while_loop(cond_fn, body_fn, list(carry))
    return [_move_all(o, kc, ko, s) for o, kc, ko, s in zip(out, kcarry, kout, shapes)]


_ELEMENTWISE = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "sqrt",
    "rsqrt", "cbrt", "square", "integer_pow", "convert_element_type", "copy", "copy_p", "erf",
    "erfc", "erf_inv", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "floor", "ceil", "round", "is_finite", "not", "reduce_precision", "real",
    "imag", "conj", "stop_gradient", "pow", "add", "sub", "mul", "div", "max", "min", "atan2",
    "rem", "and", "or", "xor", "ne", "eq", "gt", "ge", "lt", "le", "select_n", "clamp",
    "nextafter", "add_any", "logaddexp", "optimization_barrier",
}
_NARROW: dict[str, Callable] = {
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "transpose": _transpose,
    "squeeze": _squeeze, "conv_general_dilated": _conv, "dot_general": _dot_general,
    "concatenate": _concatenate, "split": _split, "slice": _slice, "pad": _pad, "rev": _rev,
    **{n: _reduce for n in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                            "reduce_or", "reduce_xor", "argmax", "argmin")},
    **{n: _windowed for n in ("reduce_window_sum", "reduce_window_max", "reduce_window_min")},
}


# ----------------------------------------------------------------------------- the program

class CompactProgram:
    """``fn(variables, *args)`` with the pruned channels removed: call it with the compact
    variables (`compact_program`'s); outputs are narrowed where their channels were pruned.

    Jittable and differentiable; ``jax.export`` exports it at concrete or symbolic input shapes
    (`export`). Retraces ``fn`` once per input shape and dtype.
    """

    def __init__(self, fn: Callable[..., Any], dense_specs: Any, plan: _PlanBody,
                 small_specs: Any):
        self.fn = fn
        self.dense_specs = dense_specs  # variables pytree of ShapeDtypeStructs (dense)
        self.plan = plan
        self.small_specs = small_specs
        self._cache: dict = {}

    def __call__(self, variables: Any, *args: Any) -> Any:
        flat_small, treedef = jax.tree_util.tree_flatten(variables)
        dense_flat, dense_def = jax.tree_util.tree_flatten(self.dense_specs)
        if treedef != dense_def:
            raise ValueError(f"variables have the structure {treedef}, expected {dense_def}")
        for x, s in zip(flat_small, jax.tree_util.tree_leaves(self.small_specs)):
            if tuple(np.shape(x)) != tuple(s.shape):
                raise ValueError(f"a compact variable has shape {tuple(np.shape(x))}, expected "
                                 f"{tuple(s.shape)} (pass the compact variables)")
        flat_args, args_def = jax.tree_util.tree_flatten(args)
        key = (args_def, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in flat_args))
        if key not in self._cache:
            def flat_fn(flat, *a):
                return self.fn(jax.tree_util.tree_unflatten(dense_def, flat), *a)

            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(
                dense_flat, *jax.tree_util.tree_map(
                    lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), args))
            self._cache[key] = (closed, jax.tree_util.tree_structure(out_shape))
        closed, out_def = self._cache[key]
        outs = _eval_body(closed.jaxpr, closed.consts, self.plan, list(flat_small) + list(flat_args))
        return jax.tree_util.tree_unflatten(out_def, outs)


def build_program(fn: Callable[..., Any], variables: Any, masks: Mapping[str, Any],
                  graph: PruningGraph, sample_args: Sequence[Any]) -> CompactProgram:
    """The `CompactProgram` of ``fn`` (``variables`` and ``sample_args`` may be
    ``jax.ShapeDtypeStruct``s: only their shapes are used); see `compact_program`."""
    from jaxprune.compaction import surgery

    run = run_tracer(fn, variables, sample_args, graph.residual, per_example=True, record=True)
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
    return CompactProgram(fn, dense, _plan(run.body, pruned, run.comp), small)


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

    ``program(small_vars, *args)`` equals ``fn(apply_masks(variables, masks, graph), *args)``.
    """
    from jaxprune.compaction import compact_variables
    from jaxprune.masks import apply_masks, binarize, validate_masks

    validate_masks(masks, graph)
    empty = [g for g, m in masks.items() if not np.any(np.asarray(m) > 0)]
    if empty:
        raise ValueError(f"group {empty[0]!r} keeps no channel (an all-zero mask); keep at least one")
    program = build_program(fn, variables, masks, graph, sample_args)
    small, _ = compact_variables(variables, masks, graph)
    if check:
        masked = apply_masks(variables, binarize(masks), graph)
        ref = jax.tree_util.tree_leaves(fn(masked, *sample_args))
        got = jax.tree_util.tree_leaves(program(small, *sample_args))
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


def export(program: CompactProgram, small_vars: Any, *args: Any) -> Any:
    """``jax.export.export`` of ``program`` at the shapes of ``args`` (arrays or
    ``jax.ShapeDtypeStruct``s of concrete shapes): a `jax.export.Exported` whose
    ``call(small_vars, *args)`` runs without the model's Python code (``serialize()`` it)."""
    spec = lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(  # noqa: E731
        np.shape(a), jnp.result_type(a))
    return jax.export.export(jax.jit(program))(jax.tree_util.tree_map(spec, small_vars),
                                               *jax.tree_util.tree_map(spec, args))


# ----------------------------------------------------------------------------- models

def _spec(a: Any) -> jax.ShapeDtypeStruct:
    return a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))


@dataclasses.dataclass(eq=False)
class ProgramModel:
    """The compact form of a model without the bundled models' ``keep_out``/``keep_in``
    contract (`jaxprune.compaction.compact` returns it): ``apply(variables, *args, **kwargs)``
    as Linen's, with the compact variables; each set of keyword arguments (``train=True``,
    ``mutable=['batch_stats']``, ...) is compacted from the model's own program when first used.

    Attributes:
      call: ``call(dense_variables, *args, **kwargs)``, the original model (Linen
        ``module.apply``, or an NNX model's call over `jaxprune.pruner.nnx_variables`).
      dense_specs: the dense variables' shapes; masks, graph: what was compacted.
    """

    call: Callable[..., Any]
    dense_specs: Any
    masks: Mapping[str, np.ndarray]
    graph: PruningGraph
    _programs: dict = dataclasses.field(default_factory=dict)

    def program(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> CompactProgram:
        """The `CompactProgram` for these keyword arguments (built once)."""
        key = repr(sorted(kwargs.items()))
        if key not in self._programs:
            fn = lambda v, *a: self.call(v, *a, **kwargs)  # noqa: E731
            self._programs[key] = build_program(fn, self.dense_specs, self.masks, self.graph,
                                                jax.tree_util.tree_map(_spec, tuple(args)))
        return self._programs[key]

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.program(args, kwargs)(variables, *args)

    def export(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """`export` of ``apply`` at the shapes of ``args``."""
        return export(self.program(args, kwargs), variables, *args)


@dataclasses.dataclass(eq=False)
class ExportedModel:
    """A compact model restored from its ``jax.export`` artifact (`jaxprune.load` of a
    `ProgramModel`): ``apply(variables, x)`` runs without the model's Python code. The artifact
    has a fixed batch size; other batch sizes are padded to a multiple of it and run in chunks
    (outputs are batch-major; inference mode, where examples are independent)."""

    exported: Any
    batch_size: int

    def apply(self, variables: Any, x: Any) -> Any:
        n, b = int(x.shape[0]), self.batch_size
        if n == b:
            return self.exported.call(variables, x)
        m = -(-n // b)
        pad = jnp.concatenate([x, jnp.zeros((m * b - n,) + tuple(x.shape[1:]), x.dtype)]) if m * b > n else x
        chunks = pad.reshape((m, b) + tuple(x.shape[1:]))
        out = jax.lax.map(lambda c: self.exported.call(variables, c), chunks)
        return jax.tree_util.tree_map(lambda o: o.reshape((m * b,) + o.shape[2:])[:n], out)

    def variable_specs(self) -> Any:
        args, _ = jax.tree_util.tree_unflatten(self.exported.in_tree, self.exported.in_avals)
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args[0])
