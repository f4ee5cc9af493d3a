"""Cost factors: the channel count of every traced axis as a function of the groups' masks,
for every variable leaf and every multiply-accumulate op (`jaxprune.flops` counts from them)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from jaxprune.graph.types import CostOp, Factor, LeafInfo, module_path


def real_taps(eqn, dn, lhs_dil) -> int:
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


def cost_tables(comp: np.ndarray, comp_group: Mapping[int, tuple[str, int]],
                sizes: Mapping[str, int], paths: list, leaf_ids: list, ops: list
                ) -> tuple[tuple[LeafInfo, ...], tuple[CostOp, ...]]:
    """The `LeafInfo` of every leaf and the `CostOp` of every traced op.

    Args:
      comp: the channel component of every id.
      comp_group: component -> (group name, channel) of every component a group prunes.
      sizes: group name -> channel count.
      paths, leaf_ids: each leaf's path and the ids of its axes.
      ops: the tracer's ``(kind, leaf, const, axes ids)`` of each conv / dot_general.
    """

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
    cost_ops = tuple(CostOp(kind, module_path(paths[leaf]) if leaf >= 0 else "", const,
                            tuple(factor(a) for a in axes))
                     for kind, leaf, const, axes in ops)
    return leaves, cost_ops
