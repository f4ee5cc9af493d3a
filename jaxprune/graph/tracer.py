"""The walk: channel ids propagated through every equation of a model's jaxpr.

Each channel of each tensor axis is a node (an integer id); the per-primitive rules of
`jaxprune.graph.rules` add edges between nodes that must be removed together. `run_tracer`
traces a function to a jaxpr, walks it with a `Tracer` and returns the connected components.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.extend import core as jcore

from jaxprune.graph.constants import const_value, fold
from jaxprune.graph.paths import leaf_paths
from jaxprune.graph.rules import rule_for

CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # the sub-jaxpr of a jit/custom_jvp/remat call


@dataclasses.dataclass(eq=False)
class Visit:
    """One walk of one equation (`Tracer` with ``record=True``): the channel ids of each
    operand and result axis (``None`` for a literal) and the sub-jaxprs walked inside it."""

    eqn: Any
    ins: list
    outs: list
    bodies: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Body:
    """One walk of a (sub-)jaxpr: ids of its constvars, invars and outvars, and its visits."""

    jaxpr: Any
    consts: list
    ins: list
    outs: list
    visits: list


def _library_dirs() -> tuple[str, ...]:
    """Directories of the libraries whose frames do not name the user's line: flax, jax and
    jaxprune itself (but not its bundled models, which are a model's own code)."""
    import os

    import flax

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jaxprune/
    return tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (flax, jax)) + (
        here + os.sep,)


def _is_library(file_name: str, dirs: tuple[str, ...]) -> bool:
    import os

    path = os.path.abspath(file_name)
    models = dirs[-1] + "models" + os.sep
    return path.startswith(dirs) and not path.startswith(models)


def where(eqn) -> str:
    """The source line ``eqn`` was traced from: the innermost frame outside flax, jax and
    jaxprune (a LayerNorm's line in the user's model, not in flax), else the innermost frame
    jax names; ``'unknown location'`` if none."""
    try:
        from jax._src import source_info_util

        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
        dirs = _library_dirs()
        mine = [f for f in frames if not _is_library(f.file_name, dirs)]
        frame = (mine or frames or [None])[0]
        here = source_info_util._summarize_frame(frame) if frame else ""
    except Exception:  # pragma: no cover - best effort location
        here = ""
    return here or "unknown location"


class Tracer:
    """The state of one walk: channel ids of every variable, the edges the rules add between
    them, and what the rules record (producers, roles, cost ops, channels lost to pruning)."""

    def __init__(self, residual: str, record: bool = False):
        self.residual = residual
        self.n = 0
        self.ids: dict[Any, list[np.ndarray]] = {}
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.reshapes: list[tuple[np.ndarray, list[np.ndarray], list[int]]] = []
        self.splits: list[tuple[np.ndarray, str]] = []  # (input axis ids, where) of axis splits
        self.poison: list[tuple[np.ndarray, str]] = []
        # (axis ids, why) of sums over an axis (reduce_sum): statistics when the axis is a
        # channel axis, refused or masked by `jaxprune.graph.trace`'s ``norms``
        self.sums: list[tuple[np.ndarray, str]] = []
        self.batch_ids: list[np.ndarray] = []  # ids of dot_general batch axes (attention heads)
        self.unknown: list[tuple[np.ndarray, str]] = []
        self.call_sites: list[str] = []  # source lines of the calls being walked (innermost last)
        self.data: set[Any] = set()
        self.origin: dict[Any, int] = {}
        # var -> the leaf axis of each of its axes, where not the identity (a scanned stack's
        # per-iteration slice, a transposed kernel)
        self.origin_axes: dict[Any, tuple[int, ...]] = {}
        self.repeat = 1  # how many times the ops being walked run (scan bodies: the length)
        # concrete values of integer/bool variables computed from constants only (the static
        # indices of a gather such as `reindex`'s), see `fold`
        self.value: dict[Any, np.ndarray] = {}
        self.roles: dict[tuple[int, int], str] = {}
        self.producer_ids: list[np.ndarray] = []
        self.channel_ids: list[np.ndarray] = []
        self.ops: list[tuple[str, int, int, list[np.ndarray]]] = []  # kind, leaf, const, axes
        # record=True: the visits of the body being walked (`jaxprune.compaction.program`)
        self.visits: list[Visit] | None = [] if record else None

    def walk(self, jaxpr) -> Body | None:
        """Walks ``jaxpr``'s equations (its invars' ids already set); with recording, returns
        the `Body` and attaches it to the equation being visited."""
        outer = self.visits
        if outer is None:
            for eq in jaxpr.eqns:
                self.eqn(eq)
            return None
        self.visits = []
        for eq in jaxpr.eqns:
            self.eqn(eq)
        body = Body(jaxpr, [self.axes(v) for v in getattr(jaxpr, "constvars", ())],
                    [self.axes(v) for v in jaxpr.invars], [self.axes(v) for v in jaxpr.outvars],
                    self.visits)
        self.visits = outer
        if outer:
            outer[-1].bodies.append(body)
        return body

    @staticmethod
    def is_literal(v) -> bool:
        return isinstance(v, jcore.Literal)

    def copy_origin(self, dst, src, axes: Sequence[int] | None = None) -> None:
        """``dst`` derives from the same leaf as ``src``; its axis ``i`` is ``src``'s axis
        ``axes[i]`` (default the same axis)."""
        if self.is_literal(src) or src not in self.origin:
            return
        self.origin[dst] = self.origin[src]
        base = self.origin_axes.get(src)
        if axes is not None:
            base = tuple(base[a] if base else a for a in axes)
        if base is None:
            self.origin_axes.pop(dst, None)
        else:
            self.origin_axes[dst] = base

    def leaf_axis(self, v, ax: int) -> int:
        """The axis of ``v``'s leaf that ``v``'s axis ``ax`` is."""
        m = self.origin_axes.get(v)
        return m[ax] if m else ax

    def forget(self, jaxpr) -> None:
        """Drops what is known about ``jaxpr``'s variables: a sub-jaxpr (jit, custom_jvp, a scan
        body) may be shared by several call sites, each of which gets fresh channel ids."""
        for v in [ov for eq in jaxpr.eqns for ov in eq.outvars] + list(jaxpr.invars):
            for table in (self.ids, self.origin, self.origin_axes, self.value):
                table.pop(v, None)
            self.data.discard(v)

    def where(self, eqn) -> str:
        """The user's source line of ``eqn``, or of the call (jit, custom_jvp, ...) it is in."""
        here = where(eqn)
        if here == "unknown location" and self.call_sites:
            return self.call_sites[-1]
        return here

    # -- ids
    def axes(self, v) -> list[np.ndarray] | None:
        """The channel ids of each axis of ``v`` (fresh ones on first sight); None for a literal."""
        if self.is_literal(v):
            return None
        if v not in self.ids:
            shape = getattr(v.aval, "shape", ())
            out = []
            for d in shape:
                out.append(np.arange(self.n, self.n + d, dtype=np.int64))
                self.n += d
            self.ids[v] = out
        return self.ids[v]

    def link(self, a: np.ndarray, b: np.ndarray) -> None:
        """Channels ``a[i]`` and ``b[i]`` are the same channel, for every ``i``."""
        if len(a) != len(b):
            raise AssertionError("internal: linking axes of different sizes")
        if len(a):
            self.edges.append((a, b))

    def is_data(self, v) -> bool:
        """Whether ``v`` depends on the model's inputs (not only on variables and constants)."""
        return not self.is_literal(v) and v in self.data

    def lose(self, ids: np.ndarray, why: str) -> None:
        """The channels ``ids`` cannot be followed through a primitive: they are not pruned."""
        self.unknown.append((ids, why))

    # -- walking
    def run(self, jaxpr, invar_ids: Sequence[list[np.ndarray] | None]) -> Body | None:
        for v, ids in zip(jaxpr.invars, invar_ids):
            if ids is not None:
                self.ids[v] = ids
        return self.walk(jaxpr)

    def alias_call(self, eqn, sub) -> None:
        """Walks a call's (jit, custom_jvp, remat) sub-jaxpr in place: its inputs and outputs
        are the call's operands and results."""
        inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
        self.forget(inner)
        for cv, c in zip(getattr(inner, "constvars", ()), getattr(sub, "consts", ())):
            val = const_value(cv.aval, c)  # e.g. a jitted function's closed-over index
            if val is not None:
                self.value[cv] = val
        for outer, iv in zip(eqn.invars, inner.invars):
            val = self.known(outer)
            if val is not None:
                self.value[iv] = val
            ids = self.axes(outer)
            if ids is None:
                continue
            self.ids[iv] = ids
            if outer in self.data:
                self.data.add(iv)
            self.copy_origin(iv, outer)
        self.call_sites.append(self.where(eqn))
        self.walk(inner)
        self.call_sites.pop()
        for outer, ov in zip(eqn.outvars, inner.outvars):
            o_ids = self.axes(outer)
            i_ids = self.axes(ov)
            if i_ids is None:
                continue
            for a, b in zip(o_ids, i_ids):
                self.link(a, b)
            if self.is_data(ov):
                self.data.add(outer)
            self.copy_origin(outer, ov)
            val = self.known(ov)
            if val is not None:
                self.value[outer] = val

    def known(self, v) -> np.ndarray | None:
        """The concrete value of ``v`` if it is a literal or was folded from constants."""
        if self.is_literal(v):
            return np.asarray(v.val)
        return self.value.get(v)

    def fold(self, eqn) -> None:
        """Evaluates integer/bool index arithmetic whose inputs are all constants
        (`jaxprune.graph.constants.fold`)."""
        if len(eqn.outvars) != 1:
            return
        out = fold(eqn.primitive.name, [self.known(v) for v in eqn.invars], eqn.params,
                   eqn.outvars[0].aval)
        if out is not None:
            self.value[eqn.outvars[0]] = out

    def eqn(self, eqn) -> None:
        """Walks one equation through its primitive's rule (`jaxprune.graph.rules`)."""
        name = eqn.primitive.name
        ins = [self.axes(v) for v in eqn.invars]
        outs = [self.axes(v) for v in eqn.outvars]
        if self.visits is not None:
            self.visits.append(Visit(eqn, ins, outs))
        if any(self.is_data(v) for v in eqn.invars):
            self.data.update(eqn.outvars)
        rule = rule_for(name)
        if rule is not None and rule.registered:  # `register_rule` wins over everything
            return rule.link(self, eqn, ins, outs)
        sub = next((eqn.params[p] for p in CALL_PARAMS if p in eqn.params), None)
        if sub is not None and not (rule is not None and rule.bodies):
            return self.alias_call(eqn, sub)
        self.fold(eqn)
        if rule is not None:
            return rule.link(self, eqn, ins, outs)
        self.lose_all(eqn, ins, outs)

    def lose_all(self, eqn, ins, outs) -> None:
        """A primitive (or a form of it) no rule follows: every channel it touches is lost."""
        where = self.where(eqn)
        for ids in ins + outs:
            for a in ids or ():
                self.lose(a, f"primitive '{eqn.primitive.name}' ({where})")

    # -- control flow: a body is walked once; its channels are the same at every iteration
    def walk_body(self, eqn, inner, operands, stacked=(), scattered=()) -> None:
        """Walks the sub-jaxpr ``inner`` of ``eqn`` with ``operands[k]`` entering as its k-th
        input (without the leading, iterated axis when ``k in stacked``; scattered into the
        input's own channel space, not linked to it, when ``k in scattered``)."""
        self.forget(inner)
        for k, (outer, iv) in enumerate(zip(operands, inner.invars)):
            ids = self.axes(outer)
            if ids is None:
                continue
            off = 1 if k in stacked else 0
            if k in scattered and self.is_data(outer):
                self.axes(iv)
                self.data.add(iv)
                continue
            for a, b in zip(ids[off:], self.axes(iv)):
                self.link(a, b)
            if self.is_data(outer):
                self.data.add(iv)
            self.copy_origin(iv, outer, axes=range(off, len(ids)) if off else None)
        self.call_sites.append(self.where(eqn))
        self.walk(inner)
        self.call_sites.pop()

    def link_results(self, results, inner_outs, stacked=()) -> None:
        """``results[k]`` is the sub-jaxpr's k-th output (stacked over the iterations when
        ``k in stacked``)."""
        for k, (outer, ov) in enumerate(zip(results, inner_outs)):
            i_ids = self.axes(ov)
            if i_ids is None:
                continue
            off = 1 if k in stacked else 0
            for a, b in zip(self.axes(outer)[off:], i_ids):
                self.link(a, b)
            if self.is_data(ov):
                self.data.add(outer)

    def link_carry(self, inner_outs, carry_ins) -> None:
        """The carry leaving an iteration is the one entering the next."""
        for ov, cv in zip(inner_outs, carry_ins):
            a, b = self.axes(ov), self.axes(cv)
            if a is not None and b is not None:
                for x, y in zip(a, b):
                    self.link(x, y)

    def scattered_carry(self, positions) -> tuple[int, ...]:
        """Under the 'scatter' policy a loop's data carry is the full-width residual stream: its
        initial value is scattered into the carry's own channel space (as an unrolled network's
        first residual add would) instead of giving the loop its channels, so the branches that
        add into the stream at every iteration never write into pruned positions."""
        return tuple(positions) if self.residual == "scatter" else ()


def components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The connected component of each of ``n`` ids under ``edges``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges:
        a = np.concatenate([e[0] for e in edges])
        b = np.concatenate([e[1] for e in edges])
    else:
        a = b = np.zeros(0, np.int64)
    m = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(m, directed=False)[1]


@dataclasses.dataclass(eq=False)
class TracerRun:
    """What `run_tracer` found: the tracer, the channel component of every id, the jaxpr,
    the variables' leaf paths and the ids of each leaf's axes, and (``record=True``) the
    `Body` of the whole program."""

    tracer: Tracer
    comp: np.ndarray
    closed: Any
    jaxpr: Any
    paths: list
    leaf_ids: list
    body: Body | None


def run_tracer(apply_fn: Callable[..., Any], variables: Any, example_args: Sequence[Any],
               residual: str, *, per_example: bool = True, record: bool = False) -> TracerRun:
    """Traces ``apply_fn(variables, *example_args)`` to a jaxpr and propagates channel ids
    through it (`trace`'s first half). ``per_example`` traces the first argument's leading axis
    with size 1."""
    args = list(example_args)
    if per_example and args and hasattr(args[0], "shape") and len(args[0].shape) >= 1:
        args[0] = jax.ShapeDtypeStruct((1,) + tuple(args[0].shape[1:]), args[0].dtype)
    flat_vars, treedef = jax.tree_util.tree_flatten(variables)
    paths = leaf_paths(variables)
    specs = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.float32)) for x in flat_vars]

    def flat_fn(flat, *a):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, flat), *a)

    closed = jax.make_jaxpr(flat_fn)(specs, *args)
    jaxpr = closed.jaxpr
    t = Tracer(residual, record=record)
    for cv, c in zip(jaxpr.constvars, closed.consts):
        val = const_value(cv.aval, c)
        if val is not None:
            t.value[cv] = val
    n_leaves = len(flat_vars)
    for i, v in enumerate(jaxpr.invars):
        t.axes(v)
        if i < n_leaves:
            t.origin[v] = i
        else:
            t.data.add(v)
    body = t.run(jaxpr, [t.ids[v] for v in jaxpr.invars])
    for v in jaxpr.outvars:
        t.axes(v)

    leaf_ids = [t.ids[v] for v in jaxpr.invars[:n_leaves]]
    for k, ids in enumerate(leaf_ids):
        if len(ids) == 1:
            t.channel_ids.append(ids[0])

    comp = components(t.n, t.edges)
    if t.reshapes:
        channel = np.zeros(comp.max() + 1 if t.n else 1, bool)
        for ids in t.channel_ids:
            channel[comp[ids]] = True
        heads = _head_splits(t, comp, channel)
        if heads:
            comp = components(t.n, t.edges)
            channel = np.zeros(comp.max() + 1 if t.n else 1, bool)
            for ids in t.channel_ids:
                channel[comp[ids]] = True
        grouped = _group_norm_splits(t, comp, channel, heads)
        for axis, here in t.splits:  # pixel shuffle, channel shuffle: channels regrouped
            if id(axis) not in heads | grouped and channel[comp[axis]].any():
                t.poison.append((axis, f"a reshape splits the channel axis at {here}"))
        for merged, parts, sizes in t.reshapes:
            if id(merged) in heads | grouped:
                continue
            live = [k for k, p in enumerate(parts) if channel[comp[p]].any()]
            if len(live) == 1:
                k = live[0]
                inner = int(np.prod(sizes[k + 1:])) if k + 1 < len(sizes) else 1
                pos = (np.arange(len(merged)) // inner) % sizes[k]
                t.link(merged, parts[k][pos])
            elif len(live) > 1:
                for p in parts:
                    t.poison.append((p, "a reshape merges several channel axes"))
        comp = components(t.n, t.edges)
    return TracerRun(t, comp, closed, jaxpr, paths, leaf_ids, body)


def _head_splits(t: Tracer, comp: np.ndarray, channel: np.ndarray) -> set[int]:
    """Attention heads: a reshape that splits a channel axis into parts exactly one of which
    becomes a batch axis of a ``dot_general`` (``[.., C] -> [.., H, D]`` then ``q k^T`` over
    ``D`` per head) makes that part the channel axis: each of its positions (a head) is one
    prunable unit holding every merged position that lands on it (its ``D`` dims; with a fused
    ``[.., 3, H, D]`` projection its query, key and value slices). Links them and returns the
    ``id`` of each such split's merged ids (the split is then no longer refused)."""
    if not t.batch_ids:
        return set()
    batch = np.zeros(len(channel), bool)
    for ids in t.batch_ids:
        batch[comp[ids]] = True
    split_axes = {id(axis) for axis, _ in t.splits}
    done: set[int] = set()
    for merged, parts, sizes in t.reshapes:
        if id(merged) not in split_axes or not channel[comp[merged]].any():
            continue
        hit = [k for k, p in enumerate(parts) if batch[comp[p]].all()]
        if len(hit) != 1:
            continue
        k = hit[0]
        inner = int(np.prod(sizes[k + 1:])) if k + 1 < len(sizes) else 1
        pos = (np.arange(len(merged)) // inner) % sizes[k]
        t.link(merged, parts[k][pos])
        done.add(id(merged))
    return done


def _group_norm_splits(t: Tracer, comp: np.ndarray, channel: np.ndarray, done: set[int]
                       ) -> set[int]:
    """GroupNorm: a reshape that splits a channel axis into ``[.., G, S]`` (``G`` groups of
    ``S`` channels) whose inner part ``S`` is summed over (the group's statistics) and whose
    outer part ``G`` is not, and the merges ``[.., G, S] -> [.., C]`` of the per-group
    statistics repeated over their group (an outer part in the same component as a split's
    ``G``). Position ``j`` of ``S`` becomes one channel: the merged positions ``j, S + j, ...``
    (channel ``j`` of every group) are linked to it, so pruning keeps the group count and the
    same channels (hence as many) in every group, and the sums over ``S`` are statistics over
    the channels (refused, or with ``norms='masked'`` taken over the kept ones). The split's
    reason under ``norms='refuse'`` is put first in ``t.sums``. Returns the ``id`` of the
    merged ids of each split and merge handled (skipping those in ``done``)."""
    if not t.sums:
        return set()
    summed = np.zeros(len(channel), bool)
    for ids, _ in t.sums:
        summed[comp[ids]] = True
    where = {id(axis): here for axis, here in t.splits}
    handled: set[int] = set()
    group_axes = np.zeros(len(channel), bool)
    front = []
    for merged, parts, sizes in t.reshapes:
        if (id(merged) not in where or id(merged) in done or len(parts) != 2
                or not channel[comp[merged]].any()):
            continue
        outer, inner = parts
        if (summed[comp[inner]].all() and not summed[comp[outer]].any()
                and not channel[comp[outer]].any() and not channel[comp[inner]].any()):
            t.link(merged, inner[np.arange(len(merged)) % sizes[1]])
            group_axes[comp[outer]] = True
            handled.add(id(merged))
            front.append((merged, "a reshape splits the channel axis into groups (a GroupNorm: "
                                  f"trace with norms='masked' to prune it) at {where[id(merged)]}"))
    for merged, parts, sizes in t.reshapes:
        if (id(merged) in where or id(merged) in done or len(parts) != 2
                or not channel[comp[merged]].any()):
            continue
        outer, inner = parts
        if group_axes[comp[outer]].all() and not channel[comp[inner]].any():
            t.link(merged, inner[np.arange(len(merged)) % sizes[1]])
            handled.add(id(merged))
    t.sums[:0] = front
    return handled
