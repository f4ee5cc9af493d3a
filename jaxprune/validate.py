"""Checks of values at the public boundaries (config, CLI, public functions), each raising one
ValueError line that names the value and what is allowed::

    what=value is not allowed; expected <allowed>

The allowed names come from the registries (`jaxprune.criteria.CRITERIA`,
`jaxprune.methods.METHODS`, `jaxprune.graph.RESIDUAL_POLICIES`, `jaxprune.schedules`'
shapes), passed in by the caller, never copied here. No jaxprune import: every module may use
this one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, NoReturn


def refuse(what: str, value: Any, allowed: str) -> NoReturn:
    """Raises ``ValueError('<what>=<value!r> is not allowed; expected <allowed>')``."""
    raise ValueError(f"{what}={value!r} is not allowed; expected {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_float(value: Any, what: str, *, minimum: float | None = None) -> float:
    """``value`` as a float: a finite number (not a bool), ``>= minimum`` when given."""
    if not _is_number(value) or not math.isfinite(value) or (minimum is not None and value < minimum):
        refuse(what, value, "a finite number" + (f" >= {minimum:g}" if minimum is not None else ""))
    return float(value)


def fraction(value: Any, what: str, *, closed_low: bool = True, closed_high: bool = False) -> float:
    """``value`` as a float in the unit interval: ``[0, 1)`` by default; ``closed_low`` /
    ``closed_high`` say whether 0 / 1 belong to it."""
    interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
    ok = _is_number(value) and (0.0 <= value if closed_low else 0.0 < value) and (
        value <= 1.0 if closed_high else value < 1.0)  # also refuses NaN
    if not ok:
        refuse(what, value, f"a number in {interval}")
    return float(value)


def rate(value: Any, what: str = "rate") -> float:
    """A pruning rate: a static (not traced) number in ``[0, 1)``. The count of pruned channels
    is a shape, so a traced rate is refused here rather than deep inside ``jit``."""
    if not isinstance(value, numbers.Real) and getattr(value, "shape", None) == ():
        try:
            value = float(value)  # a 0-d numpy / concrete JAX scalar
        except Exception:  # noqa: BLE001 - a tracer (ConcretizationTypeError)
            refuse(what, value, "a static number in [0, 1) (not traced)")
    return fraction(value, what)


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        refuse(what, value, "a positive integer")
    return int(value)


def non_negative_int(value: Any, what: str) -> int:
    """``value`` as an int >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        refuse(what, value, "a non-negative integer")
    return int(value)


def one_of(value: Any, allowed: Iterable[Any], what: str) -> Any:
    """``value`` if it is one of ``allowed`` (a registry's names: a tuple or a mapping)."""
    names = tuple(allowed)
    if value not in names:
        refuse(what, value, f"one of {', '.join(map(str, names))}")
    return value


__all__ = ["refuse", "finite_float", "fraction", "rate", "positive_int", "non_negative_int",
           "one_of"]
