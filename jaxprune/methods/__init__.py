"""Pruning methods (design.md section 7) and their registry.

A method is a frozen record of its hyperparameters; ``method.pruner(graph, total_epochs,
steps_per_epoch=1)`` gives it as a `jaxprune.pruner.Pruner` (pure ``init``/``update``/
``finalize``/``penalty`` over the model's variables and the method's typed state).
``get_method(name, **kwargs)`` builds a method by name (``METHODS``):

=========  ==============================================================================
'dense'    no pruning (masks and hard stay all ones)
'sfp'      Soft Filter Pruning (`sfp.SFP`): rate, criterion, exclude, mask_bn
'asfp'     SFP with the asymptotic rate schedule (rate_shape='exp'|'cubic')
'srfp'     SFP with decayed instead of zeroed filters (alpha0, decay_rate, zero_fraction,
           decay_form='sfp'|'author')
'asrfp'    both
'ghfp'     Gradually Hard Filter Pruning (`ghfp.GHFP`); soft='sfp'|'asfp'|'srfp'|'asrfp',
           shape='cubic'|'linear'|'exp', end=0.9, hard_count='selected'|'layer',
           harden_at_init, plus the soft variant's options
'hfp'      Holistic Filter Pruning (`hfp.HFP`): macs_reduction / params_reduction or
           target_macs / target_params, lam, temperature, convention, exclude, balance
'pfec'     PFEC one-shot L1 pruning (`pfec.PFEC`): config (a ``pfec.PFEC_CONFIGS`` name),
           criterion, selection
=========  ==============================================================================

The keys every run config carries (``rate``, ``criterion``, ``exclude``) are accepted by every
method; a method that does not use one accepts only its neutral value (``rate=0``,
``exclude=()``), except ``criterion``, which 'dense' and 'hfp' (whose gate is the BN scale)
ignore. Unknown names, unknown keys and rates outside [0, 1) raise ValueError naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxprune import validate
from jaxprune.graph import PruningGraph
from jaxprune.methods.base import final_roles
from jaxprune.methods.ghfp import GHFP, GHFPState
from jaxprune.methods.hfp import HFP, HFPState
from jaxprune.methods.pfec import PFEC, PFEC_CONFIGS, PFECConfig, pfec_masks
from jaxprune.methods.sfp import SFP, SFPState, is_projection, make_soft
from jaxprune.pruner import MaskState, Pruner, check_total_epochs, dense_pruner, fixed_pruner


@dataclasses.dataclass(frozen=True)
class Dense:
    """No pruning: masks and hard are all ones; the baseline runs use it."""

    name: str = "dense"

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """`jaxprune.pruner.dense_pruner`: a `MaskState` of ones that never changes."""
        del steps_per_epoch
        check_total_epochs(total_epochs)
        return dense_pruner(graph)._replace(total_epochs=total_epochs)


@dataclasses.dataclass(frozen=True, eq=False)
class FixedMasks:
    """Fine-tuning after a method's final hard pruning: ``masks`` and ``hard`` stay as they are.

    Its pruner's ``init`` gives a `MaskState` of them, ``update``/``finalize`` keep them, so the
    train step's hard masking keeps every pruned slice exactly zero while the rest trains.

    Attributes:
      masks: group name -> float32 ``[C]``, the final masks of the pruned run.
      hard: group name -> float32 ``[C]``, its hard set (default: ``masks``).
    """

    masks: Any
    hard: Any = None
    name: str = "finetune"

    def pruner(self, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
        """`jaxprune.pruner.fixed_pruner` of ``masks`` and ``hard``."""
        del graph, steps_per_epoch
        check_total_epochs(total_epochs)
        hard = None if self.hard is None else dict(self.hard)
        return fixed_pruner(dict(self.masks), hard)._replace(total_epochs=total_epochs)


_SOFT_KEYS = ("rate", "criterion", "exclude", "mask_bn", "alpha0", "decay_rate", "zero_fraction",
              "width", "rate_shape", "decay_form")


def _split(kwargs: dict, keys) -> tuple[dict, dict]:
    return ({k: v for k, v in kwargs.items() if k in keys},
            {k: v for k, v in kwargs.items() if k not in keys})


def _neutral(method: str, kwargs: dict, ignore: tuple[str, ...] = ()) -> dict:
    """Drops the common keys a method does not use (neutral values only)."""
    kwargs = dict(kwargs)
    if "rate" in kwargs:
        rate = kwargs.pop("rate")
        if rate is not None:
            validate.rate(rate, "rate")
            if rate != 0:
                raise ValueError(f"method {method!r} does not take a uniform rate (got "
                                 f"rate={rate!r}); leave it at 0")
    if "exclude" in kwargs and method in ("dense", "pfec"):
        exclude = kwargs.pop("exclude")
        if exclude not in (None, (), [], ""):
            raise ValueError(f"method {method!r} does not take exclude (got {exclude!r})")
    for key in ignore:
        kwargs.pop(key, None)
    return kwargs


def _check_keys(method: str, kwargs: dict, allowed) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r} got unknown option(s) {unknown}; "
                         f"allowed: {sorted(allowed)}")


def _soft_factory(variant: str) -> Callable[..., SFP]:
    def build(**kwargs: Any) -> SFP:
        _check_keys(variant, kwargs, _SOFT_KEYS)
        if "rate" in kwargs:
            validate.rate(kwargs["rate"], f"{variant} rate")
        return make_soft(variant, **kwargs)

    build.__doc__ = f"The {variant.upper()} method; options {', '.join(_SOFT_KEYS)}."
    return build


def _dense(**kwargs: Any) -> Dense:
    kwargs = _neutral("dense", kwargs, ignore=("criterion",))
    _check_keys("dense", kwargs, ())
    return Dense()


def _ghfp(**kwargs: Any) -> GHFP:
    """GHFP; ``soft`` names the soft variant, the other soft keys configure it."""
    allowed = _SOFT_KEYS + ("soft", "shape", "end", "hard_count", "harden_at_init")
    _check_keys("ghfp", kwargs, allowed)
    soft_kwargs, rest = _split(kwargs, _SOFT_KEYS)
    if "rate" in soft_kwargs:
        validate.rate(soft_kwargs["rate"], "ghfp rate")
    variant = rest.pop("soft", "sfp")
    return GHFP(soft=make_soft(variant, **soft_kwargs), **rest)


def _hfp(**kwargs: Any) -> HFP:
    kwargs = _neutral("hfp", kwargs, ignore=("criterion",))
    allowed = [f.name for f in dataclasses.fields(HFP) if f.name != "name"]
    _check_keys("hfp", kwargs, allowed)
    return HFP(**kwargs)


def _pfec(**kwargs: Any) -> PFEC:
    kwargs = _neutral("pfec", kwargs)
    _check_keys("pfec", kwargs, ("config", "criterion", "selection", "width"))
    return PFEC(**kwargs)


METHODS: dict[str, Callable[..., Any]] = {
    "dense": _dense,
    "sfp": _soft_factory("sfp"),
    "asfp": _soft_factory("asfp"),
    "srfp": _soft_factory("srfp"),
    "asrfp": _soft_factory("asrfp"),
    "ghfp": _ghfp,
    "hfp": _hfp,
    "pfec": _pfec,
}


def get_method(name: str, **kwargs: Any) -> Any:
    """The method registered under ``name`` (one of ``METHODS``) built with ``kwargs``.

    A mapping with a ``'name'`` key (e.g. a run config's ``method`` section, whose ``kwargs``
    sub-mapping is merged in) is accepted in place of ``name``.
    """
    if not isinstance(name, str) and hasattr(name, "keys"):
        cfg = dict(name)
        extra = dict(cfg.pop("kwargs", None) or {})
        cfg.pop("residual", None)  # a tracing option, not the method's
        name = cfg.pop("name", None)
        kwargs = {**cfg, **extra, **kwargs}
    validate.one_of(name, METHODS, "method")
    return METHODS[name](**kwargs)


__all__ = [
    "METHODS",
    "Dense",
    "FixedMasks",
    "GHFP",
    "GHFPState",
    "HFP",
    "HFPState",
    "MaskState",
    "PFEC",
    "PFECConfig",
    "PFEC_CONFIGS",
    "SFP",
    "SFPState",
    "final_roles",
    "get_method",
    "is_projection",
    "pfec_masks",
]
