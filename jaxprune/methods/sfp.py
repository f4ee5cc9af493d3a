"""SFP and its variants ASFP, SRFP, ASRFP (methods.md sections 2 and 3).

Soft Filter Pruning (He et al., IJCAI 2018): before training and at the end of every epoch,
score the filters of every pruned group (L2 norm by default; any of
``jaxprune.criteria.CRITERIA``), select the ``int(N * P)`` lowest of each group (SFP's
official rounding, ``selection.num_pruned(..., 'sfp')``) and zero them. Between selections
the zeroed filters are trained normally (soft): gradients, momentum and weight decay are not
masked, so a filter may grow back and escape the next selection. ``state.hard`` stays all
ones until the pruner's ``finalize``.

``SFP(...).pruner(graph, total_epochs)`` is the method as a `jaxprune.pruner.Pruner` over the
model's variables and an `SFPState` (masks, hard, count).

Interpretations (documented choices):

- **What is zeroed.** As in the official code only the filters (role ``'out'`` members: conv
  kernel output slices) are multiplied; ``mask_bn=True`` also multiplies the group's
  per-channel parameter vectors (BN scale and bias, conv bias) so that a pruned channel outputs
  exactly 0. Running BN statistics are never touched.
- **Which groups are pruned.** Every group whose filters come from convolutions (``kind ==
  'conv'``; the classifier is never pruned), except the groups with a producer matched by
  ``exclude``: module paths or ``fnmatch`` patterns (``('*/downsample',)`` gives the ImageNet
  setting "every conv but the projection convs"), or a predicate ``path -> bool``. A group
  with several producers (a coupled residual group) is skipped if ANY producer is excluded,
  since its slices can only be removed together.
- **Epoch counting.** ``init`` is the selection after 0 completed epochs, ``update`` with
  ``state.count == e`` the selection after ``t = e + 1`` completed epochs, which governs training epoch ``e + 1``.
  ASFP's rate is ``P_t = P (1 - exp(-k t))`` with this ``t`` (``schedules.asfp_rate``; so
  ``P_0 = 0``: nothing is pruned at init), and SRFP's decay factor is ``alpha_t``
  (``schedules.srfp_decay``), which is 0 from ``t = T - round(zero_fraction T)`` on: exactly the
  last ``round(zero_fraction T)`` training epochs run with zeroed filters.
- **SRFP / ASRFP.** The selected filters are multiplied by ``alpha_t`` instead of zeroed, and
  ``state.masks`` holds ``alpha_t`` for them (1 elsewhere). A filter selected again at a later
  epoch is multiplied again. With ``decay_rate=None`` the rate is ``c = 3 / t_zero``
  (``t_zero`` the first zeroing step), so ``alpha`` has fallen to ``alpha0 e^-3`` when it is
  switched to 0.
- **finalize.** A last selection at the full rate ``P`` on the current weights; ``masks ==
  hard`` (0/1). With ``final_bn='keep'`` (the default, as the official code) only what a soft
  selection zeroes is zeroed (the filters; with ``mask_bn`` their BN scale/bias too): a pruned
  channel keeps its BN constants, `final_roles` says so, and ``compact(...,
  keep_constants=True)`` carries them into the compact model, which then equals this masked
  one. With ``final_bn='zero'`` every member slice of the pruned channels is zeroed (filters,
  BN scale/bias and running statistics, the consumers' input slices; their optimizer moments
  are the train step's: ``jaxprune.masks.hard_masked`` clears them). A hard fine-tuning after either (``FixedMasks``) zeroes every slice of the hard channels.

Jit: every function is pure and ``update`` is jittable with a traced ``state.count``,
``jax.jit(pruner.update)``. The per-group counts are DATA, not
shapes: ``jaxprune.selection.prune_by_count`` selects a channel when its rank in a stable
ascending sort of the scores is below the count (``selection.pruned_count``), so a count that changes with the epoch (ASFP) neither needs Python branching nor
retraces. With a concrete count the counts are computed on the host in float64, exactly
``int(N * P_t)``; with a traced count in float32 (identical except when ``N * P_t`` lies
within float32 rounding of an integer). Constant-rate counts are always host integers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence, Union, runtime_checkable

import jax
import jax.numpy as jnp

from jaxprune import criteria, schedules, selection, validate
from jaxprune.graph import PruningGraph
from jaxprune.masks import apply_masks, init_masks, zero_channels
from jaxprune.pruner import (Pruner, check_total_epochs, check_variables, epoch_of, next_count,
                             zero_count, zero_penalty)

Exclude = Union[Sequence[str], Callable[[str], bool]]

SOFT_VARIANTS = ("sfp", "asfp", "srfp", "asrfp")
FINAL_BN = ("keep", "zero")
# SRFP's decay: 'sfp' = schedules.srfp_decay (alpha0 exp(-c t), zero for the last
# round(zero_fraction T) epochs); 'author' = schedules.srfp_decay_author (the GHFP author's code)
DECAY_FORMS = ("sfp", "author")


# ----------------------------------------------------------------------------- shared helpers


def normalize_exclude(exclude: Exclude | None) -> tuple[str, ...] | Callable[[str], bool]:
    """``exclude`` as a hashable tuple of patterns (a str becomes a 1-tuple) or a callable."""
    if exclude is None:
        return ()
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        return (exclude,)
    try:
        items = tuple(exclude)
    except TypeError:
        raise ValueError(
            f"exclude must be module paths / fnmatch patterns or a predicate, got {exclude!r}"
        ) from None
    if not all(isinstance(p, str) for p in items):
        raise ValueError(f"exclude must hold strings (module paths or patterns), got {exclude!r}")
    return items


def is_excluded(path: str, exclude: tuple[str, ...] | Callable[[str], bool]) -> bool:
    """Whether the producer module ``path`` is matched by ``exclude``."""
    if callable(exclude):
        return bool(exclude(path))
    return any(fnmatch.fnmatchcase(path, p) for p in exclude)


def is_projection(path: str) -> bool:
    """Predicate for the projection (1x1 downsample) shortcut convs of the bundled ResNets."""
    return path.rsplit("/", 1)[-1] == "downsample"


def check_exclude(exclude: tuple[str, ...] | Callable[[str], bool], graph: PruningGraph) -> None:
    """ValueError if a pattern of ``exclude`` matches no producer of ``graph``."""
    if callable(exclude):
        return
    producers = sorted({p for g in graph.groups.values() for p in g.producers} | set(graph.unprunable))
    unknown = [p for p in exclude if not any(fnmatch.fnmatchcase(q, p) for q in producers)]
    if unknown:
        raise ValueError(
            f"exclude entries {unknown!r} match no conv/dense module of the model; "
            f"known modules: {producers!r}"
        )


def subgraph(graph: PruningGraph, names: Sequence[str]) -> PruningGraph:
    """``graph`` restricted to the groups ``names`` (what a criterion should score)."""
    return dataclasses.replace(graph, groups={n: graph.groups[n] for n in names})


def harden(variables: Any, hard: Mapping[str, jax.Array], graph: PruningGraph) -> Any:
    """``variables`` with every member slice of the hard-pruned channels (0 in ``hard``) zeroed
    in its params and BN statistics (`jaxprune.masks.zero_channels`); the optimizer state is
    not the pruner's: the train step's `jaxprune.masks.hard_masked` clears their moments."""
    return _harden(graph, variables, hard)


@functools.partial(jax.jit, static_argnums=0)
def _harden(graph: PruningGraph, variables: Any, hard: Mapping[str, jax.Array]) -> Any:
    v = zero_channels({"params": variables["params"],
                       "batch_stats": variables.get("batch_stats", {})}, hard, graph)
    return with_params(variables, v["params"], v["batch_stats"])


def with_params(variables: Any, params: Any, batch_stats: Any = None) -> dict:
    """``variables`` (a mapping) with new ``params`` (and ``batch_stats`` when given and
    ``variables`` has that collection)."""
    out = dict(variables)
    out["params"] = params
    if batch_stats is not None and "batch_stats" in variables:
        out["batch_stats"] = batch_stats
    return out


@runtime_checkable
class SoftRule(Protocol):
    """What a soft selection rule gives GHFP (`jaxprune.methods.ghfp`), which hardens any of
    them gradually: `SFP` and its variants implement it, with any criterion."""

    @property
    def soft_roles(self) -> tuple[str, ...]:
        """Member roles multiplied at a soft selection."""

    def check(self, graph: PruningGraph, total_epochs: int) -> None:
        """Host-side validation (ValueError)."""

    def pruned_groups(self, graph: PruningGraph) -> tuple[str, ...]:
        """The groups the rule prunes."""

    def rate_at(self, t: Any, total_epochs: int) -> Any:
        """The pruning rate after ``t`` completed epochs."""

    def counts_at(self, graph: PruningGraph, names: Sequence[str], t: Any,
                  total_epochs: int) -> dict[str, Any]:
        """Per-group selected counts after ``t`` completed epochs."""

    def alpha_at(self, t: Any, total_epochs: int) -> Any:
        """The mask value of the selected channels after ``t`` completed epochs."""

    def scores(self, variables: Any, graph: PruningGraph,
               names: Sequence[str]) -> dict[str, jax.Array]:
        """Scores of the groups ``names`` (lowest selected first)."""

    def final_counts(self, graph: PruningGraph) -> dict[str, int]:
        """Per-group pruned counts of the final selection."""


class SFPState(NamedTuple):
    """The state of SFP and its variants.

    Attributes:
      masks: group name -> float32 ``[C]``, the last selection (0 or ``alpha_t`` selected).
      hard: group name -> float32 ``[C]``; all ones until ``finalize`` (then ``masks``).
      count: int32 scalar, the epochs done.
    """

    masks: dict
    hard: dict
    count: Any


# ----------------------------------------------------------------------------- SFP


@dataclasses.dataclass(frozen=True)
class SFP:
    """Soft Filter Pruning and its variants (see the module docstring).

    Attributes:
      rate: the pruning rate P of every pruned group, in [0, 1).
      criterion: a ``jaxprune.criteria`` name ('l2' as SFP, 'l1', 'fpgm', 'bn_scale').
      asymptotic: ASFP: the rate grows from 0 to P (``schedules.asfp_rate``).
      rate_shape: ASFP's growth, 'exp' (``P (1 - exp(-k t))``, ``k = ln 4 / (T / 8)``) or
        'cubic' (``P (1 - (1 - t / T)^3)``, the GHFP author's default).
      decay: SRFP: selected filters are multiplied by ``alpha_t`` instead of zeroed.
      alpha0, decay_rate, zero_fraction: SRFP's ``alpha_t = alpha0 exp(-c t)``, 0 for the last
        ``round(zero_fraction T)`` epochs; ``decay_rate=None`` picks ``c = 3 / t_zero``.
      decay_form: 'sfp' (the line above) or 'author': ``schedules.srfp_decay_author`` (the GHFP
        author's constant and zero point; ``decay_rate`` and ``zero_fraction`` unused).
      mask_bn: also multiply the BN scale/bias (and conv bias) of the selected channels.
      final_bn: 'keep' (official): the final model zeroes what a soft selection zeroes and keeps
        the BN constants of the pruned channels; 'zero': it zeroes every slice of them.
      exclude: producer module paths / fnmatch patterns, or a predicate, never pruned.
      width: a `jaxprune.selection.WidthPolicy` (or ``round_to`` int) for the final
        selection's kept counts (hardware-friendly widths); default the exact counts.
      name: 'sfp', 'asfp', 'srfp' or 'asrfp', derived from the flags when left empty.
    """

    rate: float = 0.3
    criterion: str = "l2"
    asymptotic: bool = False
    rate_shape: str = "exp"
    decay: bool = False
    alpha0: float = 0.5
    decay_rate: float | None = None
    zero_fraction: float = 0.15
    decay_form: str = "sfp"
    mask_bn: bool = False
    final_bn: str = "keep"
    exclude: Any = ()
    width: Any = None
    name: str = ""

    def __post_init__(self):
        validate.rate(self.rate, "SFP rate")
        validate.one_of(self.final_bn, FINAL_BN, "final_bn")
        object.__setattr__(self, "width", selection.as_width_policy(self.width))
        criteria.get_criterion(self.criterion)
        object.__setattr__(self, "exclude", normalize_exclude(self.exclude))
        validate.one_of(self.rate_shape, schedules.ASFP_SHAPES, "rate_shape")
        validate.one_of(self.decay_form, DECAY_FORMS, "decay_form")
        if self.rate_shape != "exp" and not self.asymptotic:
            raise ValueError(f"rate_shape={self.rate_shape!r} needs a growing rate: use 'asfp' or "
                             "'asrfp' (SFP's rate is constant)")
        if self.decay_form != "sfp" and not self.decay:
            raise ValueError(f"decay_form={self.decay_form!r} needs decayed filters: use 'srfp' or "
                             "'asrfp'")
        if self.decay:
            validate.fraction(self.alpha0, "alpha0", closed_high=True)
            if self.decay_rate is not None:
                validate.finite_float(self.decay_rate, "decay_rate", minimum=0.0)
            validate.fraction(self.zero_fraction, "zero_fraction")
        if not self.name:
            name = ("a" if self.asymptotic else "") + ("srfp" if self.decay else "sfp")
            object.__setattr__(self, "name", name)

    # -- configuration read by GHFP too
    @property
    def soft_roles(self) -> tuple[str, ...]:
        """Member roles multiplied at a soft selection."""
        return ("out", "vector") if self.mask_bn else ("out",)

    @property
    def final_roles(self) -> tuple[str, ...] | None:
        """Member roles zeroed in the final model (None: every slice of the pruned channels)."""
        return self.soft_roles if self.final_bn == "keep" else None

    def pruned_groups(self, graph: PruningGraph) -> tuple[str, ...]:
        """Names of the groups this method prunes (conv groups with no excluded producer)."""
        return tuple(
            n for n, g in graph.groups.items()
            if g.kind == "conv" and not any(is_excluded(p, self.exclude) for p in g.producers)
        )

    def rate_at(self, t: Any, total_epochs: int) -> Any:
        """Pruning rate after ``t`` completed epochs (a Python float for a Python ``t``)."""
        if self.asymptotic:
            return schedules.asfp_rate(self.rate, total_epochs, shape=self.rate_shape)(t)
        return self.rate

    def alpha_at(self, t: Any, total_epochs: int) -> Any:
        """Mask value of the selected channels after ``t`` completed epochs (0 unless SRFP)."""
        if not self.decay:
            return 0.0
        if self.decay_form == "author":
            return schedules.srfp_decay_author(self.alpha0, total_epochs)(t)
        return schedules.srfp_decay(self.alpha0, self.decay_rate, total_epochs,
                                    self.zero_fraction)(t)

    def counts_at(self, graph: PruningGraph, names: Sequence[str], t: Any,
                  total_epochs: int) -> dict[str, Any]:
        """Per-group pruned counts ``int(N * P_t)`` after ``t`` completed epochs."""
        rate = self.rate_at(t, total_epochs)
        return {n: selection.pruned_count(graph.groups[n].size, rate) for n in names}

    def scores(self, variables: Any, graph: PruningGraph,
               names: Sequence[str]) -> dict[str, jax.Array]:
        """Criterion scores of the groups ``names`` on the current weights ``variables``."""
        fn = criteria.get_criterion(self.criterion)
        return fn(_model_variables(variables), subgraph(graph, names))

    def check(self, graph: PruningGraph, total_epochs: int) -> None:
        """Host-side validation against the graph and the training length (ValueError)."""
        check_exclude(self.exclude, graph)
        check_total_epochs(total_epochs)

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """This method as a `jaxprune.pruner.Pruner` over an `SFPState`.

        Args:
          graph: the model's `jaxprune.graph.PruningGraph`.
          total_epochs: the training length ``T`` the schedules refer to (ASFP, SRFP).
          steps_per_epoch: unused (the methods share one signature).

        Returns:
          ``Pruner(init, update, finalize, penalty)``; the penalty is zero.
        """
        del steps_per_epoch
        self.check(graph, total_epochs)

        def init(variables):
            check_variables(variables)
            variables, masks = self._select(variables, graph, 0, total_epochs)
            return variables, SFPState(masks, init_masks(graph), zero_count())

        def update(variables, state):
            t = epoch_of(state.count) + 1
            variables, masks = self._select(variables, graph, t, total_epochs)
            return variables, state._replace(masks=masks, count=next_count(state.count))

        def finalize(variables, state):
            counts = as_counts(self.final_counts(graph))
            variables, masks = _sfp_finalize(self, graph, variables, counts)
            return variables, state._replace(masks=masks, hard=dict(masks))

        return Pruner(init, update, finalize, zero_penalty, total_epochs)

    def final_counts(self, graph: PruningGraph) -> dict[str, int]:
        """Pruned count per group of the final selection: ``int(N P)``, then the width policy."""
        names = self.pruned_groups(graph)
        counts = {n: selection.num_pruned(graph.groups[n].size, self.rate, "sfp") for n in names}
        return self.width.pruned_counts(counts, {n: graph.groups[n].size for n in names})

    def _select(self, variables: Any, graph: PruningGraph, t: Any, total_epochs: int):
        names = self.pruned_groups(graph)
        counts = self.counts_at(graph, names, t, total_epochs)
        alpha = jnp.asarray(self.alpha_at(t, total_epochs), jnp.float32)
        return _sfp_select(self, graph, variables, as_counts(counts), alpha)

    def selection_masks(self, variables: Any, graph: PruningGraph, counts: Mapping[str, Any],
                        alpha: Any) -> dict[str, jax.Array]:
        """Masks with the ``counts[g]`` lowest-scoring channels of each pruned group at ``alpha``."""
        names = self.pruned_groups(graph)
        scores = self.scores(variables, graph, names)
        masks = init_masks(graph)
        selected = selection.prune_by_count(scores, {n: counts[n] for n in names})
        for n in names:
            masks[n] = jnp.where(selected[n] == 0, alpha, 1.0).astype(jnp.float32)
        return masks


def as_counts(counts: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per-group kept counts as int32 arrays (traceable inside ``jit``)."""
    return {n: jnp.asarray(c, jnp.int32) for n, c in counts.items()}


def _model_variables(variables: Any) -> dict:
    """``variables`` as ``model.apply`` wants them: no empty ``batch_stats`` collection."""
    out = {"params": variables["params"]}
    if variables.get("batch_stats"):
        out["batch_stats"] = variables["batch_stats"]
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sfp_select(method: SFP, graph: PruningGraph, variables: Any, counts: dict,
                alpha: jax.Array):
    # Counts and alpha are traced: one compilation serves every epoch (ASFP, SRFP included).
    masks = method.selection_masks(variables, graph, counts, alpha)
    params = apply_masks(variables["params"], masks, graph, roles=method.soft_roles,
                         prefix=("params",))
    return with_params(variables, params), masks


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sfp_finalize(method: SFP, graph: PruningGraph, variables: Any, counts: dict):
    masks = method.selection_masks(variables, graph, counts, jnp.float32(0.0))
    if method.final_roles is not None:
        params = apply_masks(variables["params"], masks, graph, roles=method.final_roles,
                             prefix=("params",))
        return with_params(variables, params), masks
    return harden(variables, masks, graph), masks


def make_soft(variant: str = "sfp", **kwargs: Any) -> SFP:
    """The SFP variant named ``variant`` (one of ``SOFT_VARIANTS``) with options ``kwargs``."""
    if variant not in SOFT_VARIANTS:
        raise ValueError(f"unknown soft variant {variant!r}; allowed: {', '.join(SOFT_VARIANTS)}")
    for flag in ("asymptotic", "decay", "name"):
        if flag in kwargs:
            raise ValueError(f"{flag!r} is implied by the variant name {variant!r}; do not pass it")
    return SFP(asymptotic=variant.startswith("a"), decay="srfp" in variant, **kwargs)
