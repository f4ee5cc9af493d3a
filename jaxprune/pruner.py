"""The pruning methods as pure transforms for any training loop (optax style).

`jaxprune.methods` objects speak to jaxprune's own ``TrainState``. `pruner` wraps one as a
`Pruner`: four pure functions over the model's variables (``{'params': ..., 'batch_stats':
...}``, any pytree with the graph's paths) and a small typed state, so that a loop built on
``flax.training.train_state.TrainState``, an ``nnx.Optimizer`` or plain arrays can use it::

    pr = jaxprune.pruner.pruner(SFP(rate=0.3), graph, total_epochs=E)
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

``ps.hard`` is what the optimizer must freeze (`jaxprune.masks.hard_masked`); soft-pruned
channels (``ps.masks == 0``, ``ps.hard == 1``) train normally, as in jaxprune's own step.
``ps.count`` counts the epochs done, so ``update`` needs no epoch argument. Every function is
jittable (the count is then traced; SFP's variants and GHFP re-select with traced counts).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.graph import PruningGraph
from jaxprune.masks import init_masks
from jaxprune.methods.base import MethodContext


class PruneState(NamedTuple):
    """What a method carries between calls.

    Attributes:
      masks: group name -> float32 ``[C]``, the masks of the last selection.
      hard: group name -> float32 ``[C]``, 0 where a channel is hard-pruned (freeze it).
      method_state: the method's own pytree (``{}`` if none), e.g. HFP's threshold.
      count: int32 scalar, the epochs done (re-selections since ``init``); ``update`` reads
        it as the epoch that just ended and adds 1.
    """

    masks: dict
    hard: dict
    method_state: Any
    count: Any = 0


class Pruner(NamedTuple):
    """A method as pure functions; see the module docstring."""

    init: Callable[[Any], tuple[Any, PruneState]]
    update: Callable[[Any, PruneState], tuple[Any, PruneState]]
    finalize: Callable[[Any, PruneState], tuple[Any, PruneState]]
    penalty: Callable[[Any, PruneState], tuple[jax.Array, dict]]


def _as_train_state(variables: Any, ps: PruneState):
    from jaxprune.train_step import TrainState

    if "params" not in variables:
        raise ValueError("variables must be a mapping with a 'params' collection "
                         f"(and 'batch_stats' for BN), got keys {sorted(variables)!r}")
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}), opt_state=(),
                      masks=ps.masks, hard=ps.hard, method_state=ps.method_state,
                      rng=jnp.zeros((2,), jnp.uint32))


def _back(variables: Any, ts, count: Any) -> tuple[Any, PruneState]:
    out = dict(variables)
    out["params"] = ts.params
    if "batch_stats" in variables:
        out["batch_stats"] = ts.batch_stats
    return out, PruneState(ts.masks, ts.hard, ts.method_state, count)


def _epoch(count: Any) -> Any:
    """The epoch that just ended: a Python int when ``count`` is concrete (the methods' host
    arithmetic, float64), the traced value inside ``jit``."""
    if isinstance(count, jax.core.Tracer):
        return count
    return int(count)


def pruner(method: Any, graph: PruningGraph, total_epochs: int, steps_per_epoch: int = 1) -> Pruner:
    """`Pruner` of a `jaxprune.methods` object (SFP and its variants, GHFP, HFP, PFEC, ...).

    ``total_epochs`` is the training length the method's schedules refer to (ASFP's rate,
    GHFP's hard fraction); ``steps_per_epoch`` is used by HFP's penalty schedule.
    """
    ctx = MethodContext(graph=graph, total_epochs=total_epochs, steps_per_epoch=steps_per_epoch)
    fresh = PruneState(init_masks(graph), init_masks(graph), {}, jnp.zeros((), jnp.int32))

    def init(variables):
        return _back(variables, method.init(_as_train_state(variables, fresh), ctx), fresh.count)

    def update(variables, ps):
        ts = method.end_of_epoch(_as_train_state(variables, ps), _epoch(ps.count), ctx)
        return _back(variables, ts, jnp.asarray(ps.count, jnp.int32) + 1)

    def finalize(variables, ps):
        return _back(variables, method.finalize(_as_train_state(variables, ps), ctx), ps.count)

    def penalty(variables, ps):
        return method.penalty(variables["params"], variables.get("batch_stats", {}),
                              ps.method_state, ctx)

    return Pruner(init, update, finalize, penalty)


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


def trace_nnx(model: Any, x: Any, residual: str = "coupled", **call_kwargs: Any) -> PruningGraph:
    """`jaxprune.graph.trace` of an NNX model over its `nnx_variables`, in inference mode
    (``model(x, **call_kwargs)``; call ``model.eval()`` first where it has BatchNorm or
    Dropout)."""
    from jaxprune.graph import trace

    apply = nnx_apply(model)
    return trace(lambda v, a: apply(v, a, **call_kwargs), nnx_variables(model), x, residual=residual)
