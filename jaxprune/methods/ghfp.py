"""GHFP - Gradually Hard Filter Pruning (Cai, An, Xu, arXiv 2011.03170; methods.md section 4).

The paper's formulas were not available; this is the interpretation of methods.md, which
follows the public code of the same first author:

- The soft part is any SFP variant (`jaxprune.methods.sfp.SFP`: SFP, ASFP, SRFP, ASRFP). At
  each re-selection, after ``t`` completed epochs, the pruned set ``S_t`` of every pruned group
  is its ``int(N * P_t)`` lowest-scoring channels (``P_t`` the soft variant's rate).
- Hard stays hard: channels already hard are scored ``-inf`` before the selection, so they are
  always inside ``S_t`` and count towards its size (if the hard set were ever larger than
  ``int(N * P_t)`` - the bundled rate schedules never shrink, so this does not happen - ``S_t``
  is extended to hold all of it).
- The hard fraction ``h`` is ``schedules.ghfp_hard_fraction(T, end, shape)(e)`` at the end of
  epoch ``e`` (cubic by default: ``1 - (1 - min(1, (e + 1) / (end T)))^3``; also 'linear',
  'exp'); it is 0 at ``init`` (``harden_at_init=True``: the epoch-0 value, as the author's
  code). The hard count per group is ``floor(h * int(N * P_t))`` (``hard_count='selected'``,
  methods.md section 4) or ``int(N * P_t * h)`` (``hard_count='layer'``, the author's code);
  that many lowest members of ``S_t`` (already-hard ones first, then by score, ties to the lower
  index) are hard afterwards; the hard set only grows (``max(count, |hard|)`` channels).
- The author's variant (`GHFP.author`): the soft part is ASFP with the cubic rate, the ramp
  ends at T (``end=1``), ``hard_count='layer'`` and ``harden_at_init=True`` (methods.md
  section 7). Its recipe differs too (Cutout, no warm-up epoch): see the GHFP configs.
- Hard channels get 0 in the state's ``masks`` and ``hard``; every member slice of them (filters,
  BN parameters and statistics, consumers' inputs) is zeroed (`jaxprune.masks.zero_channels`),
  and the train step's ``hard_masked`` optimizer masks their updates and moments from then on. The soft rest of ``S_t`` is treated as the soft variant
  treats it (zeroed filters, or multiplied by ``alpha_t`` for SRFP/ASRFP); it may come back at
  a later re-selection if its score grows.
- finalize: one last selection at the full rate ``P`` (hard channels first) and everything
  selected becomes hard, so the final model is exactly the hard-pruned one (``masks == hard``).

``GHFP(...).pruner(graph, total_epochs)`` is the method as a `jaxprune.pruner.Pruner` over a
`GHFPState`; its ``update`` is jittable with a traced count: the selection is `jaxprune.selection`'s
(``hard_first``, ``prune_by_count``, ``grow_hard``), whose counts are data, not shapes; see
`jaxprune.methods.sfp` for the host/traced arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import schedules, selection, validate
from jaxprune.graph import PruningGraph
from jaxprune.masks import apply_masks, init_masks
from jaxprune.methods.sfp import SFP, SoftRule, as_counts, harden, with_params
from jaxprune.pruner import (Pruner, check_variables, epoch_of, next_count, zero_count,
                             zero_penalty)
from jaxprune.selection import is_traced

HARD_COUNTS = ("selected", "layer")


class GHFPState(NamedTuple):
    """The state of GHFP.

    Attributes:
      masks: group name -> float32 ``[C]``: 0 hard, ``alpha_t`` (0 unless SRFP) soft-selected,
        1 kept.
      hard: group name -> float32 ``[C]``, 0 where a channel is hard-pruned; only grows.
      count: int32 scalar, the epochs done.
    """

    masks: dict
    hard: dict
    count: Any


@dataclasses.dataclass(frozen=True)
class GHFP:
    """Gradually Hard Filter Pruning on top of an SFP variant (see the module docstring).

    Attributes:
      soft: the soft part: an `SFP` (its rate, criterion, exclude, ASFP/SRFP options) or any
        other `jaxprune.methods.sfp.SoftRule` (scores, counts and decay of a soft selection);
        GHFP hardens its selections gradually (``selection.hard_first`` / ``grow_hard``).
      shape: the hard-fraction ramp, 'cubic', 'linear' or 'exp'.
      end: the fraction of training at which every pruned channel is hard (0.9).
      hard_count: 'selected' (``floor(h * int(N * P_t))``, methods.md) or 'layer'
        (``int(N * P_t * h)``, the author's code).
      harden_at_init: the selection before training already hardens ``h`` at epoch 0 (the
        author's code); False: nothing is hard before the first epoch.
      name: 'ghfp'.
    """

    soft: SFP = SFP()
    shape: str = "cubic"
    end: float = 0.9
    hard_count: str = "selected"
    harden_at_init: bool = False
    name: str = "ghfp"

    @classmethod
    def author(cls, rate: float, **soft_options: Any) -> "GHFP":
        """GHFP as its first author's public code runs it (methods.md section 7): ASFP with the
        cubic rate as the soft part, the cubic ramp reaching 1 at T, ``int(N * P_t * h)`` hard
        channels per layer, the epoch-0 hard fraction already at the first selection."""
        soft = SFP(rate=rate, asymptotic=True, rate_shape="cubic", **soft_options)
        return cls(soft=soft, shape="cubic", end=1.0, hard_count="layer", harden_at_init=True)

    def __post_init__(self):
        if not isinstance(self.soft, SoftRule):
            raise ValueError(f"soft must be a soft selection rule (SFP or another "
                             f"methods.sfp.SoftRule), got {self.soft!r}")
        validate.one_of(self.shape, schedules.HARD_SHAPES, "ramp shape")
        validate.fraction(self.end, "end", closed_low=False, closed_high=True)
        validate.one_of(self.hard_count, HARD_COUNTS, "hard_count")
        if not isinstance(self.harden_at_init, bool):
            raise ValueError(f"harden_at_init must be True or False, got {self.harden_at_init!r}")

    def hard_fraction(self, epoch: Any, total_epochs: int) -> Any:
        """``h`` after the end of epoch ``epoch`` (0-based); a Python float for a Python epoch."""
        return schedules.ghfp_hard_fraction(total_epochs, self.end, self.shape)(epoch)

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """This method as a `jaxprune.pruner.Pruner` over a `GHFPState`.

        Args:
          graph: the model's `jaxprune.graph.PruningGraph`.
          total_epochs: the training length ``T`` of the rate schedule and the hard ramp.
          steps_per_epoch: unused (the methods share one signature).

        Returns:
          ``Pruner(init, update, finalize, penalty)``; the penalty is zero.
        """
        del steps_per_epoch
        self.soft.check(graph, total_epochs)

        def init(variables):
            check_variables(variables)
            ones = init_masks(graph)
            return self._select(variables, GHFPState(ones, dict(ones), zero_count()), graph, 0,
                                total_epochs)

        def update(variables, state):
            variables, new = self._select(variables, state, graph, epoch_of(state.count) + 1,
                                          total_epochs)
            return variables, new._replace(count=next_count(state.count))

        def finalize(variables, state):
            counts = self.soft.final_counts(graph)  # int(N P), then the width policy
            # Everything selected becomes hard: the hard count equals the pruned count.
            variables, masks, hard = _ghfp_select(self, graph, variables, state.hard,
                                                  as_counts(counts), as_counts(counts),
                                                  jnp.float32(0.0))
            return variables, state._replace(masks=masks, hard=hard)

        return Pruner(init, update, finalize, zero_penalty, total_epochs)

    def counts_at(self, graph: Any, t: Any, total_epochs: int) -> tuple[dict, dict]:
        """``(pruned, hard)``: per pruned group, the size of ``S_t`` and the hard count of the
        selection after ``t`` completed epochs (``t = 0``: the one before training). Python ints
        for a Python ``t``; the hard set may still be larger (hard stays hard)."""
        names = self.soft.pruned_groups(graph)
        counts = self.soft.counts_at(graph, names, t, total_epochs)
        if is_traced(t):
            h = jnp.where(t > 0, self.hard_fraction(t - 1, total_epochs),
                          self.hard_fraction(0, total_epochs) if self.harden_at_init else 0.0)
        elif t > 0:
            h = self.hard_fraction(t - 1, total_epochs)
        else:
            h = self.hard_fraction(0, total_epochs) if self.harden_at_init else 0.0
        # never more hard channels than the final selection prunes (its width policy may keep
        # more than int(N P)): hard stays hard, so the cap must hold from the start
        final = self.soft.final_counts(graph)
        rate = self.soft.rate_at(t, total_epochs)
        hard_counts = {}
        for n, size in counts.items():  # on the host when everything is static
            # 'selected': floor(h * |S_t|); 'layer': int(N * P_t * h), the author's order
            base = size if self.hard_count == "selected" else graph.groups[n].size * rate
            if is_traced(base) or is_traced(h):
                hard = jnp.floor(jnp.asarray(base, jnp.float32) * h).astype(jnp.int32)
                hard_counts[n] = jnp.minimum(hard, final[n])
            else:
                hard_counts[n] = min(math.floor(base * h), final[n])
        return counts, hard_counts

    def _select(self, variables: Any, state: GHFPState, graph: PruningGraph, t: Any,
                total_epochs: int) -> tuple[Any, GHFPState]:
        counts, hard_counts = self.counts_at(graph, t, total_epochs)
        alpha = jnp.asarray(self.soft.alpha_at(t, total_epochs), jnp.float32)
        variables, masks, hard = _ghfp_select(self, graph, variables, state.hard,
                                              as_counts(counts), as_counts(hard_counts), alpha)
        return variables, state._replace(masks=masks, hard=hard)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ghfp_select(method: GHFP, graph: PruningGraph, variables: Any, hard_before: dict,
                 counts: dict, hard_counts: dict, alpha: jax.Array):
    names = method.soft.pruned_groups(graph)
    scores = method.soft.scores(variables, graph, names)
    hard_now = {n: hard_before[n] for n in names}
    n_hard = {n: jnp.sum(hard_now[n] == 0).astype(jnp.int32) for n in names}
    # hard stays hard: hard channels rank first and count towards S_t (extended to hold them)
    first = selection.hard_first(scores, hard_now)
    in_s = selection.prune_by_count(first, {n: jnp.maximum(counts[n], n_hard[n]) for n in names})
    grown = selection.grow_hard(first, in_s, hard_now, counts={n: hard_counts[n] for n in names})
    hard = dict(hard_before)
    hard.update(grown)
    masks = init_masks(graph)
    for n in names:
        masks[n] = jnp.where(hard[n] == 0, 0.0,
                             jnp.where(in_s[n] == 0, alpha, 1.0)).astype(jnp.float32)
    soft_masks = {n: jnp.where(hard[n] == 0, 1.0, masks[n]) for n in masks}
    params = apply_masks(variables["params"], soft_masks, graph, roles=method.soft.soft_roles,
                         prefix=("params",))
    return harden(with_params(variables, params), hard, graph), masks, hard
