"""A small ``flax.nnx`` CNN, used to show that the tracer and pruning work for NNX models.

``conv1`` 3x3 -> ``bn1`` -> ReLU -> ``conv2`` 3x3 -> ``bn2`` -> ReLU -> global average pool ->
``fc``. ``__call__(x, train=False)`` mirrors the Linen models (BN uses running averages unless
``train``). Widths default to ``features`` and can be narrowed the Linen way with ``keep_out``
(``{'conv1': (kept indices...)}``) so a compacted model can be rebuilt with the same class.
With ``graphdef, state = nnx.split(model)``, `jaxprune.graph.leaf_paths` names the state's leaves
like Linen variables: ``('params', 'conv1', 'kernel')``, ``('batch_stats', 'bn1', 'mean')``, ...
(collection from the ``nnx.Variable`` type, the Variable's ``'value'`` key dropped), so the groups
are named ``'conv1'``, ``'conv2'``.

Pruning an NNX model: ``trace(lambda st, x: nnx.merge(graphdef, st)(x), state, x)``; compaction
has no ``clone(keep_out=...)`` here, so rebuild by hand::

    small_state, _ = compaction.compact_variables(state, masks, graph)
    _, keep_out, _ = compaction.surgery(masks, graph)
    abstract = nnx.eval_shape(lambda: SmallNNXCNN(rngs=nnx.Rngs(0), keep_out=keep_out))
    small = nnx.merge(nnx.split(abstract)[0], small_state)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from jaxprune.models.common import BN_EPSILON, BN_MOMENTUM, width


class SmallNNXCNN(nnx.Module):
    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        num_classes: int = 10,
        in_features: int = 3,
        features: Sequence[int] = (16, 32),
        keep_out: Mapping[str, Sequence[int]] | None = None,
    ):
        keep_out = dict(keep_out or {})
        c1 = width(keep_out, "conv1", features[0])
        c2 = width(keep_out, "conv2", features[1])
        self.num_classes = num_classes
        self.conv1 = nnx.Conv(in_features, c1, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c2, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)
        self.fc = nnx.Linear(c2, num_classes, rngs=rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        x = nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)
