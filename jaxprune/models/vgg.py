"""CIFAR VGG (11/13/16/19) with BatchNorm, as pruned in PFEC (Li et al. 2017), compactable.

VGG-16: 13 conv3x3 layers ``64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M``,
each ``Conv(use_bias=False) -> BN -> ReLU`` (a conv bias in front of BN is redundant: BN's
bias absorbs it; the PyTorch reimplementation of PFEC also uses ``bias=False``), 2x2 max pools,
flatten (1x1x512 for a 32x32 input), then ``fc1`` Dense(512) -> ``fc1_bn`` BN -> ReLU -> ``fc2``
Dense(num_classes). No dropout.

Module paths: ``'conv1'..'conv13'``, ``'bn1'..'bn13'``, ``'fc1'``, ``'fc1_bn'``, ``'fc2'``.
Widths come from ``keep_out`` (a plain chain: no reindexing is needed).

Dense VGG-16 for 10 classes: 14,987,722 params; 313.2M conv MACs + 0.27M FC MACs (3.13e8).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import BN_EPSILON, BN_MOMENTUM, EMPTY, KeepMixin, carried, conv_init, width

VGG_CFGS: dict[int, tuple] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class CifarVGG(KeepMixin, nn.Module):
    depth: int = 16
    num_classes: int = 10
    hidden: int = 512  # width of fc1
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in VGG_CFGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {self.depth}")
        i = 0
        for v in VGG_CFGS[self.depth]:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            i += 1
            x = carried(self, f"conv{i}", nn.Conv(
                width(self.keep_out, f"conv{i}", v), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=conv_init(), dtype=self.dtype, name=f"conv{i}",
            )(x))
            x = nn.BatchNorm(
                use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
                name=f"bn{i}",
            )(x)
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = carried(self, "fc1", nn.Dense(width(self.keep_out, "fc1", self.hidden), dtype=self.dtype,
                                          name="fc1")(x))
        x = nn.BatchNorm(
            use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype,
            name="fc1_bn",
        )(x)
        x = nn.relu(x)
        return carried(self, "fc2", nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x))
