"""Cost counting: exact params and MACs of a model under masks, and a differentiable version.

Everything is read off the traced forward pass (`PruningGraph.ops` and `.leaves`): an op's MACs
are ``const * prod(axis counts)`` and a leaf's size is ``prod(axis counts)``, where each axis
count is the number of its positions whose channel is kept. With no masks this is the dense
model; with 0/1 masks it is exactly the compacted model; with real-valued per-group counts it is
a smooth polynomial (HFP's complexity penalty).

Two MAC conventions are used by the papers (methods.md): ``'conv'`` counts convolutions only
(SFP's scripts), ``'conv_fc'`` counts convolutions and fully-connected layers (PFEC).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from jaxprune.graph import Factor, PruningGraph

CONVENTIONS = ("conv", "conv_fc")


@dataclasses.dataclass(frozen=True)
class Cost:
    """Exact integer cost of a (masked or compacted) model, per example.

    Attributes:
      macs: multiply-accumulates of the counted ops.
      params: number of trainable parameters (the 'params' collection).
      per_layer: module path -> MACs of each counted op (summed if a module runs twice).
      convention: 'conv' or 'conv_fc'.
    """

    macs: int
    params: int
    per_layer: dict[str, int]
    convention: str


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {CONVENTIONS} "
                         "('conv': conv MACs only as SFP; 'conv_fc': conv + FC MACs as PFEC)")


def _exact_count(f: Factor, keep: Mapping[str, np.ndarray] | None) -> int:
    if keep is None:
        return f.size
    n = f.fixed
    for g, per in f.per_channel:
        n += int(np.dot(per, keep[g]))
    return n


def count(graph: PruningGraph, masks: Mapping[str, object] | None = None,
          convention: str = "conv") -> Cost:
    """Exact MACs and params of the model with ``masks`` applied (None: dense).

    A channel counts as removed when its mask value is 0. This equals the cost of the model
    that `jaxprune.compaction.compact` builds from the same masks.
    """
    _check_convention(convention)
    keep = None
    if masks is not None:
        keep = {n: (np.asarray(m) != 0).astype(np.int64) for n, m in masks.items()}
        missing = sorted(set(graph.groups) - set(keep))
        if missing:
            raise ValueError(f"masks are missing groups {missing}")
    per_layer: dict[str, int] = {}
    total = 0
    for op in graph.ops:
        if convention == "conv" and op.kind != "conv":
            continue
        macs = op.const * math.prod(_exact_count(f, keep) for f in op.factors)
        per_layer[op.module] = per_layer.get(op.module, 0) + macs
        total += macs
    params = sum(math.prod(_exact_count(f, keep) for f in leaf.factors)
                 for leaf in graph.leaves if leaf.is_param)
    return Cost(total, params, per_layer, convention)


def _soft_count(f: Factor, counts: Mapping[str, jnp.ndarray], sizes: Mapping[str, int]):
    n = float(f.fixed)
    for g, per in f.per_channel:
        n = n + (float(per.sum()) / sizes[g]) * counts[g]
    return n


def soft_cost(graph: PruningGraph, counts: Mapping[str, jnp.ndarray],
              convention: str = "conv") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Differentiable ``(macs, params)`` as functions of real-valued kept-channel counts.

    ``counts[g]`` is the (soft) number of kept channels of group ``g``; for integer counts of
    whole groups this equals `count`. Use it inside a loss (HFP) and differentiate with JAX.
    """
    _check_convention(convention)
    sizes = graph.group_sizes()
    macs = 0.0
    for op in graph.ops:
        if convention == "conv" and op.kind != "conv":
            continue
        term = float(op.const)
        for f in op.factors:
            term = term * _soft_count(f, counts, sizes)
        macs = macs + term
    params = 0.0
    for leaf in graph.leaves:
        if leaf.is_param:
            term = 1.0
            for f in leaf.factors:
                term = term * _soft_count(f, counts, sizes)
            params = params + term
    return jnp.asarray(macs), jnp.asarray(params)


def sfp_formula_macs(depth: int, keep_ratio: float) -> float:
    """SFP's closed-form conv MACs of a CIFAR ResNet at float keep ratio K (methods.md 2).

    The stem costs x K, both convs of the first block of stage 1 x K^2, in every other block
    the first conv x K and the second x K^2. Returns MACs (a float, as the paper's formula).
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth={depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 56, 110)")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio}: expected 0 < K <= 1")
    n = (depth - 2) // 6
    k = keep_ratio
    full = 32 * 32 * 16 * 16 * 9  # every 3x3 conv whose input and output widths match its stage
    total = 32 * 32 * 3 * 16 * 9 * k
    for stage in range(3):
        for b in range(n):
            first = full // 2 if (stage > 0 and b == 0) else full
            if stage == 0 and b == 0:
                total += 2 * full * k * k
            else:
                total += first * k + full * k * k
    return total


def sfp_formula_reduction(depth: int, keep_ratio: float) -> float:
    """SFP's reported FLOPs reduction, ``1 - macs(K) / macs(1)``."""
    return 1.0 - sfp_formula_macs(depth, keep_ratio) / sfp_formula_macs(depth, 1.0)
