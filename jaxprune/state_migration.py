"""Training checkpoints written before the pruning state was one typed field, read today.

Older checkpoints hold the `jaxprune.train_step.TrainState` with three pruning fields,
``masks``, ``hard`` and ``method_state`` (a dict, e.g. HFP's ``{'tau', 'ref', 'beta'}``),
where today's hold one ``prune`` field (the pruner's typed state, with a ``count`` of the epochs
done). `jaxprune.checkpoints` restores such a checkpoint into `LegacyTrainState` (its stored
layout) and converts it with `from_legacy`: ``masks`` and ``hard`` move into the target's
pruning state, the ``method_state`` entries fill the fields of the same name (entries the
target's state has no field for are dropped: e.g. HFP's threshold when a fine-tuning phase is
restored), and ``count`` comes from the checkpoint's meta (the epochs done). The files on disk
are not changed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

LEGACY_FIELDS = ("masks", "hard", "method_state")


@struct.dataclass
class LegacyTrainState:
    """The stored layout of an older training checkpoint (see the module docstring)."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: Any
    hard: Any
    method_state: Any
    rng: Any


def is_legacy(stored: Any, target: Any) -> bool:
    """Whether the stored (metadata) tree ``stored`` has the older layout while ``target`` (a
    state with a ``prune`` field) has today's."""
    return (isinstance(stored, Mapping) and "masks" in stored and "prune" not in stored
            and hasattr(target, "prune"))


def _abstract_leaf(meta: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in meta.shape), meta.dtype)


def legacy_target(stored: Mapping[str, Any], target: Any) -> LegacyTrainState:
    """The restore target of an older checkpoint: ``target``'s arrays in the stored layout, its
    ``method_state`` shaped as stored (``stored`` is the checkpoint's metadata tree)."""
    method_state = jax.tree.map(_abstract_leaf, dict(stored.get("method_state") or {}))
    return LegacyTrainState(step=target.step, params=target.params,
                            batch_stats=target.batch_stats, opt_state=target.opt_state,
                            masks=target.prune.masks, hard=target.prune.hard,
                            method_state=method_state, rng=target.rng)


def from_legacy(old: LegacyTrainState, target: Any, count: int, sharding: Any = None) -> Any:
    """``target`` (today's layout) holding the restored older state ``old``; ``count`` is the
    number of epochs done (the checkpoint meta's ``next_epoch``, or a preempted epoch's
    ``epoch``), placed with ``sharding`` (default: that of ``target.prune.count``)."""
    prune = target.prune
    extra = {k: v for k, v in dict(old.method_state or {}).items()
             if k in prune._fields and k not in ("masks", "hard", "count")}
    sharding = sharding or getattr(prune.count, "sharding", None)
    value = jnp.asarray(int(count), jnp.int32)
    if sharding is not None:
        value = jax.device_put(value, sharding)
    prune = prune._replace(masks=old.masks, hard=old.hard, count=value, **extra)
    return target.replace(step=old.step, params=old.params, batch_stats=old.batch_stats,
                          opt_state=old.opt_state, prune=prune, rng=old.rng)
