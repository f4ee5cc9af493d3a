"""The per-primitive rule registry: for each primitive, how channels flow through it when
tracing and how it runs narrow when a traced program is compacted.

`RULES` maps a primitive's name (as it appears in a jaxpr) to a `Rule`: its ``link`` half
(`jaxprune.graph.links`) is what `jaxprune.graph.trace` does at each equation; its ``narrow``
half (`jaxprune.graph.narrow`) is what `jaxprune.compaction.compact_program` does. A primitive
without a rule loses every channel it touches when tracing (``PruningGraph.unprunable`` says
which and why), so compaction never has to narrow it; calls (jit, custom_jvp/vjp, remat) are
walked inline and need no rule. `register_rule` adds a rule for a primitive of your own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxprune.graph import links, narrow


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one primitive treats channels.

    Attributes:
      link: ``link(tracer, eqn, ins, outs)``: links the operand and result axes that carry the
        same channels (`jaxprune.graph.links`).
      narrow: ``narrow(eqn, vals, kin, kout)``: the results on operands narrowed to the kept
        positions, or None (`jaxprune.graph.narrow`); ``narrow=None`` or a None result runs the
        primitive at full width on operands scattered back with zeros (exact, not faster).
      bodies: a control-flow primitive (scan, cond, while): ``link`` walks its sub-jaxprs and
        ``narrow(eqn, vals, kin, kout, bodies, run_body)`` gets their plans and the evaluator.
      registered: added by `register_rule`: it wins over walking a call's sub-jaxpr inline.
    """

    link: Callable[..., None]
    narrow: Callable[..., Any] | None = None
    bodies: bool = False
    registered: bool = False


_ELEMENTWISE = Rule(links.elementwise, narrow.elementwise)
_COPY = Rule(links.copy, narrow.elementwise)  # a dtype / precision copy is still its leaf

_BUILTIN: dict[str, Rule] = {
    **{n: _ELEMENTWISE for n in (
        "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "abs", "sign", "sqrt",
        "rsqrt", "cbrt", "square", "integer_pow", "erf", "erfc", "erf_inv", "sin", "cos", "tan",
        "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "floor", "ceil",
        "round", "is_finite", "not", "real", "imag", "conj", "stop_gradient", "pow", "add", "sub",
        "mul", "div", "max", "min", "atan2", "rem", "and", "or", "xor", "ne", "eq", "gt", "ge",
        "lt", "le", "select_n", "clamp", "nextafter", "add_any", "logaddexp", "population_count",
        "shift_left", "shift_right_logical", "shift_right_arithmetic", "threefry2x32")},
    **{n: _COPY for n in ("convert_element_type", "copy", "copy_p", "reduce_precision",
                          "optimization_barrier")},
    # placements: narrow unless the sharding partitions a narrowed axis (`narrow.sharded`)
    "sharding_constraint": Rule(links.copy, narrow.sharded),
    "device_put": Rule(links.copy, narrow.sharded),
    "mesh_cast": Rule(links.elementwise, narrow.sharded),
    "reshard": Rule(links.elementwise, narrow.sharded),
    # results that carry no operand's channels: fresh ids, nothing to link or narrow
    **{n: Rule(links.no_link) for n in (
        "iota", "random_bits", "random_seed", "random_wrap", "random_unwrap", "rng_bit_generator",
        "random_fold_in", "random_split", "rng_uniform")},
    "broadcast_in_dim": Rule(links.broadcast_in_dim, narrow.broadcast_in_dim),
    "transpose": Rule(links.transpose, narrow.transpose),
    "squeeze": Rule(links.squeeze, narrow.squeeze),
    "reshape": Rule(links.reshape, narrow.reshape),
    # a sum over channels is a statistic over them (refused); max/min/argmax pick among them
    # a sum over channels is refused, or with trace(norms='masked') a mean over the kept ones
    "reduce_sum": Rule(links.reduce_sum, narrow.reduce_sum),
    **{n: Rule(links.reduce_sum, narrow.reduce) for n in ("reduce_and", "reduce_or", "reduce_xor")},
    **{n: Rule(links.reduce_max, narrow.reduce) for n in (
        "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin")},
    **{n: Rule(links.windowed, narrow.windowed) for n in (
        "reduce_window_sum", "reduce_window_max", "reduce_window_min")},
    "reduce_window": Rule(links.windowed),
    **{n: Rule(links.cumulative) for n in (
        "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    "pad": Rule(links.pad, narrow.pad),
    "slice": Rule(links.slice_, narrow.slice_),
    "rev": Rule(links.rev, narrow.rev),
    "concatenate": Rule(links.concatenate, narrow.concatenate),
    "split": Rule(links.split, narrow.split),
    "gather": Rule(links.gather),
    "conv_general_dilated": Rule(links.conv_general_dilated, narrow.conv_general_dilated),
    "dot_general": Rule(links.dot_general, narrow.dot_general),
    "scan": Rule(links.scan, narrow.scan, bodies=True),
    "cond": Rule(links.cond, narrow.cond, bodies=True),
    "while": Rule(links.while_, narrow.while_, bodies=True),
}

# primitive name -> rule: a process-wide table, like JAX's own primitive registrations
RULES: dict[str, Rule] = dict(_BUILTIN)


def rule_for(primitive: str) -> Rule | None:
    """The rule of ``primitive`` (its name in a jaxpr), or None."""
    return RULES.get(primitive)


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
    ``rule=None`` removes a registered rule (a built-in rule it replaced comes back). A
    primitive without a rule loses every channel it touches (``PruningGraph.unprunable`` says
    which and why); the rest of the model is traced as usual.

    Compaction (`jaxprune.compaction.compact` of a model without the bundled models'
    ``keep_out``/``keep_in``) uses the same rule: an ``'elementwise'`` primitive runs on the
    narrowed operands; one with a function rule runs at full width on its operands scattered
    back with zeros and its results are sliced to the kept positions (exact, not faster: the
    axis pairs say which channels flow where, not how to compute the primitive narrow).
    """
    if not isinstance(primitive, str) or not primitive:
        raise ValueError(f"primitive must be a primitive name (str), got {primitive!r}")
    if rule is None:
        if primitive in _BUILTIN:
            RULES[primitive] = _BUILTIN[primitive]
        else:
            RULES.pop(primitive, None)
        return
    if not (rule == "elementwise" or callable(rule)):
        raise ValueError(f"rule must be 'elementwise', a function of the equation or None, got {rule!r}")
    if rule == "elementwise":
        builtin = _BUILTIN.get(primitive)
        if builtin is not None and builtin.link in (links.elementwise, links.copy):
            RULES[primitive] = dataclasses.replace(builtin, registered=True)  # what it was
        else:
            RULES[primitive] = Rule(links.elementwise, narrow.elementwise, registered=True)
    else:
        RULES[primitive] = Rule(links.axis_pairs(rule), registered=True)
