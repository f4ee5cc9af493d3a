"""How channels flow through each primitive when tracing: the link half of the rules.

Each function ``link(t, eqn, ins, outs)`` gets the `jaxprune.graph.tracer.Tracer` ``t``, the jaxpr
equation and the channel ids of each operand and result axis (None for a literal); it links the
axes that carry the same channels (``t.link``), marks channels that must not be pruned
(``t.poison``, ``t.lose``) and records producers, roles and cost ops.
`jaxprune.graph.rules` says which function each primitive uses.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from jaxprune.graph.constants import selection_rows
from jaxprune.graph.costs import real_taps


def axis_pairs(rule: Callable[[Any], Sequence[tuple[int, int, int, int]]]) -> Callable:
    """The link function of a `register_rule` rule returning ``(operand, axis, result, axis)``
    pairs: it links those pairs; every other axis of the primitive's operands and results is
    lost to pruning (never guessed)."""

    def link(t, eqn, ins, outs) -> None:
        linked: set[tuple[str, int, int]] = set()
        for i, ia, o, oa in rule(eqn):
            a, b = ins[i], outs[o]
            if a is None:
                continue
            if len(a[ia]) != len(b[oa]):
                raise ValueError(f"register_rule for {eqn.primitive.name!r}: input {i} axis {ia} "
                                 f"(size {len(a[ia])}) and output {o} axis {oa} (size {len(b[oa])}) "
                                 "differ in size; only axes that carry the same channels may be linked")
            t.link(a[ia], b[oa])
            linked.update({("in", i, ia), ("out", o, oa)})
        where = t.where(eqn)
        for kind, ids_list in (("in", ins), ("out", outs)):
            for k, ids in enumerate(ids_list):
                for ax, a in enumerate(ids or ()):
                    if (kind, k, ax) not in linked:
                        t.lose(a, f"axis {ax} of primitive '{eqn.primitive.name}' "
                                  f"(not linked by its rule; {where})")

    return link


def elementwise(t, eqn, ins, outs) -> None:
    """Each result axis carries the channels of the same axis of every operand of the result's
    rank, where the sizes match (a broadcast size-1 axis carries none)."""
    _elementwise(t, eqn, ins, outs, keeps_origin=False)


def copy(t, eqn, ins, outs) -> None:
    """`elementwise`, and the result stands for its operand's variable leaf (a dtype, precision
    or layout copy of a kernel is still that kernel)."""
    _elementwise(t, eqn, ins, outs, keeps_origin=True)


def no_link(t, eqn, ins, outs) -> None:
    """Results that carry no operand's channels (iota, random bits): nothing to link."""


def _elementwise(t, eqn, ins, outs, keeps_origin: bool) -> None:
    out_shape = eqn.outvars[0].aval.shape
    if (t.residual == "scatter" and eqn.primitive.name in ("add", "add_any")
            and len(eqn.invars) == 2
            and all(t.is_data(v) and v.aval.shape == out_shape for v in eqn.invars)):
        return  # a residual merge: the output stream is its own channel space
    for o in outs:
        for ids, v in zip(ins, eqn.invars):
            if ids is None or len(ids) != len(o):
                continue
            for a, b, sa in zip(ids, o, v.aval.shape):
                if sa == len(b):
                    t.link(a, b)
    if keeps_origin or (
            not any(t.is_data(v) for v in eqn.invars)):
        origins = [v for v in eqn.invars
                   if not t.is_literal(v) and v in t.origin
                   and v.aval.shape == out_shape]
        if len(origins) == 1:
            t.copy_origin(eqn.outvars[0], origins[0])


def broadcast_in_dim(t, eqn, ins, outs):
    """Each operand axis carries its channels to the result axis it maps to (same size)."""
    (x,), (o,) = ins[:1], outs
    if x is None:
        return
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if len(x[i]) == len(o[d]):
            t.link(x[i], o[d])


def transpose(t, eqn, ins, outs):
    """Axes move with the permutation; the result still stands for the operand's leaf."""
    x, o = ins[0], outs[0]
    for i, p in enumerate(eqn.params["permutation"]):
        t.link(x[p], o[i])
    t.copy_origin(eqn.outvars[0], eqn.invars[0], axes=eqn.params["permutation"])


def squeeze(t, eqn, ins, outs):
    """The kept axes carry their channels unchanged."""
    x, o = ins[0], outs[0]
    dims = {d % len(x) for d in eqn.params["dimensions"]}
    kept = [a for i, a in enumerate(x) if i not in dims]
    for a, b in zip(kept, o):
        t.link(a, b)


def reshape_blocks(xs: Sequence[int], os_: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """The blocks of a reshape from shape ``xs`` to ``os_``: runs of consecutive operand axes
    ``bi`` and result axes ``bj`` of equal total size (size-1 axes left out), e.g.
    ``[2, 12] -> [2, 3, 4]``: ``([0], [0]), ([1], [1, 2])``."""
    out = []
    i = j = 0
    while i < len(xs) or j < len(os_):
        bi, bj = [i], [j]
        pi = xs[i] if i < len(xs) else 1
        pj = os_[j] if j < len(os_) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                bi.append(i); pi *= xs[i]; i += 1
            else:
                bj.append(j); pj *= os_[j]; j += 1
        out.append(([k for k in bi if k < len(xs) and xs[k] > 1],
                    [k for k in bj if k < len(os_) and os_[k] > 1]))
    return out


def reshape(t, eqn, ins, outs):
    """One-to-one axes are linked; merged or split channel axes are resolved after the walk."""
    x, o = ins[0], outs[0]
    if eqn.params.get("dimensions") is not None:
        return t.lose_all(eqn, ins, outs)
    xs = [len(a) for a in x]
    os_ = [len(a) for a in o]
    for bi, bj in reshape_blocks(xs, os_):
        if len(bi) == 1 and len(bj) == 1:
            t.link(x[bi[0]], o[bj[0]])
        elif len(bi) > 1 and len(bj) == 1:
            t.reshapes.append((o[bj[0]], [x[k] for k in bi], [xs[k] for k in bi]))
        elif len(bi) == 1 and len(bj) > 1:
            t.reshapes.append((x[bi[0]], [o[k] for k in bj], [os_[k] for k in bj]))
            t.splits.append((x[bi[0]], t.where(eqn)))
        elif bi and bj:
            for a in [x[k] for k in bi] + [o[k] for k in bj]:
                t.poison.append((a, "a reshape regroups several axes"))


def _reduce(t, eqn, ins, outs, bad: bool):
    x, o = ins[0], outs[0]
    axes = set(eqn.params["axes"])
    kept = [a for i, a in enumerate(x) if i not in axes]
    for a, b in zip(kept, o):
        t.link(a, b)
    if bad:
        for i in axes:
            t.poison.append((x[i], f"reduced over by {eqn.primitive.name}"))


def reduce_sum(t, eqn, ins, outs):
    """Rule for ``reduce_sum``: a sum over the channel axis is recorded as a statistic
    (`Tracer.sums`); other axes pass channels through."""
    # A sum over channels is a mean, a variance or a normalisation statistic (LayerNorm,
    # GroupNorm, RMSNorm, channel means, softmax over channels): removing channels changes
    # its count, so the compact model would compute something else. Recorded in ``t.sums``:
    # `trace` refuses those channels, or with ``norms='masked'`` prunes them with the sum taken
    # over the kept channels (`jaxprune.masked_norm.masked_apply`). The sums of a matmul are
    # dot_general, and global pooling reduces spatial axes, which carry no channel.
    _reduce(t, eqn, ins, outs, bad=False)
    where = t.where(eqn)
    into = t.sums if eqn.primitive.name == "reduce_sum" else t.poison  # and/or/xor: refused
    for i in set(eqn.params["axes"]):
        into.append((ins[0][i], f"summed over by {eqn.primitive.name} (a mean or "
                                f"normalisation over channels) at {where}"))


def reduce_max(t, eqn, ins, outs):
    """The kept axes are linked; the channels reduced over are not prunable."""
    _reduce(t, eqn, ins, outs, bad=True)


def windowed(t, eqn, ins, outs):
    """Unpooled axes (window 1, stride 1, no padding) are linked; pooled-over ones poisoned."""
    x, o = ins[0], outs[0]
    p = eqn.params
    for k, (a, b) in enumerate(zip(x, o)):
        if (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                and tuple(p["padding"][k]) == (0, 0) and len(a) == len(b)):
            t.link(a, b)
        else:
            t.poison.append((a, f"pooled over by {eqn.primitive.name}"))


def cumulative(t, eqn, ins, outs):
    """Axes are linked; the accumulated axis is not prunable."""
    x, o = ins[0], outs[0]
    for k, (a, b) in enumerate(zip(x, o)):
        t.link(a, b)
    t.poison.append((x[eqn.params["axis"]], f"accumulated over by {eqn.primitive.name}"))


def pad(t, eqn, ins, outs):
    """Each operand position is linked to the result position it lands at."""
    x, o = ins[0], outs[0]
    for a, b, (lo, hi, interior) in zip(x, o, eqn.params["padding_config"]):
        src = np.arange(len(a))
        dst = int(lo) + src * (int(interior) + 1)
        ok = (dst >= 0) & (dst < len(b))
        t.link(a[src[ok]], b[dst[ok]])


def slice_(t, eqn, ins, outs):
    """The sliced-out positions are linked to the result positions."""
    x, o = ins[0], outs[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x)
    for a, b, s, st in zip(x, o, p["start_indices"], strides):
        t.link(a[int(s) + np.arange(len(b)) * int(st)], b)


def rev(t, eqn, ins, outs):
    """Positions are linked, reversed along the reversed axes."""
    x, o = ins[0], outs[0]
    dims = set(eqn.params["dimensions"])
    for k, (a, b) in enumerate(zip(x, o)):
        t.link(a[::-1] if k in dims else a, b)


def concatenate(t, eqn, ins, outs):
    """Each operand fills its run of the concatenated axis; the other axes are linked."""
    o = outs[0]
    d = eqn.params["dimension"]
    off = 0
    for x in ins:
        if x is None:
            continue
        for k, (a, b) in enumerate(zip(x, o)):
            t.link(a, b[off:off + len(a)] if k == d else b)
        off += len(x[d])


def split(t, eqn, ins, outs):
    """Each result takes its run of the split axis; the other axes are linked."""
    x = ins[0]
    d = eqn.params["axis"]
    off = 0
    for o in outs:
        for k, (a, b) in enumerate(zip(x, o)):
            t.link(a[off:off + len(b)] if k == d else a, b)
        off += len(o[d])


def gather(t, eqn, ins, outs):
    """Whole and static-prefix slices and static 1-D indices are linked; data-dependent
    indexing poisons."""
    x, idx = ins
    o = outs[0]
    p = eqn.params
    dn = p["dimension_numbers"]
    if x is None or dn.operand_batching_dims:
        return t.lose_all(eqn, ins, outs)
    sizes = p["slice_sizes"]
    collapsed, index_map = tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)
    batch_out = [k for k in range(len(o)) if k not in dn.offset_dims]
    if idx is not None:  # the index batch axes become the output's non-offset axes
        for a, k in zip(idx[:-1], batch_out):
            t.link(a, o[k])
    for d, k in zip([d for d in range(len(x)) if d not in collapsed], dn.offset_dims):
        if d not in index_map or sizes[d] == len(x[d]):
            t.link(x[d][:sizes[d]], o[k])  # a whole axis (or a static prefix) is copied
        else:
            for a in (x[d], o[k]):
                t.poison.append((a, "sliced by a gather at data-dependent offsets"))
    value = t.known(eqn.invars[1])
    if (len(index_map) == 1 and index_map[0] in collapsed and len(batch_out) == 1
            and value is not None and value.ndim == 2):
        # static 1-D index along one axis: output position j is input position value[j]
        d = index_map[0]
        pos = value[:, 0].astype(np.int64)
        n = len(x[d])
        if "FILL" in str(p["mode"]):
            ok = (pos >= 0) & (pos < n)  # out of range: the fill value, no channel
        else:
            pos, ok = np.clip(pos, 0, n - 1), np.ones(len(pos), bool)
        t.link(x[d][pos[ok]], o[batch_out[0]][ok])
    else:
        for d in index_map:
            t.poison.append(
                (x[d], "indexed by a gather with data-dependent (or multi-axis) indices"))


def conv_general_dilated(t, eqn, ins, outs):
    """Input features to kernel inputs, kernel outputs to output features; records the
    producer and its MACs."""
    lhs, rhs = ins
    out = outs[0]
    p = eqn.params
    dn = p["dimension_numbers"]
    lb, lf, *_ = dn.lhs_spec
    ro, ri, *rsp = dn.rhs_spec
    ob, of, *osp = dn.out_spec
    g = p["feature_group_count"]
    t.link(lhs[lb], out[ob])
    if p["batch_group_count"] != 1:
        for a in (lhs[lf], out[of]):
            t.poison.append((a, "convolution with batch_group_count > 1"))
    elif g == 1:
        t.link(lhs[lf], rhs[ri])
    elif len(rhs[ri]) == 1 and len(lhs[lf]) == g == len(rhs[ro]):
        t.link(lhs[lf], rhs[ro])  # depthwise: channel c reads only input c
    elif len(rhs[ri]) > 1:
        link_conv_groups(t, lhs[lf], rhs[ri], out[of], g)
    else:
        for a in (lhs[lf], out[of]):
            t.poison.append((a, f"grouped convolution (feature_group_count={g})"))
    t.link(rhs[ro], out[of])
    t.producer_ids.append(rhs[ro])
    t.channel_ids.extend([rhs[ri], lhs[lf]])
    leaf = t.origin.get(eqn.invars[1], -1)
    if leaf >= 0:
        t.roles[(leaf, t.leaf_axis(eqn.invars[1], ro))] = "out"
        if len(rhs[ri]) > 1 or g == 1:
            t.roles[(leaf, t.leaf_axis(eqn.invars[1], ri))] = "in"
    lhs_dil = tuple(p.get("lhs_dilation") or ()) or (1,) * len(rsp)
    if any(d != 1 for d in lhs_dil):
        # a transposed (input-dilated) conv: count only the taps that land on real input
        # positions, not on the inserted zeros or the padding (methods.md: MACs are real work)
        taps = real_taps(eqn, dn, lhs_dil)
        t.ops.append(("conv", leaf, taps * t.repeat, [out[ob], out[of], rhs[ri]]))
        return
    const = int(np.prod([len(rhs[k]) for k in rsp])) if rsp else 1
    t.ops.append(("conv", leaf, const * t.repeat, [out[k] for k in range(len(out))] + [rhs[ri]]))


def link_conv_groups(t, lhs_f: np.ndarray, rhs_i: np.ndarray, out_f: np.ndarray, g: int) -> None:
    """A grouped convolution (``1 < feature_group_count = g``, several inputs per group): input
    channel ``j`` of every group is one channel, read by the kernel's input ``j``, and output
    channel ``j`` of every group is one channel, so pruning removes the same channels from
    every group: the group count is unchanged and every group keeps as many as the others."""
    per_in = len(lhs_f) // g
    for k in range(g):
        t.link(lhs_f[k * per_in:(k + 1) * per_in], rhs_i)
    per_out = len(out_f) // g
    for k in range(1, g):
        t.link(out_f[k * per_out:(k + 1) * per_out], out_f[:per_out])


def dot_general(t, eqn, ins, outs):
    """Contracted and batch axes to their partners, free axes to the result; records the
    producer and its MACs."""
    lhs, rhs = ins
    out = outs[0]
    (lc, rc), (lbd, rbd) = eqn.params["dimension_numbers"]
    if selection_dot(t, eqn, lhs, out):
        return
    for a, b in zip(lc, rc):
        t.link(lhs[a], rhs[b])
    k = 0
    for a, b in zip(lbd, rbd):
        t.link(lhs[a], rhs[b])
        t.link(lhs[a], out[k])
        t.batch_ids.append(lhs[a])  # e.g. attention heads (a split channel axis, see run_tracer)
        k += 1
    lfree = [i for i in range(len(lhs)) if i not in lc and i not in lbd]
    rfree = [i for i in range(len(rhs)) if i not in rc and i not in rbd]
    for i in lfree:
        t.link(lhs[i], out[k]); k += 1
    for i in rfree:
        t.link(rhs[i], out[k]); k += 1
    leaf = t.origin.get(eqn.invars[1], -1)
    w, free, contr, wi = rhs, rfree, rc, 1
    if leaf < 0 and t.origin.get(eqn.invars[0], -1) >= 0:
        leaf, w, free, contr, wi = t.origin[eqn.invars[0]], lhs, lfree, lc, 0
    if leaf >= 0:
        wv = eqn.invars[wi]
        for i in free:
            t.roles[(leaf, t.leaf_axis(wv, i))] = "out"
            t.producer_ids.append(w[i])
        for i in contr:
            t.roles[(leaf, t.leaf_axis(wv, i))] = "in"
            t.channel_ids.append(w[i])
    t.ops.append(("dense", leaf, t.repeat, list(out) + [lhs[i] for i in lc]))


def selection_dot(t, eqn, lhs, out) -> bool:
    """A matmul of data with a constant one-hot matrix (`jaxprune.models.common.gather_channels`)
    moves channels, as a static gather does: output column j is input channel ``rows[j]``
    (no channel where the column is zero). Links them and counts no MACs."""
    (lc, rc), (lbd, _) = eqn.params["dimension_numbers"]
    value = t.known(eqn.invars[1])
    if lhs is None or value is None or lbd or len(lc) != 1 or not t.is_data(eqn.invars[0]):
        return False
    rows = selection_rows(value, int(rc[0]))
    if rows is None:
        return False
    lfree = [i for i in range(len(lhs)) if i != lc[0]]
    for k, i in enumerate(lfree):
        t.link(lhs[i], out[k])
    cols = np.flatnonzero(rows >= 0)
    t.link(lhs[lc[0]][rows[cols]], out[len(lfree)][cols])
    return True


# -- control flow: a body is walked once; its channels are the same at every iteration


def scan(t, eqn, ins, outs):
    """The body is walked once with its carry linked to itself; its MACs count ``length`` times."""
    p = eqn.params
    inner = p["jaxpr"].jaxpr
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], int(p["length"])
    t.repeat *= length  # the body's MACs run `length` times
    t.walk_body(eqn, inner, eqn.invars, stacked=range(n_consts + n_carry, len(eqn.invars)),
                scattered=t.scattered_carry(range(n_consts, n_consts + n_carry)))
    t.repeat //= length
    t.link_carry(inner.outvars[:n_carry], inner.invars[n_consts:n_consts + n_carry])
    t.link_results(eqn.outvars, inner.outvars, stacked=range(n_carry, len(eqn.outvars)))


def cond(t, eqn, ins, outs):
    """Every branch is walked (its MACs counted: an upper bound)."""
    # every branch reads the operands and writes the results; the MACs of every branch
    # are counted (an upper bound: one branch runs)
    for closed in eqn.params["branches"]:
        t.walk_body(eqn, closed.jaxpr, eqn.invars[1:])
        t.link_results(eqn.outvars, closed.jaxpr.outvars)


def while_(t, eqn, ins, outs):
    """The condition and the body are walked with the carry linked to itself; MACs count once."""
    # the carry is the same channels before, during and after the loop; the loop condition
    # is walked too (a reduction over channels there is refused like anywhere else). The
    # trip count is unknown when tracing: the body's MACs count once.
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = list(eqn.invars[nc + nb:])
    t.walk_body(eqn, p["cond_jaxpr"].jaxpr, list(eqn.invars[:nc]) + carry,
                scattered=t.scattered_carry(range(nc, nc + len(carry))))
    body = p["body_jaxpr"].jaxpr
    t.walk_body(eqn, body, list(eqn.invars[nc:nc + nb]) + carry,
                scattered=t.scattered_carry(range(nb, nb + len(carry))))
    t.link_carry(body.outvars, carry)
    t.link_results(eqn.outvars, body.outvars)
