"""A tiny DenseNet-style model: channel concatenation instead of addition.

    stem        conv3x3 16 + stem_bn + ReLU                         -> x   (16 channels)
    dense1      x = concat([x, relu(dense1_bn(dense1(x)))])  growth 12  (28)
    dense2      x = concat([x, relu(dense2_bn(dense2(x)))])  growth 12  (40)
    transition  conv1x1 20 + transition_bn + ReLU, avg pool 2x2
    global average pool, fc

Concatenating the narrowed tensors is already the compact layout (a consumer reads the kept
channels of every concatenated producer, in order), so only the widths come from ``keep_out``.

Dense params for 10 classes: 6,314.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import BN_EPSILON, BN_MOMENTUM, EMPTY, KeepMixin, conv_init, width


class DenseNetTiny(KeepMixin, nn.Module):
    num_classes: int = 10
    stem_width: int = 16
    growth: int = 12
    num_layers: int = 2
    transition_width: int = 20
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    def _bn(self, name: str, train: bool) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                            dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, train: bool = False):
        ko = self.keep_out
        x = nn.Conv(width(ko, "stem", self.stem_width), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=conv_init(), dtype=self.dtype, name="stem")(x)
        x = nn.relu(self._bn("stem_bn", train)(x))
        for i in range(1, self.num_layers + 1):
            y = nn.Conv(width(ko, f"dense{i}", self.growth), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                        kernel_init=conv_init(), dtype=self.dtype, name=f"dense{i}")(x)
            y = nn.relu(self._bn(f"dense{i}_bn", train)(y))
            x = jnp.concatenate([x, y], axis=-1)
        x = nn.Conv(width(ko, "transition", self.transition_width), (1, 1), use_bias=False,
                    kernel_init=conv_init(), dtype=self.dtype, name="transition")(x)
        x = nn.relu(self._bn("transition_bn", train)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
