"""How each primitive runs on narrowed operands: the compaction half of the rules.

A `Keep` says, per axis of an array, which positions of the original axis it still has
(``None``: all of them). Each narrow rule ``narrow(eqn, vals, kin, kout)`` evaluates the
equation on operands ``vals`` that hold the positions ``kin`` and returns results holding the
positions ``kout``, rewriting the primitive's hard-coded widths, slices, pads and channel
counts; it returns None where it cannot, and the primitive then runs at full width on operands
scattered back with zeros (`full_width`: exact, not faster). The control-flow rules also get
the `PlanBody` of each sub-jaxpr and ``run_body(jaxpr, consts, plan, args)``, the evaluator of
`jaxprune.compaction.program`. `jaxprune.graph.rules` says which rule each primitive uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph.links import reshape_blocks
from jaxprune.models.common import gather_channels

Keep = tuple  # per axis: np.ndarray of kept positions, or None (every position kept)


@dataclasses.dataclass(eq=False)
class PlanBody:
    """The kept positions of every variable of one (sub-)jaxpr, and of every equation's
    operands and results: what `jaxprune.compaction.program` evaluates narrow."""

    consts: list  # Keep per constvar
    ins: list
    outs: list
    visits: list  # (primitive name, in keeps, out keeps, [PlanBody of each sub-jaxpr])


def narrowed(keep: Keep | None) -> bool:
    """Whether ``keep`` drops a position of some axis."""
    return keep is not None and any(a is not None for a in keep)


# ----------------------------------------------------------------------------- array moves

def take(x: Any, keep: Keep | None) -> Any:
    """``x`` restricted to the kept positions of every axis."""
    if not narrowed(keep):
        return x
    for ax, idx in enumerate(keep):
        if idx is not None:
            x = jnp.take(x, jnp.asarray(idx, jnp.int32), axis=ax)
    return x


def move(x: Any, axis: int, src: np.ndarray | None, dst: np.ndarray | None, n: int) -> Any:
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


def expand(x: Any, keep: Keep | None, shape: Sequence[int]) -> Any:
    """``x`` back at full width, zeros at the removed positions."""
    if not narrowed(keep):
        return x
    for ax, idx in enumerate(keep):
        if idx is not None:
            x = move(x, ax, idx, None, shape[ax])
    return x


def narrow_shape(aval: Any, keep: Keep | None) -> tuple:
    """The shape of ``aval`` with each narrowed axis at its kept count."""
    shape = tuple(aval.shape)
    if keep is None:
        return shape
    return tuple(len(k) if k is not None else d for k, d in zip(keep, shape))


def bind(eqn, vals, params) -> list:
    """``eqn``'s primitive applied to ``vals`` with ``params``; always a list of results."""
    out = eqn.primitive.bind(*vals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def move_all(x, src: Keep | None, dst: Keep | None, shape) -> Any:
    """``x`` moved from kept positions ``src`` to ``dst`` on every axis (`move`)."""
    if not (narrowed(src) or narrowed(dst)):
        return x
    src = src or (None,) * len(shape)
    dst = dst or (None,) * len(shape)
    for ax in range(len(shape)):
        x = move(x, ax, src[ax], dst[ax], shape[ax])
    return x


def full_width(eqn, vals, kin, kout) -> list:
    """Any primitive: run it on the operands at full width (zeros at removed positions), then
    slice its results."""
    full = [expand(x, k, v.aval.shape) if k is not None else x
            for x, k, v in zip(vals, kin, eqn.invars)]
    return [take(o, k) for o, k in zip(bind(eqn, full, eqn.params), kout)]


# ----------------------------------------------------------------------------- narrow rules
# each returns the results, or None to run the primitive at full width (`full_width`)

def elementwise(eqn, vals, kin, kout):
    """Each operand moved to the result's kept positions on its same-size axes."""
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    xs = []
    for x, k, v in zip(vals, kin, eqn.invars):
        shape = getattr(v.aval, "shape", ())
        if k is not None and len(shape) == len(out.shape):
            for ax, (s, d) in enumerate(zip(shape, out.shape)):
                if s == d:
                    x = move(x, ax, k[ax], ko[ax], d)
                elif k[ax] is not None:
                    return None
        xs.append(x)
    return bind(eqn, xs, eqn.params)


def broadcast_in_dim(eqn, vals, kin, kout):
    """The operand moved to the result's kept positions; the target shape narrowed."""
    if len(eqn.invars) != 1:
        return None
    (x,), (k,), out = vals, kin, eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if eqn.invars[0].aval.shape[i] == out.shape[d]:
            x = move(x, i, k[i], ko[d], out.shape[d])
        elif k[i] is not None:
            return None
    return bind(eqn, [x], dict(eqn.params, shape=narrow_shape(out, kout[0])))


def reshape(eqn, vals, kin, kout):
    """A reshape with its new sizes narrowed: one-to-one axes moved to the result's kept
    positions; an axis split into several (``[.., C] -> [.., G, S]``: a GroupNorm's groups,
    attention heads) moved to the product of the parts' kept positions, and several axes
    merged into one (the way back) read as that product, then moved to the result's kept
    positions. Regrouping several axes into several runs at full width (None)."""
    if eqn.params.get("dimensions") is not None or len(eqn.invars) != 1:
        return None
    shp_in, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval
    x, k = vals[0], kin[0] or (None,) * len(shp_in)
    ko = kout[0] or (None,) * len(out.shape)
    if any(d == 1 and a is not None and len(a) != 1
           for d, a in list(zip(shp_in, k)) + list(zip(out.shape, ko))):
        return None  # a size-1 axis with no position left
    sizes = list(narrow_shape(out, kout[0]))
    merges = []
    for bi, bj in reshape_blocks(shp_in, out.shape):
        if len(bi) == 1 and len(bj) == 1:
            x = move(x, bi[0], k[bi[0]], ko[bj[0]], shp_in[bi[0]])
        elif len(bi) == 1 and len(bj) > 1:
            dst = _product([ko[j] for j in bj], [out.shape[j] for j in bj])
            x = move(x, bi[0], k[bi[0]], dst, shp_in[bi[0]])
        elif len(bi) > 1 and len(bj) == 1:
            src = _product([k[i] for i in bi], [shp_in[i] for i in bi])
            sizes[bj[0]] = out.shape[bj[0]] if src is None else len(src)
            merges.append((bj[0], src))
        elif bi and bj:
            return None
    y = bind(eqn, [x], dict(eqn.params, new_sizes=tuple(sizes)))[0]
    for ax, src in merges:
        y = move(y, ax, src, ko[ax], out.shape[ax])
    return [y]


def _product(keeps: Sequence[np.ndarray | None], sizes: Sequence[int]) -> np.ndarray | None:
    """The positions of an axis of size ``prod(sizes)`` (row-major) whose index along each part
    ``i`` (of size ``sizes[i]``) is kept by ``keeps[i]`` (None: all): ascending; None if every
    position is kept."""
    if all(a is None for a in keeps):
        return None
    grids = np.meshgrid(*[np.arange(n) if a is None else np.asarray(a, np.int64)
                          for a, n in zip(keeps, sizes)], indexing="ij")
    return np.ravel_multi_index([g.reshape(-1) for g in grids], tuple(sizes))


def transpose(eqn, vals, kin, kout):
    """The operand moved to the result's kept positions before the permutation."""
    x, k = vals[0], kin[0]
    ko = kout[0] or (None,) * len(k)
    shp = eqn.invars[0].aval.shape
    for i, p in enumerate(eqn.params["permutation"]):
        x = move(x, p, k[p], ko[i], shp[p])
    return bind(eqn, [x], eqn.params)


def squeeze(eqn, vals, kin, kout):
    """The kept axes moved to the result's kept positions."""
    shp = eqn.invars[0].aval.shape
    return _drop_axes(eqn, vals, kin, kout, {d % len(shp) for d in eqn.params["dimensions"]})


def reduce(eqn, vals, kin, kout):
    """A reduction over axes that kept every position."""
    axes = {a % len(kin[0]) for a in eqn.params["axes"]}
    if any(kin[0][a] is not None for a in axes):
        return None
    return _drop_axes(eqn, vals, kin, kout, axes)


def reduce_sum(eqn, vals, kin, kout):
    """A sum: over unpruned axes as `reduce`; over a narrowed channel axis (a statistic that
    `trace(norms='masked')` let through) the sum of the kept positions scaled by
    ``full / kept`` per narrowed axis, so that a mean (the sum divided by the full count)
    becomes the mean over the kept channels, as `jaxprune.masked_norm.masked_apply` computes it."""
    axes = {a % len(kin[0]) for a in eqn.params["axes"]}
    shp = eqn.invars[0].aval.shape
    scale = float(np.prod([shp[a] / len(kin[0][a]) for a in axes if kin[0][a] is not None]))
    out = _drop_axes(eqn, vals, kin, kout, axes)[0]  # the reduced axes stay narrow
    return [out if scale == 1.0 else out * np.asarray(scale, out.dtype)]


def _drop_axes(eqn, vals, kin, kout, dropped: set[int]):
    """An op that removes the axes ``dropped`` (squeeze, reduce): the other axes of the operand
    moved to the result's kept positions."""
    x, k = vals[0], kin[0]
    shp = eqn.invars[0].aval.shape
    ko = kout[0] or (None,) * (len(shp) - len(dropped))
    for j, i in enumerate([i for i in range(len(shp)) if i not in dropped]):
        x = move(x, i, k[i], ko[j], shp[i])
    return bind(eqn, [x], eqn.params)


def windowed(eqn, vals, kin, kout):
    """Pooling over axes that kept every position, the others unchanged."""
    p, k = eqn.params, kin[0]
    for ax, idx in enumerate(k):
        if idx is not None and not (p["window_dimensions"][ax] == 1 and p["window_strides"][ax] == 1
                                    and tuple(p["padding"][ax]) == (0, 0)):
            return None
    if kout[0] is None or any((a is None) != (b is None) or (a is not None and not np.array_equal(a, b))
                              for a, b in zip(k, kout[0])):
        return None
    return bind(eqn, vals[:1], p)


def conv_general_dilated(eqn, vals, kin, kout):
    """The input features moved to the kernel's kept inputs; depthwise group count narrowed."""
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
        lhs = move(lhs, lf, kl[lf], kr[ri], n_in)
    elif eqn.invars[1].aval.shape[ri] == 1 and g == n_in == eqn.invars[1].aval.shape[ro]:
        lhs = move(lhs, lf, kl[lf], kr[ro], n_in)  # depthwise: one filter per input channel
        params = dict(p, feature_group_count=int(lhs.shape[lf]))
    elif eqn.invars[1].aval.shape[ri] > 1 and group_consistent(kr[ro], g, _rhs_out(eqn)):
        # grouped: the same kernel inputs kept in every group, the group count unchanged
        per_in = eqn.invars[1].aval.shape[ri]
        dst = None if kr[ri] is None else (
            np.arange(g)[:, None] * per_in + np.asarray(kr[ri])).reshape(-1)
        lhs = move(lhs, lf, kl[lf], dst, n_in)
    elif any(k is not None for k in (kl[lf], kr[ri], kr[ro])):
        return None
    out = bind(eqn, [lhs, rhs], params)
    n_out = eqn.outvars[0].aval.shape[of]
    return [move(out[0], of, kr[ro], ko[of], n_out)]


def _rhs_out(eqn) -> int:
    """The number of output channels of a convolution's kernel."""
    return eqn.invars[1].aval.shape[eqn.params["dimension_numbers"].rhs_spec[0]]


def group_consistent(keep: np.ndarray | None, g: int, n: int) -> bool:
    """Whether ``keep`` (sorted positions of ``n`` channels in ``g`` equal groups) keeps the
    same channels of every group (`jaxprune.graph.links.link_conv_groups`)."""
    if keep is None:
        return True
    keep = np.asarray(keep)
    per, k = n // g, len(keep) // g
    if len(keep) % g or not k:
        return False
    rows = keep.reshape(g, k)
    return bool(np.array_equal(rows - (np.arange(g)[:, None] * per), np.broadcast_to(rows[0], rows.shape)))


def dot_general(eqn, vals, kin, kout):
    """The contracted and batch axes of the left operand moved to the right's kept positions."""
    lhs, rhs = vals
    kl = kin[0] or (None,) * lhs.ndim
    kr = kin[1] or (None,) * rhs.ndim
    (lc, rc), (lbd, rbd) = eqn.params["dimension_numbers"]
    shp = eqn.invars[0].aval.shape
    for a, b in list(zip(lc, rc)) + list(zip(lbd, rbd)):
        lhs = move(lhs, a, kl[a], kr[b], shp[a])
    out = bind(eqn, [lhs, rhs], eqn.params)[0]
    want = narrow_shape(eqn.outvars[0].aval, kout[0])
    return [out] if tuple(out.shape) == want else None


def concatenate(eqn, vals, kin, kout):
    """Every operand moved to the result's kept positions off the concatenated axis."""
    d = eqn.params["dimension"]
    out = eqn.outvars[0].aval
    ko = kout[0] or (None,) * len(out.shape)
    xs = []
    for x, k, v in zip(vals, kin, eqn.invars):
        k = k or (None,) * len(out.shape)
        for ax in range(len(out.shape)):
            if ax != d:
                x = move(x, ax, k[ax], ko[ax], out.shape[ax])
        xs.append(x)
    res = bind(eqn, xs, eqn.params)
    return res if tuple(res[0].shape) == narrow_shape(out, kout[0]) else None


def split(eqn, vals, kin, kout):
    """The split sizes narrowed to each result's kept count."""
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
            x = move(x, ax, k[ax], ko0[ax], shp[ax])
    sizes = tuple(narrow_shape(o, ko)[axis] for o, ko in zip(outs, kout))
    if sum(sizes) != x.shape[axis]:
        return None
    return bind(eqn, [x], dict(eqn.params, sizes=sizes))


def slice_(eqn, vals, kin, kout):
    """The sliced positions gathered directly; start, limit and stride rewritten."""
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
        x = move(x, ax, k[ax], int(start[ax]) + dst * int(step[ax]), shp[ax])
        start[ax], limit[ax], step[ax] = 0, len(dst), 1
    return bind(eqn, [x], dict(p, start_indices=tuple(start), limit_indices=tuple(limit),
                                strides=tuple(step)))


def pad(eqn, vals, kin, kout):
    """The pad rebuilt as a gather of the kept real positions and the padding value."""
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
    return bind(eqn, [x, value], dict(eqn.params, padding_config=tuple(config)))


def rev(eqn, vals, kin, kout):
    """A reversal of axes the keeps already describe."""
    return bind(eqn, vals, eqn.params)


def sharded(eqn, vals, kin, kout):
    """A sharding or placement (``sharding_constraint``, ``device_put``, ``mesh_cast``,
    ``reshard``): `elementwise`, unless its sharding partitions a narrowed axis, whose kept
    count need not divide the mesh (a ``device_put`` or ``reshard`` to an indivisible shape
    fails): that one runs at full width, where the shape is the dense model's."""
    keeps = [k for k in list(kin) + list(kout) if k is not None]
    for s in _shardings(eqn.params):
        spec = getattr(s, "spec", None)
        if spec is None:
            if getattr(s, "is_fully_replicated", True):  # a device, a single-device sharding
                continue
            return None
        for keep in keeps:
            if any(idx is not None and ax < len(spec) and spec[ax] is not None
                   for ax, idx in enumerate(keep)):
                return None
    return elementwise(eqn, vals, kin, kout)


def _shardings(params) -> list:
    """The target shardings (or devices) named in a sharding primitive's parameters."""
    out = []
    for key in ("sharding", "devices", "dst_sharding"):
        v = params.get(key)
        out.extend(v if isinstance(v, (tuple, list)) else [v])
    return [s for s in out if s is not None]


# ----------------------------------------------------------------------------- control flow

def scan(eqn, vals, kin, kout, bodies, run_body):
    """``lax.scan`` of the narrowed body."""
    p = eqn.params
    closed, plan = p["jaxpr"], bodies[0]
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, init, xs = vals[:nc], vals[nc:nc + ncar], vals[nc + ncar:]
    shapes = [v.aval.shape for v in eqn.invars]
    consts = [move_all(c, kc, kb, s) for c, kc, kb, s in zip(consts, kin[:nc], plan.ins[:nc], shapes)]
    init = [move_all(c, kc, kb, s) for c, kc, kb, s in
            zip(init, kin[nc:nc + ncar], plan.ins[nc:nc + ncar], shapes[nc:nc + ncar])]

    def body(carry, x):
        res = run_body(closed.jaxpr, closed.consts, plan, list(consts) + list(carry) + list(x))
        carry_out = [move_all(r, kb, ki, ov.aval.shape) for r, kb, ki, ov in
                     zip(res[:ncar], plan.outs[:ncar], plan.ins[nc:nc + ncar], closed.jaxpr.outvars)]
        return carry_out, res[ncar:]

    carry, ys = jax.lax.scan(body, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                             unroll=p["unroll"])
    outs = list(carry) + list(ys)
    inner = list(plan.ins[nc:nc + ncar]) + [None if k is None else (None,) + tuple(k)
                                             for k in plan.outs[ncar:]]
    return [move_all(o, ki, ko, ov.aval.shape) for o, ki, ko, ov in zip(outs, inner, kout, eqn.outvars)]


def cond(eqn, vals, kin, kout, bodies, run_body):
    """``lax.switch`` over the narrowed branches."""
    index, ops = vals[0], vals[1:]

    def branch(closed, plan):
        def f(*args):
            a = [move_all(x, ko, ki, v.aval.shape) for x, ko, ki, v in
                 zip(args, kin[1:], plan.ins, eqn.invars[1:])]
            res = run_body(closed.jaxpr, closed.consts, plan, a)
            return [move_all(r, kb, ko, ov.aval.shape) for r, kb, ko, ov in
                    zip(res, plan.outs, kout, eqn.outvars)]
        return f

    fns = [branch(c, pl) for c, pl in zip(eqn.params["branches"], bodies)]
    return list(jax.lax.switch(index, fns, *ops))


def while_(eqn, vals, kin, kout, bodies, run_body):
    """``lax.while_loop`` of the narrowed condition and body."""
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cplan, bplan = bodies
    cconsts, bconsts, carry = vals[:nc], vals[nc:nc + nb], vals[nc + nb:]
    kcarry = kin[nc + nb:]
    shapes = [v.aval.shape for v in eqn.invars[nc + nb:]]

    def cond_fn(c):
        a = [move_all(x, kc, ki, s) for x, kc, ki, s in zip(c, kcarry, cplan.ins[nc:], shapes)]
        return run_body(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts, cplan, list(cconsts) + a)[0]

    def body_fn(c):
        a = [move_all(x, kc, ki, s) for x, kc, ki, s in zip(c, kcarry, bplan.ins[nb:], shapes)]
        res = run_body(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts, bplan, list(bconsts) + a)
        return [move_all(r, kb, kc, s) for r, kb, kc, s in zip(res, bplan.outs, kcarry, shapes)]

    out = jax.lax.while_loop(cond_fn, body_fn, list(carry))
    return [move_all(o, kc, ko, s) for o, kc, ko, s in zip(out, kcarry, kout, shapes)]
