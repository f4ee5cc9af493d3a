"""Prunable groups: `trace` walks a model's jaxpr (`jaxprune.graph.tracer`) and groups the
connected channel components by the variable leaves they touch.

Connected components are single prunable channels; components with the same set of member
leaves form a `Group`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import numpy as np

from jaxprune.graph.costs import cost_tables
from jaxprune.graph.tracer import Tracer, run_tracer
from jaxprune.graph.types import NORM_POLICIES, RESIDUAL_POLICIES, Group, Member, PruningGraph, module_path


def trace(
    apply_fn: Callable[..., Any],
    variables: Any,
    *example_args: Any,
    residual: str = "coupled",
    norms: str = "refuse",
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
      norms: channels summed over (a LayerNorm, RMSNorm, GroupNorm or any mean over the
        channel axis; a GroupNorm of G groups prunes channel j of every group as one unit):
        ``'refuse'`` reports them unprunable (removing a channel changes the statistic);
        ``'masked'`` prunes them, and the groups are listed in ``PruningGraph.normalised``: the
        masked model is then `jaxprune.masked_norm.masked_apply` of ``apply_fn`` (each such sum
        runs over the kept channels, scaled by full / kept count, so a mean is the mean of the
        kept channels), and compaction narrows the sums the same way.

    Returns:
      The `PruningGraph`.

    A primitive the tracer cannot follow loses only the channels it touches (their reason, with
    the primitive and the user's source line, is in ``PruningGraph.unprunable``);
    `register_rule` teaches it one.

    Raises:
      ValueError: ``residual`` is not one of 'coupled', 'scatter', or ``norms`` not one of
        'refuse', 'masked'.
    """
    if residual not in RESIDUAL_POLICIES:
        raise ValueError(f"residual={residual!r}: expected one of {RESIDUAL_POLICIES}")
    if norms not in NORM_POLICIES:
        raise ValueError(f"norms={norms!r}: expected one of {NORM_POLICIES}")
    run = run_tracer(apply_fn, variables, example_args, residual, per_example=True)
    return build_graph(run.tracer, run.comp, run.jaxpr, run.paths, run.leaf_ids, residual,
                       norms=norms)


def build_graph(t: Tracer, comp: np.ndarray, jaxpr: Any, paths: list, leaf_ids: list,
                residual: str, norms: str = "refuse") -> PruningGraph:
    """The `PruningGraph` of a walk: components with the same member leaves form a group;
    components tied to the input or output, poisoned or lost are unprunable (and, with
    ``norms='refuse'``, summed over)."""
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
    for ids, why in t.poison + (t.sums if norms == "refuse" else []):
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

    leaves, ops = cost_tables(comp, comp_group, sizes, paths, leaf_ids, t.ops)
    for name in named:
        for p in named[name].producers:
            unprunable.pop(p, None)
    summed = {comp_group[int(c)][0] for ids, _ in t.sums for c in np.unique(comp[ids])
              if int(c) in comp_group} if norms == "masked" else set()
    return PruningGraph(named, unprunable, leaves, ops, residual,
                        normalised=frozenset(summed))


def trace_linen(model: Any, variables: Any, x: Any, residual: str = "coupled",
                norms: str = "refuse", **apply_kwargs: Any) -> PruningGraph:
    """`trace` for a Flax Linen module in inference mode (``train=False`` if accepted)."""
    kwargs = dict(apply_kwargs)
    if "train" not in kwargs and "train" in inspect.signature(model.__call__).parameters:
        kwargs["train"] = False
    return trace(lambda v, a: model.apply(v, a, **kwargs), variables, x, residual=residual,
                 norms=norms)
