"""Training state and the jitted, data-parallel train step (design.md section 7).

PLACEHOLDER: only `TrainState` is fixed here; the rest is being written.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    """Everything one training run carries between steps; a pytree.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's ``'params'`` collection (full width, never compacted during training).
      batch_stats: the ``'batch_stats'`` collection (``{}`` for models without BN).
      opt_state: the optax state of ``params``.
      masks: group name -> float32 ``[C]``, the masks of the last selection.
      hard: group name -> float32 ``[C]``, 0 where a channel is hard-pruned, else 1.
      method_state: method-specific pytree (``{}`` if none), e.g. HFP's threshold.
      rng: PRNG key for dropout-free models' augmentation etc.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: dict
    hard: dict
    method_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """``{'params': ..., 'batch_stats': ...}`` as ``model.apply`` wants them."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out
