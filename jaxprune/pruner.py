"""Pruners: the pruning methods as pure transforms over the model's variables (optax style).

Every method of `jaxprune.methods` is a frozen record of hyperparameters whose
``.pruner(graph, total_epochs, steps_per_epoch=1)`` returns a `Pruner`: four pure functions
over the model's variables (``{'params': ..., 'batch_stats': ...}``, any pytree with the
graph's paths) and the method's own typed state (a NamedTuple with at least ``masks``,
``hard`` and ``count``; e.g. `MaskState`, ``SFPState``, ``GHFPState``, ``HFPState``). It closes
over the hyperparameters, the graph and the training length, so any loop can drive it:
jaxprune's own trainer (`jaxprune.train_step`, `jaxprune.training.fit`), a
``flax.training.train_state.TrainState``, an ``nnx.Optimizer`` or plain arrays::

    pr = SFP(rate=0.3).pruner(graph, total_epochs=E)
    variables, ps = pr.init(variables)                  # SFP: the first selection
    tx = jaxprune.masks.hard_masked(optax.sgd(0.1, momentum=0.9), graph)
    for epoch in range(E):
        for x, y in batches:                            # loss + pr.penalty(variables, ps)[0]
            updates, opt_state = tx.update(grads, opt_state, params, masks=ps.hard)
        variables, ps = pr.update(variables, ps)        # re-selection at the epoch's end
    variables, ps = pr.finalize(variables, ps)          # final hard masks (ps.masks == ps.hard)

For an NNX model, `nnx_variables` / `nnx_update` move its Params and BatchStats to and from
such a variables dict, `trace_nnx` traces it, and ``hard_masked(tx, graph)`` goes into its
``nnx.Optimizer`` (``optimizer.update(model, grads, masks=ps.hard)``).

``ps.masks`` are the masks of the last selection (1 keep, 0 pruned, in between decayed; the
forward pass of a soft method sees them through the zeroed filters). ``ps.hard`` is what the
optimizer must freeze (`jaxprune.masks.hard_masked`); soft-pruned channels (``ps.masks == 0``,
``ps.hard == 1``) train normally. ``ps.count`` counts the epochs done, so ``update`` needs no
epoch argument. Every function is jittable (the count is then traced; SFP's variants and GHFP
re-select with traced counts); called with a concrete count, the counts are computed on the
host (float64), as jaxprune's trainer does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.graph import PruningGraph
from jaxprune.masks import init_masks


class MaskState(NamedTuple):
    """The state of the methods whose masks change only at ``init`` (dense, PFEC, fine-tuning).

    Attributes:
      masks: group name -> float32 ``[C]``, the masks of the last selection.
      hard: group name -> float32 ``[C]``, 0 where a channel is hard-pruned (freeze it).
      count: int32 scalar, the epochs done (``update`` calls since ``init``).
    """

    masks: dict
    hard: dict
    count: Any


class Pruner(NamedTuple):
    """A method as pure functions (see the module docstring).

    Attributes:
      init: ``variables -> (variables, state)``: the selection before training.
      update: ``(variables, state) -> (variables, state)``: the re-selection at an epoch's end
        (``state.count`` is the epoch that just ended; the returned count is one more).
      finalize: ``(variables, state) -> (variables, state)``: the final hard 0/1 masks
        (``masks == hard``, the pruned channels zeroed).
      penalty: ``(variables, state) -> (scalar, metrics)``: the extra loss term (HFP's
        complexity penalty; zero for the other methods), differentiable in the params.
      total_epochs: the training length the pruner's schedules were built for (None: any);
        `jaxprune.training.fit` refuses another number of epochs.
    """

    init: Callable[[Any], tuple[Any, Any]]
    update: Callable[[Any, Any], tuple[Any, Any]]
    finalize: Callable[[Any, Any], tuple[Any, Any]]
    penalty: Callable[[Any, Any], tuple[jax.Array, dict]]
    total_epochs: int | None = None


def check_variables(variables: Any) -> None:
    """ValueError unless ``variables`` is a mapping with a ``'params'`` collection."""
    if not hasattr(variables, "keys") or "params" not in variables:
        keys = sorted(variables) if hasattr(variables, "keys") else type(variables).__name__
        raise ValueError("variables must be a mapping with a 'params' collection "
                         f"(and 'batch_stats' for BN), got keys {keys!r}")


def check_total_epochs(total_epochs: Any) -> int:
    """``total_epochs`` as a positive int; ValueError naming the value otherwise."""
    if isinstance(total_epochs, bool) or not isinstance(total_epochs, int) or total_epochs < 1:
        raise ValueError(f"total_epochs must be a positive int, got {total_epochs!r}")
    return total_epochs


def zero_count() -> jax.Array:
    """The ``count`` of a fresh state: int32 0."""
    return jnp.zeros((), jnp.int32)


def next_count(count: Any) -> jax.Array:
    """``count + 1`` as an int32 scalar (traced or concrete)."""
    return jnp.asarray(count, jnp.int32) + 1


def epoch_of(count: Any) -> Any:
    """The epoch that just ended, read from ``count``: a Python int when it is concrete (the
    methods' host arithmetic, float64), the traced value inside ``jit``."""
    if isinstance(count, jax.core.Tracer):
        return count
    return int(count)


def zero_penalty(variables: Any, state: Any) -> tuple[jax.Array, dict]:
    """The zero penalty of the methods that have none."""
    del variables, state
    return jnp.zeros((), jnp.float32), {}


def fixed_pruner(masks: dict, hard: dict | None = None) -> Pruner:
    """A `Pruner` whose masks never change: ``init`` returns a `MaskState` of ``masks`` and
    ``hard`` (default: ``masks``), ``update`` only counts, ``finalize`` keeps the state."""
    hard = dict(masks) if hard is None else hard

    def init(variables):
        return variables, MaskState(masks, hard, zero_count())

    def update(variables, state):
        return variables, state._replace(count=next_count(state.count))

    def finalize(variables, state):
        return variables, state

    return Pruner(init, update, finalize, zero_penalty)


def dense_pruner(graph: PruningGraph) -> Pruner:
    """The `Pruner` of no pruning: masks and hard all ones."""
    ones = init_masks(graph) if graph is not None else {}
    return fixed_pruner(ones, dict(ones))


# ----------------------------------------------------------------------------- NNX models


def nnx_variables(model: Any) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` (pure dicts with string keys: the index of an
    ``nnx.Sequential`` / ``nnx.List`` layer is ``'0'``, ``'1'``, ...) of an NNX model's Params
    and BatchStats, named as `trace_nnx`'s graph names them."""
    from flax import nnx

    return {"params": _str_keys(nnx.state(model, nnx.Param).to_pure_dict()),
            "batch_stats": _str_keys(nnx.state(model, nnx.BatchStat).to_pure_dict())}


def _str_keys(tree: Any) -> Any:
    """``tree`` with every dict key a string (as the graph's leaf paths and serializers want)."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _own_keys(tree: Any, like: Any) -> Any:
    """``tree`` (string keys, `_str_keys`) with the keys of ``like`` (an NNX pure dict)."""
    if isinstance(like, dict):
        return {k: _own_keys(tree[str(k)], v) for k, v in like.items()}
    return tree


def nnx_update(model: Any, variables: Any) -> None:
    """Writes a variables dict (as `nnx_variables` gives) back into the NNX ``model``."""
    from flax import nnx

    for kind, col in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        state = nnx.state(model, kind)
        nnx.replace_by_pure_dict(state, _own_keys(variables[col], state.to_pure_dict()))
        nnx.update(model, state)


def nnx_apply(model: Any) -> Callable[..., Any]:
    """``apply(variables, *args, **kwargs)``: the NNX ``model`` called on a variables dict (as
    `nnx_variables` gives) instead of its own Params and BatchStats; pure, the model is not
    changed. Its other state (e.g. an ``nnx.Dropout``'s deterministic flag) is the model's at
    this call."""
    from flax import nnx

    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    like = (params.to_pure_dict(), stats.to_pure_dict())

    def apply(variables, *args, **kwargs):
        p, s = jax.tree_util.tree_map(lambda t: t, (params, stats))
        nnx.replace_by_pure_dict(p, _own_keys(variables["params"], like[0]))
        nnx.replace_by_pure_dict(s, _own_keys(variables["batch_stats"], like[1]))
        return nnx.merge(graphdef, p, s, rest)(*args, **kwargs)

    return apply


def trace_nnx(model: Any, x: Any, residual: str = "coupled", norms: str = "refuse",
              **call_kwargs: Any) -> PruningGraph:
    """`jaxprune.graph.trace` of an NNX model over its `nnx_variables`, in inference mode
    (``model(x, **call_kwargs)``; call ``model.eval()`` first where it has BatchNorm or
    Dropout). ``residual`` and ``norms`` are `trace`'s (``norms='masked'``: channels under a
    LayerNorm / RMSNorm / GroupNorm are prunable, see `jaxprune.masked_norm`)."""
    from jaxprune.graph import trace

    apply = nnx_apply(model)
    return trace(lambda v, a: apply(v, a, **call_kwargs), nnx_variables(model), x,
                 residual=residual, norms=norms)
