"""HFP - Holistic Filter Pruning (Enderich, Timm, Burgard, WACV 2021; methods.md section 5).

The paper's formulation was not available and no public code exists; this is the
interpretation of methods.md, with the choices below.

- **Gates.** Every channel of a *gated* group has the score ``s_c = |gamma_c|``, its BN scale
  (summed over the group's BN scales when a coupled group has several: ``criteria.bn_scale``). Gated groups: every group with a BN scale in ``'params'``, minus the
  ones with a producer matched by ``exclude`` (paths / fnmatch patterns / predicate, as SFP).
  Other groups keep all their channels.
- **Normalisation.** Scores are made comparable across layers by dividing by a per-group
  reference ``ref_g = max_c s_c`` (``norm_c = s_c / ref_g`` in [0, 1]). ``ref_g`` is held in
  the state's ``ref`` and refreshed at every ``init``/``update``, so it is a constant
  inside the train step: the penalty's gradient never flows through the normaliser, and every
  BN scale receives a gradient of the sign of ``gamma`` (descent shrinks ``|gamma|``).
- **Soft counts and cost.** ``n_g = sum_c sigmoid((norm_c - tau) / temperature)``; MACs and
  params are ``flops.soft_cost(graph, n)`` (convention ``'conv_fc'`` by default: conv and FC
  multiplications, as "the number of multiplications"), residual couplings included.
- **Penalty.** ``lam * (relu(MACs / target_macs - 1) + relu(Params / target_params - 1))``
  (a term is left out when its target is not set); zero, with zero gradient, under target.
- **Threshold rule (tau).** ``tau`` is a global threshold over the normalised scores, held in
  the state's ``tau`` and updated at ``init`` and at every epoch end (jittable, float32): first
  the hard threshold ``tau_hard`` that meets the targets on the current scores is found (prune
  the globally lowest normalised scores in `selection.global_order`, each group's best channel
  protected, until both targets are met; ``tau_hard`` is the midpoint between the last pruned
  and the first kept score), then ``tau = tau_hard - margin * temperature`` (``margin = 2``: a
  channel at the hard boundary counts ``sigmoid(2) = 0.88``). So the soft complexity tracks the
  targets from above: the channels the hard pruning would keep count (almost) fully, the ones it
  would remove still count while their score is near the boundary, and the penalty is active
  until they have been pushed well below it (the scores polarise, the hard pruning then removes
  channels that no longer matter). Centring the sigmoid at ``tau_hard`` itself would make the
  smoothed count of clustered scores (BN scales all near 1 when training from scratch) fall
  below the target, and the penalty would never act. The state's ``masks`` hold the selection at
  ``tau_hard`` as information (params are never modified during training; ``hard`` stays 1).
- **Final hard pruning (finalize).** Host side, exact integer costs (``flops.count``): with
  the channels ordered by normalised score (`selection.global_order`, in float64: each
  group's best channel last, never pruned, so no group reaches zero channels), the smallest
  prefix whose removal meets BOTH targets is pruned: both at or under target, the binding one
  to within one channel. With
  ``balance=True`` and both targets given, if the other target is more than ``tolerance``
  (0.5% of the dense figure) under its target, the order is tilted layer-wise,
  ``key_c = norm_c * r_g ** beta`` with ``r_g`` the group's MACs-per-channel share over its
  params-per-channel share (geometric-mean normalised): ``beta > 0`` spares MAC-heavy layers
  (removes more params per MAC), ``beta < 0`` the opposite. The smallest ``|beta|`` on a grid
  (step 0.05 up to 4, then bisection between neighbouring grid points where the binding
  target switches) that puts both figures within ``tolerance`` of their targets is used; if
  none does (targets too coarse for the channel granularity), the one with the smallest
  worst slack. The state's ``beta`` records it.
  Then ``masks == hard`` and every slice of the pruned channels is zeroed (the masked model
  equals the compacted model; the train step's ``hard_masked`` clears their moments).
- Targets: ``macs_reduction`` / ``params_reduction`` (fractions of the dense figure to remove)
  or ``target_macs`` / ``target_params`` (absolute, per example). An unreachable target
  (even with one channel per gated group) raises ValueError at ``init``.

``HFP(...).pruner(graph, total_epochs, steps_per_epoch)`` is the method as a
`jaxprune.pruner.Pruner` over an `HFPState`. `allocation` reports the per-group ``(kept,
total)`` of a state's masks; `cost_report` the exact MACs/params against the targets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import criteria, flops, selection, validate
from jaxprune.graph import PruningGraph
from jaxprune.masks import init_masks
from jaxprune.methods.sfp import (check_exclude, harden, is_excluded,
                                  normalize_exclude, subgraph)
from jaxprune.pruner import Pruner, check_total_epochs, check_variables, next_count, zero_count

BETA_STEP = 0.05
BETA_MAX = 4.0


class HFPState(NamedTuple):
    """The state of HFP.

    Attributes:
      masks: group name -> float32 ``[C]``: the hard selection at ``tau_hard`` (information;
        the final 0/1 masks after ``finalize``).
      hard: group name -> float32 ``[C]``: all ones until ``finalize`` (then ``masks``).
      count: int32 scalar, the epochs done.
      tau: float32 scalar, the sigmoid's centre over the normalised scores.
      ref: gated group name -> float32 scalar, the normaliser ``max_c s_c``.
      beta: float32 scalar, the final order's tilt (0 before ``finalize``).
    """

    masks: dict
    hard: dict
    count: Any
    tau: Any
    ref: dict
    beta: Any


class Budget(NamedTuple):
    """Dense figures and absolute targets (None: unconstrained) of one graph."""

    dense_macs: int
    dense_params: int
    target_macs: float | None
    target_params: float | None


def _bn_scales(group) -> list:
    return [m for m in group.members
            if m.role == "vector" and m.path[0] == "params" and m.path[-1] == "scale"]


@dataclasses.dataclass(frozen=True)
class HFP:
    """Holistic Filter Pruning (see the module docstring).

    Attributes:
      macs_reduction, params_reduction: fraction of the dense MACs / params to remove, [0, 1).
      target_macs, target_params: absolute targets instead (per example); one of each pair.
      lam: weight of the complexity penalty.
      temperature: sigmoid temperature of the soft counts, in normalised-score units.
      margin: ``tau`` sits ``margin * temperature`` below the hard threshold (see above).
      convention: MAC convention of ``jaxprune.flops`` ('conv_fc' or 'conv').
      exclude: producer paths / patterns / predicate whose groups are not gated.
      balance: tilt the final order so that both targets are met within ``tolerance``.
      tolerance: accepted slack under each target, as a share of the dense figure.
      width: a `jaxprune.selection.WidthPolicy` (or ``round_to`` int) applied to every gated
        group's kept count inside the final threshold search, so the rounded model still
        meets both targets (the search prunes further where rounding up would exceed them).
    """

    macs_reduction: float | None = None
    params_reduction: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    lam: float = 1.0
    temperature: float = 0.05
    convention: str = "conv_fc"
    exclude: Any = ()
    margin: float = 2.0
    balance: bool = True
    tolerance: float = 0.005
    width: Any = None
    name: str = "hfp"

    def __post_init__(self):
        for what, red, absolute in (("macs", self.macs_reduction, self.target_macs),
                                    ("params", self.params_reduction, self.target_params)):
            if red is not None and absolute is not None:
                raise ValueError(f"give either {what}_reduction or target_{what}, not both")
            if red is not None:
                validate.rate(red, f"{what}_reduction")
            if absolute is not None and not validate.finite_float(absolute, f"target_{what}") > 0:
                validate.refuse(f"target_{what}", absolute, "a positive number")
        if all(v is None for v in (self.macs_reduction, self.params_reduction,
                                   self.target_macs, self.target_params)):
            raise ValueError("HFP needs a target: macs_reduction/target_macs and/or "
                             "params_reduction/target_params")
        validate.finite_float(self.lam, "lam", minimum=0.0)
        validate.finite_float(self.margin, "margin", minimum=0.0)
        if not validate.finite_float(self.temperature, "temperature") > 0:
            validate.refuse("temperature", self.temperature, "a finite number > 0")
        validate.one_of(self.convention, flops.CONVENTIONS, "convention")
        validate.fraction(self.tolerance, "tolerance", closed_low=False)
        object.__setattr__(self, "exclude", normalize_exclude(self.exclude))
        from jaxprune.selection import as_width_policy

        object.__setattr__(self, "width", as_width_policy(self.width))

    # -- structure
    def gated_groups(self, graph: PruningGraph) -> tuple[str, ...]:
        """Groups with a BN scale and no excluded producer."""
        return tuple(n for n, g in graph.groups.items()
                     if _bn_scales(g) and not any(is_excluded(p, self.exclude) for p in g.producers))

    def budget(self, graph: PruningGraph) -> Budget:
        """Dense figures and absolute targets (host, exact)."""
        return _budget(self, graph)

    # -- gates
    def gates(self, params: Any, graph: PruningGraph, names: Sequence[str]) -> dict[str, jax.Array]:
        """``|gamma|`` per channel (summed over the group's BN scales, `criteria.bn_scale`),
        float32 ``[C]``, of the groups ``names``."""
        return criteria.bn_scale({"params": params}, subgraph(graph, names))

    def soft_counts(self, params: Any, state: HFPState, graph: PruningGraph
                    ) -> dict[str, jax.Array]:
        """``n_g = sum_c sigmoid((s_c / ref_g - tau) / temperature)`` for every gated group."""
        names = self.gated_groups(graph)
        gates = self.gates(params, graph, names)
        tau = state.tau
        return {n: jnp.sum(jax.nn.sigmoid((gates[n] / state.ref[n] - tau)
                                          / self.temperature)) for n in names}

    def soft_cost(self, params: Any, state: HFPState, graph: PruningGraph):
        """Differentiable ``(macs, params)`` of the soft counts."""
        counts: dict[str, Any] = {n: float(g.size) for n, g in graph.groups.items()}
        counts.update(self.soft_counts(params, state, graph))
        return flops.soft_cost(graph, counts, self.convention)

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """This method as a `jaxprune.pruner.Pruner` over an `HFPState`.

        Args:
          graph: the model's `jaxprune.graph.PruningGraph`.
          total_epochs: the training length (checked; HFP's rule does not depend on it).
          steps_per_epoch: unused (the methods share one signature).

        Returns:
          ``Pruner(init, update, finalize, penalty)``; ``init`` raises ValueError when the
          targets are unreachable.
        """
        del steps_per_epoch
        check_total_epochs(total_epochs)
        check_exclude(self.exclude, graph)

        def init(variables):
            check_variables(variables)
            return self._init(variables, graph)

        def update(variables, state):
            return variables, _hfp_retarget(self, graph, variables["params"], state)._replace(
                count=next_count(state.count))

        def finalize(variables, state):
            masks, beta = self.final_masks(variables["params"], graph)
            state = state._replace(masks=masks, hard=dict(masks),
                                   beta=jnp.asarray(beta, jnp.float32))
            return harden(variables, masks, graph), state

        def penalty(variables, state):
            return self.penalty(variables["params"], state, graph)

        return Pruner(init, update, finalize, penalty, total_epochs)

    def _init(self, variables: Any, graph: PruningGraph) -> tuple[Any, HFPState]:
        """The first retarget, after checking that the targets are reachable."""
        names = self.gated_groups(graph)
        if not names:
            raise ValueError("HFP found no group with a BatchNorm scale to gate "
                             "(every pruned conv needs a BN after it)")
        budget = self.budget(graph)
        floor_masks = init_masks(graph)
        for n in names:
            floor_masks[n] = floor_masks[n].at[1:].set(0.0)
        macs, params = self._exact(graph, floor_masks)
        if not self._meets(budget, macs, params):
            raise ValueError(
                f"HFP targets unreachable: with one channel left in every gated group the model "
                f"still has {macs} MACs / {params} params; targets {budget.target_macs} MACs / "
                f"{budget.target_params} params")
        ones = init_masks(graph)
        state = HFPState(masks=ones, hard=dict(ones), count=zero_count(),
                         tau=jnp.zeros((), jnp.float32),
                         ref={n: jnp.ones((), jnp.float32) for n in names},
                         beta=jnp.zeros((), jnp.float32))
        return variables, _hfp_retarget(self, graph, variables["params"], state)

    def penalty(self, params: Any, state: HFPState, graph: PruningGraph
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``lam * (relu(MACs / target_macs - 1) + relu(Params / target_params - 1))`` of the
        soft counts and its metrics (differentiable in ``params``)."""
        budget = self.budget(graph)
        macs, n_params = self.soft_cost(params, state, graph)
        pen = jnp.zeros((), jnp.float32)
        if budget.target_macs is not None:
            pen = pen + jax.nn.relu(macs / budget.target_macs - 1.0)
        if budget.target_params is not None:
            pen = pen + jax.nn.relu(n_params / budget.target_params - 1.0)
        pen = self.lam * pen
        metrics = {"hfp_penalty": pen, "hfp_macs": macs, "hfp_params": n_params,
                   "hfp_tau": state.tau}
        return pen, metrics

    # -- reports
    def allocation(self, masks: Mapping[str, Any], graph: PruningGraph
                   ) -> dict[str, tuple[int, int]]:
        """Group name -> ``(kept, total)`` channels of ``masks``."""
        return {n: (int(np.count_nonzero(np.asarray(masks[n]))), g.size)
                for n, g in graph.groups.items()}

    def cost_report(self, masks: Mapping[str, Any], graph: PruningGraph) -> dict[str, float]:
        """Exact MACs/params of ``masks`` against the dense figures and the targets."""
        b = self.budget(graph)
        macs, params = self._exact(graph, masks)
        return {"macs": macs, "params": params, "dense_macs": b.dense_macs,
                "dense_params": b.dense_params,
                "target_macs": b.target_macs, "target_params": b.target_params,
                "macs_reduction": 1.0 - macs / b.dense_macs,
                "params_reduction": 1.0 - params / b.dense_params}

    # -- internals
    def _exact(self, graph: PruningGraph, masks: Mapping[str, Any]) -> tuple[int, int]:
        cost = flops.count(graph, masks, self.convention)
        return cost.macs, cost.params

    @staticmethod
    def _meets(b: Budget, macs: float, params: float) -> bool:
        return ((b.target_macs is None or macs <= b.target_macs)
                and (b.target_params is None or params <= b.target_params))

    def _retarget(self, params: Any, state: HFPState, graph: PruningGraph) -> HFPState:
        """Refreshes ``ref`` and ``tau`` and records the hard selection at ``tau`` (jittable)."""
        names = self.gated_groups(graph)
        gates = self.gates(params, graph, names)
        ref = {n: jnp.maximum(jnp.max(gates[n]), 1e-12) for n in names}
        norm = {n: gates[n] / ref[n] for n in names}
        tau, keep = self._threshold(norm, graph, names)
        masks = init_masks(graph)
        masks.update(keep)
        return state._replace(masks=masks, tau=tau, ref=ref)

    def _threshold(self, norm: Mapping[str, jax.Array], graph: PruningGraph,
                   names: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Global threshold meeting the targets on ``norm`` (float32 soft_cost, vectorised)."""
        budget = self.budget(graph)
        sizes = [graph.groups[n].size for n in names]
        total = sum(sizes)
        max_pruned = total - len(names)
        flat = jnp.concatenate([norm[n] for n in names])
        order = selection.global_order(norm, names)
        vals = flat[order]
        gid = jnp.asarray(np.repeat(np.arange(len(names)), sizes))[order]
        onehot = (gid[:, None] == jnp.arange(len(names))[None, :]).astype(jnp.float32)
        removed = jnp.concatenate([jnp.zeros((1, len(names)), jnp.float32),
                                   jnp.cumsum(onehot, axis=0)])  # [total + 1, G]
        counts: dict[str, Any] = {n: float(g.size) for n, g in graph.groups.items()}
        counts.update({n: sizes[i] - removed[:, i] for i, n in enumerate(names)})
        macs, params = flops.soft_cost(graph, counts, self.convention)
        ok = jnp.arange(total + 1) <= max_pruned
        if budget.target_macs is not None:
            ok = ok & (macs <= budget.target_macs)
        if budget.target_params is not None:
            ok = ok & (params <= budget.target_params)
        k = jnp.where(jnp.any(ok), jnp.argmax(ok), max_pruned)
        lo = vals[jnp.maximum(k - 1, 0)]
        hi = vals[jnp.minimum(k, total - 1)]
        boundary = jnp.where(k == 0, vals[0], 0.5 * (lo + hi))
        tau = (boundary - self.margin * self.temperature).astype(jnp.float32)
        return tau, selection.prune_first(order, k, names, sizes)

    def tilt_ratios(self, graph: PruningGraph, names: Sequence[str]) -> np.ndarray:
        """``r_g``: MACs share over params share of one channel of each group (exact, at the
        dense model), normalised to geometric mean 1."""
        b = self.budget(graph)
        dense = {n: np.ones(g.size, np.float32) for n, g in graph.groups.items()}
        ratio = []
        for n in names:
            one_less = dict(dense)
            one_less[n] = dense[n].copy()
            one_less[n][0] = 0.0
            macs, params = self._exact(graph, one_less)
            dm = (b.dense_macs - macs) / b.dense_macs
            dp = (b.dense_params - params) / b.dense_params
            ratio.append((dm + 1e-12) / (dp + 1e-12))
        logr = np.log(np.asarray(ratio, np.float64))
        return np.exp(logr - logr.mean())

    def final_masks(self, params: Any, graph: PruningGraph) -> tuple[dict[str, jax.Array], float]:
        """The exact final hard selection and the tilt ``beta`` used (see the module docstring)."""
        names = self.gated_groups(graph)
        b = self.budget(graph)
        gates = {n: np.asarray(v, np.float64) for n, v in self.gates(params, graph, names).items()}
        norm = {n: v / max(v.max(), 1e-12) for n, v in gates.items()}
        sizes = [graph.groups[n].size for n in names]
        total, max_pruned = sum(sizes), sum(sizes) - len(names)
        both = b.target_macs is not None and b.target_params is not None
        if self.balance and both:
            ratios = np.repeat(self.tilt_ratios(graph, names), sizes)
            steps = np.arange(1, int(round(BETA_MAX / BETA_STEP)) + 1) * BETA_STEP
            betas = [0.0] + [s * sign for s in steps for sign in (1.0, -1.0)]
        else:
            ratios, betas = np.ones(total), [0.0]

        flat = np.concatenate([norm[n] for n in names])
        offsets = np.cumsum([0] + sizes)

        def masks_for(order, k):
            kept = selection.prune_first(order, k, names, sizes)
            if not self.width.exact:  # per group, the kept count the width policy allows
                rank = np.empty(total, np.int64)
                rank[order] = np.arange(total)  # position in the pruning order (low = weak)
                for i, (n, s) in enumerate(zip(names, sizes)):
                    want = self.width.kept(s, max(int(kept[n].sum()), 1), n)
                    # strongest first
                    by_strength = np.argsort(-rank[offsets[i]:offsets[i + 1]], kind="stable")
                    kept[n] = np.zeros(s, np.float32)
                    kept[n][by_strength[:want]] = 1.0
            out = {n: np.ones(g.size, np.float32) for n, g in graph.groups.items()}
            out.update(kept)
            return out

        def slacks(macs, params):
            sm = (b.target_macs - macs) / b.dense_macs if b.target_macs is not None else 0.0
            sp = (b.target_params - params) / b.dense_params if b.target_params is not None else 0.0
            return sm, sp

        def solve(beta):
            key = flat * ratios ** beta  # one factor per group: each group's best stays its best
            order = selection.global_order(
                {n: key[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}, names)
            lo, hi = 0, max_pruned
            if not self._meets(b, *self._exact(graph, masks_for(order, hi))):
                raise ValueError("HFP targets unreachable with one channel per gated group")
            while lo < hi:  # cost never grows with more pruned channels
                mid = (lo + hi) // 2
                if self._meets(b, *self._exact(graph, masks_for(order, mid))):
                    hi = mid
                else:
                    lo = mid + 1
            sm, sp = slacks(*self._exact(graph, masks_for(order, lo)))
            return max(sm, sp), sm - sp, order, lo

        tried: dict[float, tuple] = {}
        best = None
        for beta in betas:
            tried[beta] = solve(beta)
            if best is None or tried[beta][0] < tried[best][0]:
                best = beta
            if tried[beta][0] <= self.tolerance:
                break
        if tried[best][0] > self.tolerance and len(betas) > 1:
            # The binding target switches between neighbouring grid points: bisect there.
            grid = sorted(tried)
            pairs = [(a, c) for a, c in zip(grid, grid[1:])
                     if np.sign(tried[a][1]) != np.sign(tried[c][1])]
            pairs.sort(key=lambda p: min(abs(p[0]), abs(p[1])))
            for a, c in pairs:
                for _ in range(24):
                    mid = 0.5 * (a + c)
                    tried[mid] = solve(mid)
                    if tried[mid][0] < tried[best][0] or (
                            tried[mid][0] == tried[best][0] and abs(mid) < abs(best)):
                        best = mid
                    if tried[mid][0] <= self.tolerance:
                        break
                    if np.sign(tried[mid][1]) == np.sign(tried[a][1]):
                        a = mid
                    else:
                        c = mid
                if tried[best][0] <= self.tolerance:
                    break
        _, _, order, k = tried[best]
        return {n: jnp.asarray(m) for n, m in masks_for(order, k).items()}, float(best)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _hfp_retarget(method: HFP, graph: PruningGraph, params: Any, state: HFPState) -> HFPState:
    return method._retarget(params, state, graph)


@functools.lru_cache(maxsize=64)
def _budget(method: HFP, graph: PruningGraph) -> Budget:
    dense = flops.count(graph, None, method.convention)
    tm = method.target_macs
    if method.macs_reduction is not None:
        tm = (1.0 - method.macs_reduction) * dense.macs
    tp = method.target_params
    if method.params_reduction is not None:
        tp = (1.0 - method.params_reduction) * dense.params
    return Budget(dense.macs, dense.params, None if tm is None else float(tm),
                  None if tp is None else float(tp))
