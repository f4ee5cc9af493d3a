"""Selection rules: ``scores -> masks`` (design.md section 4).

``scores`` and ``masks`` are ``dict[str, jax.Array]`` keyed by group name; a mask is float32
``[C]`` with 1 = keep and 0 = pruned. Every rule prunes the LOWEST scores.

All rules are pure and jittable, and choose by `ranks` (a stable sort), so ties go to the
lower channel index (the lower index is pruned first). `prune_by_count` and `grow_hard` take
their counts as data: a Python int or an int32 array, traced or not, selects the same channels
(``ranks(score) < n``), so one rule serves the host and ``jit`` and a count that changes with
the epoch neither branches nor retraces. `pruned_count` is the count ``int(N * P)`` of a Python
or a traced rate. The rate-based rules (`prune_by_rate`, `prune_by_rates`,
`prune_by_global_threshold`) take static rates.

A group is never pruned to zero channels.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Collection, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import validate

Scores = Mapping[str, jax.Array]
Masks = dict[str, jax.Array]

ROUNDINGS = ("sfp", "pfec")
NORMALIZATIONS = ("max", "l2")


def _check_rate(rate: float) -> float:
    return validate.rate(rate, "pruning rate")


def num_pruned(size: int, rate: float, rounding: str = "sfp") -> int:
    """Number of channels to prune from ``size`` at ``rate``.

    ``'sfp'`` floors the pruned count, ``int(size * rate)`` (SFP's official code);
    ``'pfec'`` floors the kept count, ``size - int(size * (1 - rate))`` (the PFEC
    reimplementation). The result is capped at ``size - 1``: at least one channel is kept.
    """
    rate = _check_rate(rate)
    validate.one_of(rounding, ROUNDINGS, "rounding")
    size = validate.positive_int(size, "group size")
    if rounding == "sfp":
        n = int(size * rate)
    else:
        n = size - int(size * (1.0 - rate))
    return min(n, size - 1)


def _size(score: jax.Array) -> int:
    return int(score.shape[0])


def _check_names(kind: str, names: Iterable[str], scores: Scores) -> None:
    unknown = [n for n in names if n not in scores]
    if unknown:
        raise ValueError(
            f"unknown group name(s) in {kind}: {unknown!r}; valid groups: {list(scores)!r}"
        )


def nan_lowest(score: jax.Array) -> jax.Array:
    """``score`` with NaN replaced by -inf: the ranking policy for scores that are not numbers
    (a channel whose filter holds NaN). A NaN channel ranks LOWEST, so it is pruned first, never
    kept as the best one (a plain sort puts NaN last, i.e. highest). Jittable."""
    score = jnp.asarray(score)
    return jnp.where(jnp.isnan(score), -jnp.inf, score)


def ranks(score: jax.Array) -> jax.Array:
    """int32 ``[C]``: each channel's position in a stable ascending sort of ``score`` (NaN
    lowest, `nan_lowest`; ties to the lower index). ``ranks(score) < n`` selects the ``n``
    lowest channels, for a static or a traced ``n``."""
    size = score.shape[0]
    order = jnp.argsort(nan_lowest(jnp.asarray(score, jnp.float32)), stable=True)
    return jnp.zeros((size,), jnp.int32).at[order].set(jnp.arange(size, dtype=jnp.int32))


def is_traced(value: object) -> bool:
    """Whether ``value`` is a JAX array (a count or rate that is data, not a Python number)."""
    return isinstance(value, jax.Array)


def pruned_count(size: int, rate: float | jax.Array) -> int | jax.Array:
    """SFP's pruned count ``int(size * rate)`` capped at ``size - 1``: a Python int for a Python
    rate (`num_pruned`, float64), an int32 scalar for a JAX rate (float32 arithmetic, the same
    count except where ``size * rate`` lies within float32 rounding of an integer)."""
    if is_traced(rate):
        n = jnp.floor(jnp.float32(size) * rate).astype(jnp.int32)
        return jnp.clip(n, 0, size - 1)
    return num_pruned(size, float(rate), "sfp")


def prune_by_count(scores: Scores, counts: Mapping[str, int | jax.Array]) -> Masks:
    """Prune ``counts[name]`` lowest-scoring channels of each named group; others keep all.

    A count may be a Python int (checked: in ``[0, C - 1]``) or an int32 array, traced or not
    (data: a traced count is not checked, a caller keeps it below ``C``)."""
    _check_names("counts", counts, scores)
    masks = {}
    for name, score in scores.items():
        n = counts.get(name, 0)
        size = _size(score)
        if not is_traced(n) and (isinstance(n, bool) or not isinstance(n, numbers.Integral)
                                 or not 0 <= n < size):
            raise ValueError(
                f"count for group {name!r} must be an int in [0, {size - 1}] "
                f"(at least one channel kept), got {n!r}"
            )
        if not is_traced(n) and n == 0:
            masks[name] = jnp.ones(score.shape, jnp.float32)
            continue
        masks[name] = jnp.where(ranks(score) < n, 0.0, 1.0).astype(jnp.float32)
    return masks


def prune_by_rate(
    scores: Scores,
    rate: float,
    rounding: str = "sfp",
    groups: Collection[str] | None = None,
    width: "WidthPolicy | None" = None,
) -> Masks:
    """One rate for every group in ``groups`` (default: all); the others keep all channels.

    This is SFP's uniform layer-wise selection; see ``num_pruned`` for ``rounding`` and
    `WidthPolicy` for ``width`` (hardware-friendly kept counts; default exact).
    """
    names = list(scores) if groups is None else list(groups)
    _check_names("groups", names, scores)
    counts = {name: num_pruned(_size(scores[name]), rate, rounding) for name in names}
    return prune_by_count(scores, _widths(counts, scores, width))


def _widths(counts: Mapping[str, int], scores: Scores, width: "WidthPolicy | None") -> dict[str, int]:
    if width is None or width.exact:
        return dict(counts)
    return width.pruned_counts(counts, {n: _size(scores[n]) for n in counts})


WIDTH_DIRECTIONS = ("up", "down")


@dataclasses.dataclass(frozen=True)
class WidthPolicy:
    """Hardware-friendly kept widths, applied by a method's FINAL selection (so the trained
    masked model and the compact model are one function).

    Attributes:
      round_to: the kept count of every pruned group becomes a multiple of ``round_to``
        (1 = the exact count the method selected).
      direction: ``'up'`` (default: keep the next-best filters, never fewer than selected) or
        ``'down'`` (prune a few more; never to zero: at least ``min(round_to, size)`` kept).
      latency: optional measured table ``{group: {width: seconds}}`` (``jaxprune bench-widths``):
        per group, the width with the lowest measured latency at or above the selected count
        (ties: the narrower); a group absent from the table falls back to ``round_to``.
    """

    round_to: int = 1
    direction: str = "up"
    latency: Mapping[str, Mapping[int, float]] | None = None

    def __post_init__(self):
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, numbers.Integral) \
                or self.round_to < 1:
            raise ValueError(f"round_to={self.round_to!r} is not allowed; expected a positive int")
        if self.direction not in WIDTH_DIRECTIONS:
            raise ValueError(f"direction={self.direction!r} is not allowed; expected one of "
                             f"{', '.join(WIDTH_DIRECTIONS)}")
        if self.latency is not None:  # frozen, hashable form (methods are static jit args)
            items = self.latency.items() if isinstance(self.latency, Mapping) else self.latency
            frozen = tuple(sorted((str(g), tuple(sorted((int(w), float(t)) for w, t in
                                                       (dict(tab).items())))) for g, tab in items))
            for g, tab in frozen:
                if not tab or any(not math.isfinite(t) or t < 0 for _, t in tab):
                    raise ValueError(f"latency table of group {g!r} needs finite times >= 0")
            object.__setattr__(self, "latency", frozen)

    @property
    def exact(self) -> bool:
        return self.round_to == 1 and not self.latency

    def kept(self, size: int, kept: int, group: str | None = None) -> int:
        """The kept count for a group of ``size`` channels whose method selected ``kept``."""
        size, kept = int(size), int(kept)
        if not 1 <= kept <= size:
            raise ValueError(f"kept count {kept} of group {group!r} must be in [1, {size}]")
        table = dict(dict(self.latency or ()).get(group, ())) if group is not None else None
        if table:
            options = {w: t for w, t in table.items() if kept <= w <= size}
            if options:
                return min(options, key=lambda w: (options[w], w))
        n = self.round_to
        if n == 1 or kept == size:
            return kept
        if self.direction == "up":
            return min(size, -(-kept // n) * n)
        return max(min(n, size), (kept // n) * n)

    def pruned_counts(self, counts: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, int]:
        """Pruned counts per group after the policy (``counts``: the method's pruned counts);
        a group the method does not prune (count 0) stays whole."""
        return {g: (0 if int(c) == 0 else sizes[g] - self.kept(sizes[g], sizes[g] - int(c), g))
                for g, c in counts.items()}


EXACT_WIDTHS = WidthPolicy()


def prune_by_rates(
    scores: Scores,
    rates: Mapping[str, float],
    skip: Collection[str] = (),
    rounding: str = "pfec",
    width: "WidthPolicy | None" = None,
) -> Masks:
    """PFEC-style per-group rates: ``rates[name]`` for each listed group not in ``skip``.

    Groups absent from ``rates`` and groups in ``skip`` keep all channels (``skip`` wins
    over ``rates``, so a stage-wide rate table can exclude sensitive layers). ``width``: see
    `WidthPolicy` (default exact counts).
    """
    _check_names("rates", rates, scores)
    _check_names("skip", skip, scores)
    skipped = set(skip)
    counts = {name: num_pruned(_size(scores[name]), rate, rounding)
              for name, rate in rates.items() if name not in skipped}
    return prune_by_count(scores, _widths(counts, scores, width))


def _normalized(score: jax.Array, normalize: str | bool | None) -> jax.Array:
    if normalize in (False, None):
        return score
    finite = jnp.where(jnp.isfinite(score), score, 0.0)  # -inf marks forced channels
    if normalize in (True, "max"):
        scale = jnp.max(jnp.abs(finite))
    else:
        scale = jnp.sqrt(jnp.sum(jnp.square(finite)))
    return jnp.where(scale > 0, score / jnp.where(scale > 0, scale, 1.0), score)


def global_order(scores: Mapping[str, jax.Array | np.ndarray], names: Sequence[str]):
    """The global pruning order over the groups ``names``: indices into the concatenation of
    ``scores[n] for n in names``, weakest first.

    Each group's best channel (its argmax) comes after every other channel, so pruning any
    prefix of at most ``total - len(names)`` channels keeps one channel per group; the rest are
    ordered by score, ties to the lower position (a stable sort). NumPy arrays in give a NumPy
    order (host precision: float64 scores stay float64), JAX arrays a JAX order (jittable).
    Scores are compared as given: callers map NaN first (`nan_lowest`).

    >>> global_order({"a": np.array([3., 1.]), "b": np.array([2., 5., 0.])}, ["a", "b"])
    array([4, 1, 2, 0, 3])
    """
    xp = np if all(isinstance(scores[n], np.ndarray) for n in names) else jnp
    flat = xp.concatenate([scores[n] for n in names])
    protected = xp.concatenate([xp.arange(scores[n].shape[0]) == xp.argmax(scores[n])
                                for n in names])
    return xp.lexsort((flat, protected))  # primary key last; stable -> position tie-break


def prune_first(order, k, names: Sequence[str], sizes: Sequence[int]) -> dict:
    """float32 keep masks of the groups ``names`` (of ``sizes`` channels) with the first ``k``
    entries of ``order`` (`global_order`) pruned. ``k`` may be a traced int (jittable); NumPy
    in, NumPy out, as `global_order`."""
    xp = np if isinstance(order, np.ndarray) else jnp
    total = int(sum(sizes))
    if xp is np:
        rank = np.empty(total, np.int64)
        rank[order] = np.arange(total)
    else:
        rank = jnp.zeros((total,), jnp.int32).at[order].set(jnp.arange(total, dtype=jnp.int32))
    keep = xp.where(rank < k, 0.0, 1.0).astype(xp.float32)
    offsets = np.cumsum([0, *sizes])
    return {n: keep[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}


def prune_by_global_threshold(
    scores: Scores,
    rate: float,
    groups: Collection[str] | None = None,
    normalize: str | bool | None = True,
) -> Masks:
    """One threshold across ``groups`` (default: all): prune the globally lowest scores.

    ``int(total * rate)`` channels are pruned overall, ``total`` being the summed size of
    ``groups``. ``normalize`` makes layers comparable by dividing each group's scores by
    their max |score| (``True`` or ``'max'``) or their L2 norm (``'l2'``); ``False``/``None``
    uses raw scores. Each group keeps at least its highest-scoring channel (if the rate
    asks for more, the count is reduced). Ties go to group order, then channel index.
    Groups outside ``groups`` keep all channels. A NaN score ranks lowest (`nan_lowest`).
    The order is `global_order` (which HFP's cost searches use too).
    """
    rate = _check_rate(rate)
    if normalize not in (True, False, None) + NORMALIZATIONS:
        raise ValueError(
            f"unknown normalize {normalize!r}; allowed: True, False, None, "
            f"{', '.join(repr(n) for n in NORMALIZATIONS)}"
        )
    names = list(scores) if groups is None else list(groups)
    _check_names("groups", names, scores)
    scores = {name: nan_lowest(score) for name, score in scores.items()}  # NaN pruned first
    masks = {name: jnp.ones(score.shape, jnp.float32) for name, score in scores.items()}
    if not names:
        return masks
    sizes = [_size(scores[name]) for name in names]
    total = sum(sizes)
    n = min(int(total * rate), total - len(names))
    if n == 0:
        return masks
    normalized = {name: _normalized(jnp.asarray(scores[name], jnp.float32), normalize)
                  for name in names}
    masks.update(prune_first(global_order(normalized, names), n, names, sizes))
    return masks


def keep_hard(masks: Masks, hard: Masks) -> Masks:
    """``masks`` with every hard-pruned channel (0 in ``hard``) forced to 0.

    Groups missing from ``hard`` are unchanged. Works for decayed (fractional) masks too.
    """
    return {name: m * hard[name] if name in hard else m for name, m in masks.items()}


def hard_first(scores: Scores, hard: Masks) -> dict[str, jax.Array]:
    """``scores`` with hard-pruned channels (0 in ``hard``) set to ``-inf``.

    Any rule applied to the result selects the hard channels first, so they count towards
    the pruned set and never return (GHFP: "hard stays hard").
    """
    return {
        name: jnp.where(hard[name] == 0, -jnp.inf, jnp.asarray(s, jnp.float32))
        if name in hard
        else s
        for name, s in scores.items()
    }


def grow_hard(
    scores: Scores, selected: Masks, hard: Masks, fraction: float | jax.Array | None = None,
    *, counts: Mapping[str, int | jax.Array] | None = None,
) -> Masks:
    """GHFP's hard set after a re-selection (methods.md section 4).

    ``selected`` are 0/1 masks of the pruned set S (0 = in S), ``hard`` the current hard
    masks (0 = hard). Per group, the ``k`` lowest-scoring members of S become hard,
    already-hard channels counted first (then by score, NaN lowest, then by index); the result
    is the union with ``hard``, so hard stays hard. ``k`` is ``floor(fraction * |S|)`` (the hard
    fraction h, a Python float or a traced scalar, see
    ``jaxprune.schedules.ghfp_hard_fraction``) or, with ``counts``, ``counts[name]`` (a Python
    int or an int32 array; GHFP's per-layer counts); give exactly one. Groups absent from
    ``selected`` keep their hard masks. Returns float32 masks, 0 = hard. Jittable with traced
    fractions and counts: ``|S|`` and ``k`` only enter through comparisons.
    """
    if (fraction is None) == (counts is None):
        raise ValueError("grow_hard needs exactly one of fraction= and counts=, got "
                         f"fraction={fraction!r}, counts={counts!r}")
    out = {}
    for name, score in scores.items():
        if name not in selected:
            out[name] = hard[name] if name in hard else jnp.ones(score.shape, jnp.float32)
            continue
        was_hard = hard[name] == 0 if name in hard else jnp.zeros(score.shape, bool)
        in_s = selected[name] == 0
        # Rank the members of S: already hard first, then by score (NaN lowest), then by index.
        key = jnp.where(was_hard, -jnp.inf, nan_lowest(jnp.asarray(score, jnp.float32)))
        order = jnp.lexsort((key, ~in_s))  # members of S first
        rank = jnp.zeros(score.shape, jnp.int32).at[order].set(
            jnp.arange(score.shape[0], dtype=jnp.int32)
        )
        if counts is None:
            k = jnp.floor(fraction * jnp.sum(in_s)).astype(jnp.int32)
        else:
            k = counts.get(name, 0)
        now_hard = (in_s & (rank < k)) | was_hard
        out[name] = jnp.where(now_hard, 0.0, 1.0).astype(jnp.float32)
    return out


def as_width_policy(value: "WidthPolicy | Mapping | int | None") -> WidthPolicy:
    """A `WidthPolicy` from itself, ``None`` (exact), an int (``round_to``, up) or a mapping of
    its fields."""
    if value is None:
        return EXACT_WIDTHS
    if isinstance(value, WidthPolicy):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return WidthPolicy(round_to=int(value))
    if isinstance(value, Mapping):
        return WidthPolicy(**dict(value))
    raise ValueError(f"width={value!r} is not allowed; expected a WidthPolicy, an int or a mapping")
