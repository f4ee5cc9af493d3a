"""The interface every pruning method implements (design.md section 7).

A method is a small frozen object of pure functions over `jaxprune.train_step.TrainState`;
the trainer calls them in this order::

    state = method.init(state, ctx)                 # once, before the first epoch (host)
    for epoch in range(total_epochs):
        for batch in ...:
            state, metrics = train_step(state, batch)   # adds method.penalty(...) to the loss
        state = method.end_of_epoch(state, epoch, ctx)   # re-selection (jit-friendly)
    state = method.finalize(state, ctx)             # masks -> final hard 0/1 masks

``state.masks`` are the masks of the last selection (1 keep, 0 pruned, in between decayed);
``state.hard`` marks hard-pruned channels with 0 (the train step runs the optimizer as
``jaxprune.masks.hard_masked`` with it, so their updates, optimizer moments and weight decay
are masked and they stay exactly zero). A method never touches the optimizer state. A method
changes ``masks``/``hard``/``params``/``method_state`` only through ``dataclasses.replace``
(``state.replace``); it never mutates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxprune.graph import PruningGraph


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method needs besides the state: the graph and the training length."""

    graph: PruningGraph
    total_epochs: int
    steps_per_epoch: int = 1


class Method(Protocol):
    name: str

    def init(self, state: Any, ctx: MethodContext) -> Any:
        """First selection, before training (e.g. SFP zeroes its first pruned set)."""

    def end_of_epoch(self, state: Any, epoch: int, ctx: MethodContext) -> Any:
        """Re-selection at the end of epoch ``epoch`` (0-based)."""

    def penalty(self, params: Any, batch_stats: Any, method_state: Any,
                ctx: MethodContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Extra loss term and its metrics (HFP's complexity penalty); zero for most methods."""

    def finalize(self, state: Any, ctx: MethodContext) -> Any:
        """Final hard 0/1 masks: ``masks == hard``, params of pruned channels zeroed."""


def final_roles(method: Any) -> tuple[str, ...] | None:
    """Member roles the method's final model zeroes in its pruned channels: ``None`` (every
    slice, the default) or, for SFP's official final model, ``('out',)`` (only the filters, so
    the BN constants stay and compaction carries them: ``compact(..., keep_constants=True)``)."""
    return getattr(method, "final_roles", None)


def no_penalty(params: Any, batch_stats: Any, method_state: Any,
               ctx: MethodContext) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The zero penalty of the methods that have none."""
    del params, batch_stats, method_state, ctx
    return jnp.zeros((), jnp.float32), {}


class MasksSetAtInit:
    """Mixin of the methods whose masks change only in ``init`` (dense, PFEC, fine-tuning):
    no re-selection at epoch ends, no penalty, ``finalize`` keeps the state."""

    def end_of_epoch(self, state: Any, epoch: Any, ctx: MethodContext) -> Any:
        del epoch, ctx
        return state

    def penalty(self, params: Any, batch_stats: Any, method_state: Any,
                ctx: MethodContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        return no_penalty(params, batch_stats, method_state, ctx)

    def finalize(self, state: Any, ctx: MethodContext) -> Any:
        del ctx
        return state
