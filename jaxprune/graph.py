"""Prunable-group graph: which parameter slices belong to each prunable channel.

`trace` runs the model's apply function abstractly (`jax.make_jaxpr`) and propagates channel
identity through every primitive of the jaxpr. Each channel of each tensor axis is a node;
primitive rules add edges between nodes that must be removed together (a conv's output
filter, its BN entries, the next conv's input slice, residual partners). Connected components
are single prunable channels; components with the same set of member leaves form a `Group`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

ROLES = ("out", "in", "vector", "other")
RESIDUAL_POLICIES = ("coupled", "scatter")


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One leaf's share of a group: ``leaf[..., index[c, :], ...]`` along ``axis`` is channel c.

    Attributes:
      path: leaf path from the variables root, e.g. ``('params', 'conv1', 'kernel')``.
      axis: the leaf axis the group indexes.
      index: int array ``[C, m]``; the ``m`` leaf positions along ``axis`` of each channel
        (``m > 1`` when a flatten spreads a channel over several classifier rows).
      role: ``'out'`` (output filters of a conv/dense kernel), ``'in'`` (input slice of a
        consumer kernel), ``'vector'`` (bias, BN scale/bias/mean/var) or ``'other'``.
    """

    path: tuple[str, ...]
    axis: int
    index: np.ndarray
    role: str

    @property
    def module(self) -> str:
        """Module path of the leaf: the path without collection and leaf name."""
        return module_path(self.path)


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """A set of coupled channels pruned together; its mask is one vector of shape ``[size]``."""

    name: str
    size: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]
    kind: str  # 'conv' if any producer is a convolution, else 'dense'

    def filters(self) -> tuple[Member, ...]:
        """The members whose slices are the group's filters (role ``'out'``)."""
        return tuple(m for m in self.members if m.role == "out")


def module_path(path: Sequence[str]) -> str:
    """``('params', 'layer1_0', 'conv1', 'kernel') -> 'layer1_0/conv1'``."""
    return "/".join(path[1:-1])


@dataclasses.dataclass(frozen=True, eq=False)
class Factor:
    """A channel count of one tensor axis, as a function of the groups' masks.

    ``count = fixed + sum_g sum_c per_channel[g][c] * keep_g[c]``: ``fixed`` positions belong to
    no group, ``per_channel[g][c]`` positions of the axis are channel ``c`` of group ``g``.
    """

    size: int
    fixed: int
    per_channel: tuple[tuple[str, np.ndarray], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class CostOp:
    """One multiply-accumulate op (conv or dot_general) of the forward pass, per example.

    ``macs = const * prod(factor counts)``.
    """

    kind: str  # 'conv' or 'dense'
    module: str  # module path of the kernel, '' when the weights are not a variable
    const: int
    factors: tuple[Factor, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class LeafInfo:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    factors: tuple[Factor, ...]  # one per axis

    @property
    def is_param(self) -> bool:
        return self.path[0] == "params"


@dataclasses.dataclass(frozen=True, eq=False)
class PruningGraph:
    """The prunable groups of a model, plus what is needed to count its cost.

    Attributes:
      groups: group name -> `Group`, in forward order of their first producer.
      unprunable: producer module path -> reason its channels cannot be pruned.
      leaves: every traced variable leaf (path, shape, per-axis channel factors).
      ops: every conv / dot_general with its per-example MAC structure.
      residual: the residual policy used, 'coupled' or 'scatter'.
    """

    groups: Mapping[str, Group]
    unprunable: Mapping[str, str]
    leaves: tuple[LeafInfo, ...]
    ops: tuple[CostOp, ...]
    residual: str

    def group_sizes(self) -> dict[str, int]:
        return {name: g.size for name, g in self.groups.items()}

    def conv_groups(self) -> list[str]:
        """Names of groups whose filters come from convolutions."""
        return [n for n, g in self.groups.items() if g.kind == "conv"]

    def producer_to_group(self) -> dict[str, str]:
        """Producer module path -> name of the group holding its filters."""
        return {p: n for n, g in self.groups.items() for p in g.producers}

    def summary(self) -> str:
        lines = [f"{len(self.groups)} prunable groups (residual policy {self.residual!r}):"]
        for n, g in self.groups.items():
            extra = f" + {len(g.producers) - 1} coupled" if len(g.producers) > 1 else ""
            lines.append(f"  {n:32s} {g.size:5d} channels, {len(g.members):3d} slices{extra}")
        for p, why in self.unprunable.items():
            lines.append(f"  not prunable: {p}: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- paths


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: Any) -> list[tuple[str, ...]]:
    """Paths (tuples of strings) of the leaves of ``tree`` in flatten order.

    ``flax.nnx`` trees are named like Linen variables: the ``'value'`` key inside each
    ``nnx.Variable`` is dropped and, when ``tree`` is an ``nnx.State`` (``nnx.split``'s), the
    variable's collection name leads the path, so ``nnx.split(model)[1]`` has the leaf paths
    ``('params', 'conv1', 'kernel')``, ``('batch_stats', 'bn1', 'mean')``: module paths and
    ``LeafInfo.is_param`` then mean the same for both APIs.
    """
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [tuple(_key_str(k) for k in kp) for kp, _ in flat]
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return paths
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    top, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)
    if not any(is_var(node) for _, node in top):
        return paths
    root_state = isinstance(tree, nnx.State)
    out: list[tuple[str, ...]] = []
    i = 0
    for kp, node in top:
        if not is_var(node):
            out.append(paths[i])
            i += 1
            continue
        base = tuple(_key_str(k) for k in kp)
        coll = (_variable_collection(type(node)),) if root_state else ()
        n = len(jax.tree_util.tree_leaves(node))
        out.extend(coll + base + p[len(base) + 1:] for p in paths[i:i + n])  # drop 'value'
        i += n
    return out


def _variable_collection(cls: type) -> str:
    """Collection name of an ``nnx.Variable`` type: ``Param -> 'params'``, as Linen's."""
    from flax.nnx import variablelib

    try:
        return variablelib.variable_name_from_type(cls)
    except Exception:  # an unregistered Variable subclass
        return cls.__name__.lower()


# ----------------------------------------------------------------------------- tracing

_UNARY_LIKE = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "sqrt",
    "rsqrt", "cbrt", "square", "integer_pow", "convert_element_type", "copy", "copy_p", "erf",
    "erfc", "erf_inv", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "floor", "ceil", "round", "is_finite", "not", "reduce_precision", "real",
    "imag", "conj", "sharding_constraint", "device_put", "stop_gradient", "pow", "add", "sub",
    "mul", "div", "max", "min", "atan2", "rem", "and", "or", "xor", "ne", "eq", "gt", "ge",
    "lt", "le", "select_n", "clamp", "nextafter", "add_any", "threefry2x32", "population_count",
    "shift_left", "shift_right_logical", "shift_right_arithmetic", "optimization_barrier",
    "mesh_cast", "reshard", "square", "tan", "logaddexp",
}
_ORIGIN_PRESERVING = {"convert_element_type", "copy", "copy_p", "reduce_precision",
                      "sharding_constraint", "device_put", "optimization_barrier"}
_NO_LINK = {"iota", "random_bits", "random_seed", "random_wrap", "random_unwrap",
            "rng_bit_generator", "random_fold_in", "random_split", "rng_uniform"}
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _is_index_dtype(dtype) -> bool:
    return dtype is not None and (np.issubdtype(dtype, np.integer)
                                  or np.issubdtype(dtype, np.bool_))


def _const_value(aval, c) -> np.ndarray | None:
    """The value a trace remembers of a constant: index arrays, and small float 0/1 matrices
    (`jaxprune.models.common.gather_channels`' one-hot selections); else None."""
    dtype = getattr(aval, "dtype", None)
    if _is_index_dtype(dtype):
        return np.asarray(c)
    if (dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(aval.shape) == 2
            and int(np.prod(aval.shape)) <= _SELECTION_MAX_SIZE):
        v = np.asarray(c, np.float32)
        if np.isin(v, (0.0, 1.0)).all():
            return v
    return None


def _selection_rows(value: np.ndarray, contracting: int) -> np.ndarray | None:
    """For a 0/1 matrix with at most one 1 per column (along ``contracting``, the summed axis):
    the row of each column's 1, -1 where a column is all zeros; None for any other matrix."""
    if value.ndim != 2 or not np.isin(value, (0.0, 1.0)).all():
        return None
    m = value if contracting == 0 else value.T
    if (m.sum(axis=0) > 1).any():
        return None
    return np.where(m.any(axis=0), m.argmax(axis=0), -1)


def _fold_broadcast(v, p, shape):
    x = v[0]
    dims = p["broadcast_dimensions"]
    kept = [x.shape[dims.index(k)] if k in dims else 1 for k in range(len(shape))]
    return np.broadcast_to(np.reshape(x, kept), shape)


def _fold_iota(v, p, shape):
    d = p["dimension"]
    return np.broadcast_to(
        np.arange(shape[d]).reshape([-1 if k == d else 1 for k in range(len(shape))]), shape)


def _fold_select_n(v, p, shape):
    pred, *cases = v
    return np.choose(np.asarray(pred).astype(np.int64), [np.broadcast_to(c, shape) for c in cases])


# numpy evaluation of the index arithmetic `_Tracer.fold` performs: name -> (values, params, shape)
_FOLD: dict[str, Callable[..., Any]] = {
    "add": lambda v, p, s: v[0] + v[1],
    "sub": lambda v, p, s: v[0] - v[1],
    "mul": lambda v, p, s: v[0] * v[1],
    "neg": lambda v, p, s: -v[0],
    "max": lambda v, p, s: np.maximum(v[0], v[1]),
    "min": lambda v, p, s: np.minimum(v[0], v[1]),
    "lt": lambda v, p, s: v[0] < v[1],
    "le": lambda v, p, s: v[0] <= v[1],
    "gt": lambda v, p, s: v[0] > v[1],
    "ge": lambda v, p, s: v[0] >= v[1],
    "eq": lambda v, p, s: v[0] == v[1],
    "ne": lambda v, p, s: v[0] != v[1],
    "and": lambda v, p, s: v[0] & v[1],
    "or": lambda v, p, s: v[0] | v[1],
    "not": lambda v, p, s: ~v[0],
    "clamp": lambda v, p, s: np.clip(v[1], v[0], v[2]),
    "select_n": _fold_select_n,
    "broadcast_in_dim": _fold_broadcast,
    "convert_element_type": lambda v, p, s: v[0],
    "copy": lambda v, p, s: v[0],
    "copy_p": lambda v, p, s: v[0],
    "reshape": lambda v, p, s: np.reshape(v[0], s),
    "squeeze": lambda v, p, s: np.reshape(v[0], s),
    "transpose": lambda v, p, s: np.transpose(v[0], p["permutation"]),
    "concatenate": lambda v, p, s: np.concatenate(v, axis=p["dimension"]),
    "iota": _fold_iota,
}
_FOLD_MAX_SIZE = 1 << 20
_SELECTION_MAX_SIZE = 1 << 24  # one-hot channel moves: [kept, width], width up to 2048+ in ImageNet ResNets


@dataclasses.dataclass(eq=False)
class Visit:
    """One walk of one equation (`_Tracer` with ``record=True``): the channel ids of each
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


class _Tracer:
    def __init__(self, residual: str, record: bool = False):
        from jax.extend import core as jcore

        self._literal = jcore.Literal
        self.residual = residual
        self.n = 0
        self.ids: dict[Any, list[np.ndarray]] = {}
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.reshapes: list[tuple[np.ndarray, list[np.ndarray], list[int]]] = []
        self.splits: list[tuple[np.ndarray, str]] = []  # (input axis ids, where) of axis splits
        self.poison: list[tuple[np.ndarray, str]] = []
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
        # record=True: the visits of the body being walked (`jaxprune.compact_program`)
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

    def copy_origin(self, dst, src, axes: Sequence[int] | None = None) -> None:
        """``dst`` derives from the same leaf as ``src``; its axis ``i`` is ``src``'s axis
        ``axes[i]`` (default the same axis)."""
        if isinstance(src, self._literal) or src not in self.origin:
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
        here = _where(eqn)
        if here == "unknown location" and self.call_sites:
            return self.call_sites[-1]
        return here

    # -- ids
    def axes(self, v) -> list[np.ndarray] | None:
        if isinstance(v, self._literal):
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
        if len(a) != len(b):
            raise AssertionError("internal: linking axes of different sizes")
        if len(a):
            self.edges.append((a, b))

    def is_data(self, v) -> bool:
        return not isinstance(v, self._literal) and v in self.data

    # -- walking
    def run(self, jaxpr, invar_ids: Sequence[list[np.ndarray] | None]) -> Body | None:
        for v, ids in zip(jaxpr.invars, invar_ids):
            if ids is not None:
                self.ids[v] = ids
        return self.walk(jaxpr)

    def alias_call(self, eqn, sub) -> None:
        inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
        self.forget(inner)
        for cv, c in zip(getattr(inner, "constvars", ()), getattr(sub, "consts", ())):
            val = _const_value(cv.aval, c)  # e.g. a jitted function's closed-over index
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
        if isinstance(v, self._literal):
            return np.asarray(v.val)
        return self.value.get(v)

    def fold(self, eqn) -> None:
        """Evaluates integer/bool index arithmetic whose inputs are all constants.

        Only the few primitives that build static gather indices (``jnp.take``, ``x[..., idx]``)
        are folded, with numpy: channel identity never depends on float values.
        """
        impl = _FOLD.get(eqn.primitive.name)
        if impl is None or len(eqn.outvars) != 1:
            return
        aval = eqn.outvars[0].aval
        dtype = getattr(aval, "dtype", None)
        if not _is_index_dtype(dtype):
            return
        if int(np.prod(aval.shape)) > _FOLD_MAX_SIZE:
            return
        vals = [self.known(v) for v in eqn.invars]
        if any(v is None for v in vals):
            return
        try:
            out = np.asarray(impl(vals, eqn.params, aval.shape))
        except Exception:  # pragma: no cover - an unexpected parameter form: leave unknown
            return
        if out.shape == tuple(aval.shape):
            self.value[eqn.outvars[0]] = out.astype(dtype)

    def eqn(self, eqn) -> None:
        name = eqn.primitive.name
        ins = [self.axes(v) for v in eqn.invars]
        outs = [self.axes(v) for v in eqn.outvars]
        if self.visits is not None:
            self.visits.append(Visit(eqn, ins, outs))
        if any(self.is_data(v) for v in eqn.invars):
            self.data.update(eqn.outvars)
        user = _RULES.get(name)
        if user is not None:
            return self.user_rule(eqn, user, ins, outs)
        sub = next((eqn.params[p] for p in _CALL_PARAMS if p in eqn.params), None)
        if sub is not None and name not in ("while", "cond", "scan"):
            return self.alias_call(eqn, sub)
        self.fold(eqn)
        rule = getattr(self, "rule_" + name.replace("-", "_"), None)
        if rule is not None:
            return rule(eqn, ins, outs)
        if name in _UNARY_LIKE:
            return self.elementwise(eqn, ins, outs)
        if name in _NO_LINK:
            return None
        where = self.where(eqn)
        for ids in ins + outs:
            for a in ids or ():
                self.unknown.append((a, f"primitive '{name}' ({where})"))

    def user_rule(self, eqn, rule, ins, outs) -> None:
        """A `register_rule` rule: link the axis pairs it returns; every other axis of the
        primitive's operands and results is lost to pruning (never guessed)."""
        if rule == "elementwise":
            return self.elementwise(eqn, ins, outs)
        linked: set[tuple[str, int, int]] = set()
        for i, ia, o, oa in rule(eqn):
            a, b = ins[i], outs[o]
            if a is None:
                continue
            if len(a[ia]) != len(b[oa]):
                raise ValueError(f"register_rule for {eqn.primitive.name!r}: input {i} axis {ia} "
                                 f"(size {len(a[ia])}) and output {o} axis {oa} (size {len(b[oa])}) "
                                 "differ in size; only axes that carry the same channels may be linked")
            self.link(a[ia], b[oa])
            linked.update({("in", i, ia), ("out", o, oa)})
        where = self.where(eqn)
        for kind, ids_list in (("in", ins), ("out", outs)):
            for k, ids in enumerate(ids_list):
                for ax, a in enumerate(ids or ()):
                    if (kind, k, ax) not in linked:
                        self.unknown.append((a, f"axis {ax} of primitive '{eqn.primitive.name}' "
                                                f"(not linked by its rule; {where})"))

    def elementwise(self, eqn, ins, outs) -> None:
        out_shape = eqn.outvars[0].aval.shape
        if (self.residual == "scatter" and eqn.primitive.name in ("add", "add_any")
                and len(eqn.invars) == 2
                and all(self.is_data(v) and v.aval.shape == out_shape for v in eqn.invars)):
            return  # a residual merge: the output stream is its own channel space
        for o in outs:
            for ids, v in zip(ins, eqn.invars):
                if ids is None or len(ids) != len(o):
                    continue
                for a, b, sa in zip(ids, o, v.aval.shape):
                    if sa == len(b):
                        self.link(a, b)
        if eqn.primitive.name in _ORIGIN_PRESERVING or (
                not any(self.is_data(v) for v in eqn.invars)):
            origins = [v for v in eqn.invars
                       if not isinstance(v, self._literal) and v in self.origin
                       and v.aval.shape == out_shape]
            if len(origins) == 1:
                self.copy_origin(eqn.outvars[0], origins[0])

    # -- structural primitives
    def rule_broadcast_in_dim(self, eqn, ins, outs):
        (x,), (o,) = ins[:1], outs
        if x is None:
            return
        for i, d in enumerate(eqn.params["broadcast_dimensions"]):
            if len(x[i]) == len(o[d]):
                self.link(x[i], o[d])

    def rule_transpose(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        for i, p in enumerate(eqn.params["permutation"]):
            self.link(x[p], o[i])
        self.copy_origin(eqn.outvars[0], eqn.invars[0], axes=eqn.params["permutation"])

    def rule_squeeze(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        dims = {d % len(x) for d in eqn.params["dimensions"]}
        kept = [a for i, a in enumerate(x) if i not in dims]
        for a, b in zip(kept, o):
            self.link(a, b)

    def rule_reshape(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        if eqn.params.get("dimensions") is not None:
            return self._unknown_all(eqn, ins, outs)
        xs = [len(a) for a in x]
        os_ = [len(a) for a in o]
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
            bi = [k for k in bi if k < len(xs) and xs[k] > 1]
            bj = [k for k in bj if k < len(os_) and os_[k] > 1]
            if len(bi) == 1 and len(bj) == 1:
                self.link(x[bi[0]], o[bj[0]])
            elif len(bi) > 1 and len(bj) == 1:
                self.reshapes.append((o[bj[0]], [x[k] for k in bi], [xs[k] for k in bi]))
            elif len(bi) == 1 and len(bj) > 1:
                self.reshapes.append((x[bi[0]], [o[k] for k in bj], [os_[k] for k in bj]))
                self.splits.append((x[bi[0]], self.where(eqn)))
            elif bi and bj:
                for a in [x[k] for k in bi] + [o[k] for k in bj]:
                    self.poison.append((a, "a reshape regroups several axes"))

    def _reduce(self, eqn, ins, outs, bad: bool):
        x, o = ins[0], outs[0]
        axes = set(eqn.params["axes"])
        kept = [a for i, a in enumerate(x) if i not in axes]
        for a, b in zip(kept, o):
            self.link(a, b)
        if bad:
            for i in axes:
                self.poison.append((x[i], f"reduced over by {eqn.primitive.name}"))

    def rule_reduce_sum(self, eqn, ins, outs):
        # A sum over channels is a mean, a variance or a normalisation statistic (LayerNorm,
        # GroupNorm, RMSNorm, channel means, softmax over channels): removing channels changes
        # its count, so the compact model would compute something else. Refused; the sums of a
        # matmul are dot_general, and global pooling reduces spatial axes, which carry no channel.
        self._reduce(eqn, ins, outs, bad=False)
        where = self.where(eqn)
        for i in set(eqn.params["axes"]):
            self.poison.append((ins[0][i], f"summed over by {eqn.primitive.name} (a mean or "
                                           f"normalisation over channels) at {where}"))

    rule_reduce_and = rule_reduce_or = rule_reduce_xor = rule_reduce_sum

    def rule_reduce_max(self, eqn, ins, outs):
        self._reduce(eqn, ins, outs, bad=True)

    rule_reduce_min = rule_reduce_prod = rule_argmax = rule_argmin = rule_reduce_max

    def _windowed(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        p = eqn.params
        for k, (a, b) in enumerate(zip(x, o)):
            if (p["window_dimensions"][k] == 1 and p["window_strides"][k] == 1
                    and tuple(p["padding"][k]) == (0, 0) and len(a) == len(b)):
                self.link(a, b)
            else:
                self.poison.append((a, f"pooled over by {eqn.primitive.name}"))

    rule_reduce_window_sum = rule_reduce_window_max = rule_reduce_window_min = _windowed
    rule_reduce_window = _windowed

    def rule_cumsum(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        for k, (a, b) in enumerate(zip(x, o)):
            self.link(a, b)
        self.poison.append((x[eqn.params["axis"]], f"accumulated over by {eqn.primitive.name}"))

    rule_cumprod = rule_cummax = rule_cummin = rule_cumlogsumexp = rule_cumsum

    def rule_pad(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        for a, b, (lo, hi, interior) in zip(x, o, eqn.params["padding_config"]):
            src = np.arange(len(a))
            dst = int(lo) + src * (int(interior) + 1)
            ok = (dst >= 0) & (dst < len(b))
            self.link(a[src[ok]], b[dst[ok]])

    def rule_slice(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        p = eqn.params
        strides = p["strides"] or (1,) * len(x)
        for a, b, s, st in zip(x, o, p["start_indices"], strides):
            self.link(a[int(s) + np.arange(len(b)) * int(st)], b)

    def rule_rev(self, eqn, ins, outs):
        x, o = ins[0], outs[0]
        dims = set(eqn.params["dimensions"])
        for k, (a, b) in enumerate(zip(x, o)):
            self.link(a[::-1] if k in dims else a, b)

    def rule_concatenate(self, eqn, ins, outs):
        o = outs[0]
        d = eqn.params["dimension"]
        off = 0
        for x in ins:
            if x is None:
                continue
            for k, (a, b) in enumerate(zip(x, o)):
                self.link(a, b[off:off + len(a)] if k == d else b)
            off += len(x[d])

    def rule_split(self, eqn, ins, outs):
        x = ins[0]
        d = eqn.params["axis"]
        off = 0
        for o in outs:
            for k, (a, b) in enumerate(zip(x, o)):
                self.link(a[off:off + len(b)] if k == d else a, b)
            off += len(o[d])

    def rule_gather(self, eqn, ins, outs):
        x, idx = ins
        o = outs[0]
        p = eqn.params
        dn = p["dimension_numbers"]
        if x is None or dn.operand_batching_dims:
            return self._unknown_all(eqn, ins, outs)
        sizes = p["slice_sizes"]
        collapsed, index_map = tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)
        batch_out = [k for k in range(len(o)) if k not in dn.offset_dims]
        if idx is not None:  # the index batch axes become the output's non-offset axes
            for a, k in zip(idx[:-1], batch_out):
                self.link(a, o[k])
        for d, k in zip([d for d in range(len(x)) if d not in collapsed], dn.offset_dims):
            if d not in index_map or sizes[d] == len(x[d]):
                self.link(x[d][:sizes[d]], o[k])  # a whole axis (or a static prefix) is copied
            else:
                for a in (x[d], o[k]):
                    self.poison.append((a, "sliced by a gather at data-dependent offsets"))
        value = self.known(eqn.invars[1])
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
            self.link(x[d][pos[ok]], o[batch_out[0]][ok])
        else:
            for d in index_map:
                self.poison.append(
                    (x[d], "indexed by a gather with data-dependent (or multi-axis) indices"))

    def rule_conv_general_dilated(self, eqn, ins, outs):
        lhs, rhs = ins
        out = outs[0]
        p = eqn.params
        dn = p["dimension_numbers"]
        lb, lf, *_ = dn.lhs_spec
        ro, ri, *rsp = dn.rhs_spec
        ob, of, *osp = dn.out_spec
        g = p["feature_group_count"]
        self.link(lhs[lb], out[ob])
        if p["batch_group_count"] != 1:
            for a in (lhs[lf], out[of]):
                self.poison.append((a, "convolution with batch_group_count > 1"))
        elif g == 1:
            self.link(lhs[lf], rhs[ri])
        elif len(rhs[ri]) == 1 and len(lhs[lf]) == g == len(rhs[ro]):
            self.link(lhs[lf], rhs[ro])  # depthwise: channel c reads only input c
        else:
            for a in (lhs[lf], out[of]):
                self.poison.append((a, f"grouped convolution (feature_group_count={g})"))
        self.link(rhs[ro], out[of])
        self.producer_ids.append(rhs[ro])
        self.channel_ids.extend([rhs[ri], lhs[lf]])
        leaf = self.origin.get(eqn.invars[1], -1)
        if leaf >= 0:
            self.roles[(leaf, self.leaf_axis(eqn.invars[1], ro))] = "out"
            if g == 1:
                self.roles[(leaf, self.leaf_axis(eqn.invars[1], ri))] = "in"
        lhs_dil = tuple(p.get("lhs_dilation") or ()) or (1,) * len(rsp)
        if any(d != 1 for d in lhs_dil):
            # a transposed (input-dilated) conv: count only the taps that land on real input
            # positions, not on the inserted zeros or the padding (methods.md: MACs are real work)
            taps = _real_taps(eqn, dn, lhs_dil)
            self.ops.append(("conv", leaf, taps * self.repeat, [out[ob], out[of], rhs[ri]]))
            return
        const = int(np.prod([len(rhs[k]) for k in rsp])) if rsp else 1
        self.ops.append(("conv", leaf, const * self.repeat, [out[k] for k in range(len(out))] + [rhs[ri]]))

    def rule_dot_general(self, eqn, ins, outs):
        lhs, rhs = ins
        out = outs[0]
        (lc, rc), (lbd, rbd) = eqn.params["dimension_numbers"]
        if self.selection_dot(eqn, lhs, out):
            return
        for a, b in zip(lc, rc):
            self.link(lhs[a], rhs[b])
        k = 0
        for a, b in zip(lbd, rbd):
            self.link(lhs[a], rhs[b])
            self.link(lhs[a], out[k])
            k += 1
        lfree = [i for i in range(len(lhs)) if i not in lc and i not in lbd]
        rfree = [i for i in range(len(rhs)) if i not in rc and i not in rbd]
        for i in lfree:
            self.link(lhs[i], out[k]); k += 1
        for i in rfree:
            self.link(rhs[i], out[k]); k += 1
        leaf = self.origin.get(eqn.invars[1], -1)
        w, free, contr, wi = rhs, rfree, rc, 1
        if leaf < 0 and self.origin.get(eqn.invars[0], -1) >= 0:
            leaf, w, free, contr, wi = self.origin[eqn.invars[0]], lhs, lfree, lc, 0
        if leaf >= 0:
            wv = eqn.invars[wi]
            for i in free:
                self.roles[(leaf, self.leaf_axis(wv, i))] = "out"
                self.producer_ids.append(w[i])
            for i in contr:
                self.roles[(leaf, self.leaf_axis(wv, i))] = "in"
                self.channel_ids.append(w[i])
        self.ops.append(("dense", leaf, self.repeat, list(out) + [lhs[i] for i in lc]))

    def selection_dot(self, eqn, lhs, out) -> bool:
        """A matmul of data with a constant one-hot matrix (`jaxprune.models.common.gather_channels`)
        moves channels, as a static gather does: output column j is input channel ``rows[j]``
        (no channel where the column is zero). Links them and counts no MACs."""
        (lc, rc), (lbd, _) = eqn.params["dimension_numbers"]
        value = self.known(eqn.invars[1])
        if lhs is None or value is None or lbd or len(lc) != 1 or not self.is_data(eqn.invars[0]):
            return False
        rows = _selection_rows(value, int(rc[0]))
        if rows is None:
            return False
        lfree = [i for i in range(len(lhs)) if i != lc[0]]
        for k, i in enumerate(lfree):
            self.link(lhs[i], out[k])
        cols = np.flatnonzero(rows >= 0)
        self.link(lhs[lc[0]][rows[cols]], out[len(lfree)][cols])
        return True

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

    def rule_scan(self, eqn, ins, outs):
        p = eqn.params
        inner = p["jaxpr"].jaxpr
        n_consts, n_carry, length = p["num_consts"], p["num_carry"], int(p["length"])
        self.repeat *= length  # the body's MACs run `length` times
        self.walk_body(eqn, inner, eqn.invars, stacked=range(n_consts + n_carry, len(eqn.invars)),
                       scattered=self.scattered_carry(range(n_consts, n_consts + n_carry)))
        self.repeat //= length
        self.link_carry(inner.outvars[:n_carry], inner.invars[n_consts:n_consts + n_carry])
        self.link_results(eqn.outvars, inner.outvars, stacked=range(n_carry, len(eqn.outvars)))

    def rule_cond(self, eqn, ins, outs):
        # every branch reads the operands and writes the results; the MACs of every branch
        # are counted (an upper bound: one branch runs)
        for closed in eqn.params["branches"]:
            self.walk_body(eqn, closed.jaxpr, eqn.invars[1:])
            self.link_results(eqn.outvars, closed.jaxpr.outvars)

    def rule_while(self, eqn, ins, outs):
        # the carry is the same channels before, during and after the loop; the loop condition
        # is walked too (a reduction over channels there is refused like anywhere else). The
        # trip count is unknown when tracing: the body's MACs count once.
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        carry = list(eqn.invars[nc + nb:])
        self.walk_body(eqn, p["cond_jaxpr"].jaxpr, list(eqn.invars[:nc]) + carry,
                       scattered=self.scattered_carry(range(nc, nc + len(carry))))
        body = p["body_jaxpr"].jaxpr
        self.walk_body(eqn, body, list(eqn.invars[nc:nc + nb]) + carry,
                       scattered=self.scattered_carry(range(nb, nb + len(carry))))
        self.link_carry(body.outvars, carry)
        self.link_results(eqn.outvars, body.outvars)

    def _unknown_all(self, eqn, ins, outs):
        where = self.where(eqn)
        for ids in ins + outs:
            for a in ids or ():
                self.unknown.append((a, f"primitive '{eqn.primitive.name}' ({where})"))


# primitive name -> rule, see `register_rule` (a process-wide table, like JAX's own
# primitive registrations; the bundled rules are the `_Tracer.rule_*` methods)
_RULES: dict[str, Any] = {}


def register_rule(primitive: str, rule: Callable[[Any], Sequence[tuple[int, int, int, int]]] | str
                  ) -> None:
    """Teaches `trace` how channels pass through a primitive it does not know.

    Args:
      primitive: the primitive's name as it appears in a jaxpr (``jax.make_jaxpr``), e.g.
        ``'sort'`` or the name of your own ``jax.extend.core.Primitive``.
      rule: ``'elementwise'`` (every output axis carries the channels of the same-size axes of
        the operands), or a function of the jaxpr equation returning
        ``(operand index, operand axis, result index, result axis)`` tuples: each pair of axes
        carries the same channels, position for position. Every axis it does not return is
        lost to pruning, with the primitive and the source line as the reason.
    ``rule=None`` removes a registered rule. A primitive without a rule loses every channel
    it touches (``PruningGraph.unprunable`` says which and why); the rest of the model is
    traced as usual.
    """
    if not isinstance(primitive, str) or not primitive:
        raise ValueError(f"primitive must be a primitive name (str), got {primitive!r}")
    if rule is None:
        _RULES.pop(primitive, None)
        return
    if not (rule == "elementwise" or callable(rule)):
        raise ValueError(f"rule must be 'elementwise', a function of the equation or None, got {rule!r}")
    _RULES[primitive] = rule


def _real_taps(eqn, dn, lhs_dil) -> int:
    """Number of (output position, kernel tap) pairs of a conv whose input position is a real
    element of the (undilated) input: the multiply-accumulates per input/output channel pair."""
    p = eqn.params
    lhs_shape = eqn.invars[0].aval.shape
    rhs_shape = eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    strides = p["window_strides"]
    rhs_dil = tuple(p.get("rhs_dilation") or ()) or (1,) * len(strides)
    total = 1
    for d, (la, ra, oa) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
        n_in, k, n_out = lhs_shape[la], rhs_shape[ra], out_shape[oa]
        lo = p["padding"][d][0]
        o = np.arange(n_out)[:, None]
        t = np.arange(k)[None, :]
        pos = o * strides[d] + t * rhs_dil[d] - lo  # position in the dilated, unpadded input
        real = (pos >= 0) & (pos <= (n_in - 1) * lhs_dil[d]) & (pos % lhs_dil[d] == 0)
        total *= int(real.sum())
    return total


def _where(eqn) -> str:
    try:
        from jax._src import source_info_util

        where = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - best effort location
        where = ""
    return where or "unknown location"


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if edges:
        a = np.concatenate([e[0] for e in edges])
        b = np.concatenate([e[1] for e in edges])
    else:
        a = b = np.zeros(0, np.int64)
    m = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(m, directed=False)[1]


def trace(
    apply_fn: Callable[..., Any],
    variables: Any,
    *example_args: Any,
    residual: str = "coupled",
) -> PruningGraph:
    """Traces ``apply_fn(variables, *example_args)`` and returns its prunable groups.

    Args:
      apply_fn: a pure function of the variables pytree and the inputs, in inference mode,
        e.g. ``lambda v, x: model.apply(v, x, train=False)``.
      variables: the variables pytree (arrays or ``jax.ShapeDtypeStruct``s).
      *example_args: example inputs; the first one's leading (batch) axis is traced with size
        1, so the cost figures are per example.
      residual: ``'coupled'`` prunes every channel joined by a residual add with shared
        indices (policy b); ``'scatter'`` prunes each branch on its own and keeps the residual
        stream at full width (policy a, SFP's small model).

    Returns:
      The `PruningGraph`.

    A primitive the tracer cannot follow loses only the channels it touches (their reason, with
    the primitive and the user's source line, is in ``PruningGraph.unprunable``);
    `register_rule` teaches it one.

    Raises:
      ValueError: ``residual`` is not one of 'coupled', 'scatter'.
    """
    if residual not in RESIDUAL_POLICIES:
        raise ValueError(f"residual={residual!r}: expected one of {RESIDUAL_POLICIES}")
    run = run_tracer(apply_fn, variables, example_args, residual, per_example=True)
    return _build_graph(run.tracer, run.comp, run.jaxpr, run.paths, run.leaf_ids, residual)


@dataclasses.dataclass(eq=False)
class TracerRun:
    """What `run_tracer` found: the tracer, the channel component of every id, the jaxpr,
    the variables' leaf paths and the ids of each leaf's axes, and (``record=True``) the
    `Body` of the whole program."""

    tracer: Any
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
    import jax

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
    t = _Tracer(residual, record=record)
    for cv, c in zip(jaxpr.constvars, closed.consts):
        val = _const_value(cv.aval, c)
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

    comp = _components(t.n, t.edges)
    if t.reshapes:
        channel = np.zeros(comp.max() + 1 if t.n else 1, bool)
        for ids in t.channel_ids:
            channel[comp[ids]] = True
        for axis, where in t.splits:  # GroupNorm, pixel shuffle: channels regrouped
            if channel[comp[axis]].any():
                t.poison.append((axis, f"a reshape splits the channel axis (e.g. GroupNorm) at {where}"))
        for merged, parts, sizes in t.reshapes:
            live = [k for k, p in enumerate(parts) if channel[comp[p]].any()]
            if len(live) == 1:
                k = live[0]
                inner = int(np.prod(sizes[k + 1:])) if k + 1 < len(sizes) else 1
                pos = (np.arange(len(merged)) // inner) % sizes[k]
                t.link(merged, parts[k][pos])
            elif len(live) > 1:
                for p in parts:
                    t.poison.append((p, "a reshape merges several channel axes"))
        comp = _components(t.n, t.edges)
    return TracerRun(t, comp, closed, jaxpr, paths, leaf_ids, body)


def _build_graph(t: _Tracer, comp, jaxpr, paths, leaf_ids, residual) -> PruningGraph:
    n_comp = int(comp.max()) + 1 if t.n else 0
    is_producer = np.zeros(n_comp, bool)
    for ids in t.producer_ids:
        is_producer[comp[ids]] = True
    reason: dict[int, str] = {}
    n_leaves = len(leaf_ids)
    for v in jaxpr.invars[n_leaves:]:
        for a in t.ids[v]:
            for c in np.unique(comp[a]):
                reason.setdefault(int(c), "tied to the model input")
    for v in jaxpr.outvars:
        for a in t.axes(v) or ():
            for c in np.unique(comp[a]):
                reason.setdefault(int(c), "tied to the model output")
    for ids, why in t.poison:
        for c in np.unique(comp[ids]):
            reason.setdefault(int(c), why)
    for ids, why in t.unknown:
        # only the channels the primitive touches are lost (jaxprune.graph.register_rule)
        for c in np.unique(comp[ids]):
            reason.setdefault(int(c), f"cannot follow {why}; jaxprune.graph.register_rule "
                                      "teaches the tracer a primitive")

    # Leaf elements of each component: (leaf, axis, position).
    members: dict[int, dict[tuple[int, int], list[int]]] = {}
    for li, ids in enumerate(leaf_ids):
        for ax, a in enumerate(ids):
            cs = comp[a]
            for pos in np.flatnonzero(is_producer[cs]):
                members.setdefault(int(cs[pos]), {}).setdefault((li, ax), []).append(int(pos))

    # Producer order: first conv/dense op that writes the component.
    first_op: dict[int, int] = {}
    for k, (_, leaf, _, _) in enumerate(t.ops):
        if leaf < 0:
            continue
        for ax, a in enumerate(leaf_ids[leaf]):
            if t.roles.get((leaf, ax)) == "out":
                for c in np.unique(comp[a]):
                    first_op.setdefault(int(c), k)

    def role(li: int, ax: int) -> str:
        r = t.roles.get((li, ax))
        if r:
            return r
        return "vector" if len(leaf_ids[li]) == 1 else "other"

    by_sig: dict[tuple, list[int]] = {}
    unprunable: dict[str, str] = {}
    for c, mem in members.items():
        prods = sorted({module_path(paths[li]) for (li, ax) in mem if role(li, ax) == "out"})
        if c in reason:
            for p in prods:
                unprunable.setdefault(p, reason[c])
            continue
        sig = tuple(sorted((k, len(v)) for k, v in mem.items()))
        by_sig.setdefault(sig, []).append(c)

    groups: list[tuple[int, Group]] = []
    comp_group: dict[int, tuple[str, int]] = {}
    for sig, comps in by_sig.items():
        keys = [k for k, _ in sig]
        outs = [k for k in keys if role(*k) == "out"]
        if not outs:
            continue
        lead = outs[0]
        comps.sort(key=lambda c: min(members[c][lead]))
        mlist = []
        for (li, ax) in keys:
            index = np.array([sorted(members[c][(li, ax)]) for c in comps], dtype=np.int64)
            mlist.append(Member(paths[li], ax, index, role(li, ax)))
        order = min(first_op.get(c, 1 << 30) for c in comps)
        op_order = {module_path(paths[leaf]): k for k, (_, leaf, _, _) in enumerate(t.ops)
                    if leaf >= 0}
        producers = tuple(sorted({module_path(paths[li]) for li, _ in outs},
                                 key=lambda p: op_order.get(p, 1 << 30)))
        kinds = {kind for kind, leaf, _, _ in t.ops
                 if leaf >= 0 and module_path(paths[leaf]) in producers}
        g = Group(name=producers[0], size=len(comps), members=tuple(mlist), producers=producers,
                  kind="conv" if "conv" in kinds else "dense")
        groups.append((order, g))
    groups.sort(key=lambda og: og[0])
    named: dict[str, Group] = {}
    for _, g in groups:
        name, k = g.name, 2
        while name in named:
            name, k = f"{g.name}#{k}", k + 1
        g = dataclasses.replace(g, name=name)
        named[name] = g
    # Channel c of component -> (group, channel)
    for name, g in named.items():
        lead = g.filters()[0]
        li = paths.index(lead.path)
        ids = leaf_ids[li][lead.axis]
        for ch, row in enumerate(lead.index):
            comp_group[int(comp[ids[row[0]]])] = (name, ch)
    sizes = {n: g.size for n, g in named.items()}

    def factor(ids: np.ndarray) -> Factor:
        cs = comp[ids]
        per: dict[str, np.ndarray] = {}
        fixed = 0
        for c in cs:
            hit = comp_group.get(int(c))
            if hit is None:
                fixed += 1
            else:
                per.setdefault(hit[0], np.zeros(sizes[hit[0]], np.int64))[hit[1]] += 1
        return Factor(len(ids), fixed, tuple(per.items()))

    leaves = tuple(LeafInfo(paths[i], tuple(len(a) for a in ids), tuple(factor(a) for a in ids))
                   for i, ids in enumerate(leaf_ids))
    ops = tuple(CostOp(kind, module_path(paths[leaf]) if leaf >= 0 else "", const,
                       tuple(factor(a) for a in axes))
                for kind, leaf, const, axes in t.ops)
    for name in named:
        for p in named[name].producers:
            unprunable.pop(p, None)
    return PruningGraph(named, unprunable, leaves, ops, residual)


def trace_linen(model: Any, variables: Any, x: Any, residual: str = "coupled",
                **apply_kwargs: Any) -> PruningGraph:
    """`trace` for a Flax Linen module in inference mode (``train=False`` if accepted)."""
    import inspect

    kwargs = dict(apply_kwargs)
    if "train" not in kwargs and "train" in inspect.signature(model.__call__).parameters:
        kwargs["train"] = False
    return trace(lambda v, a: model.apply(v, a, **kwargs), variables, x, residual=residual)
