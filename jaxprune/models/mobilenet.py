"""A tiny MobileNetV2-style network for 32x32 inputs (inverted residuals, depthwise convs).

Layout (``(expand ratio t, out channels, stride)`` per block)::

    stem   conv3x3 16 + stem_bn + ReLU6
    block0 t=2, 16, s1   (residual)
    block1 t=4, 24, s2
    block2 t=4, 24, s1   (residual)
    block3 t=4, 32, s2
    head   conv1x1 64 + head_bn + ReLU6, global average pool, fc

Each ``block{i}``: ``'expand'`` 1x1 conv + ``'expand_bn'`` + ReLU6, ``'dw'`` depthwise 3x3
(``feature_group_count`` = its width, which in a compacted model is the kept width, so
``keep_out[block/dw]`` must equal ``keep_out[block/expand]``) + ``'dw_bn'`` + ReLU6,
``'project'`` 1x1 (linear bottleneck) + ``'project_bn'``. Blocks with stride 1 and equal
widths add their input (no activation after the add, as in MobileNetV2), using the same reindex
contract as the ResNets: stream in at ``positions(keep_in, block/expand)``, out at
``out_positions`` (``keep_in`` of the next block's expand, or of ``'head'``), branch at
``positions(keep_out, block/project)``. The non-residual block outputs are reindexed the same way
(an identity for consistent keep dicts).

Dense params for 10 classes: 20,794.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxprune.models.common import (
    BN_EPSILON,
    BN_MOMENTUM,
    EMPTY,
    KeepMixin,
    conv_init,
    materialize,
    positions,
    reindex,
    sub_keep,
    width,
)

# (expand ratio, out channels, stride)
MOBILENET_TINY_BLOCKS: tuple[tuple[int, int, int], ...] = ((2, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2))
STEM_WIDTH = 16
HEAD_WIDTH = 64


def _bn(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name
    )


class InvertedResidual(KeepMixin, nn.Module):
    in_planes: int
    out_planes: int
    expand_ratio: int
    stride: int = 1
    out_positions: Optional[tuple[int, ...]] = None
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_planes == self.out_planes

    @nn.compact
    def __call__(self, x, train: bool = False):
        ko = self.keep_out
        hidden = self.in_planes * self.expand_ratio
        out_pos = self.out_positions if self.out_positions is not None else tuple(range(self.out_planes))

        y = nn.Conv(width(ko, "expand", hidden), (1, 1), use_bias=False, kernel_init=conv_init(),
                    dtype=self.dtype, name="expand")(x)
        y = nn.relu6(_bn("expand_bn", train, self.dtype)(y))
        w_dw = width(ko, "dw", hidden)
        y = nn.Conv(w_dw, (3, 3), (self.stride, self.stride), padding=((1, 1), (1, 1)), use_bias=False,
                    feature_group_count=w_dw, kernel_init=conv_init(), dtype=self.dtype, name="dw")(y)
        y = nn.relu6(_bn("dw_bn", train, self.dtype)(y))
        y = nn.Conv(width(ko, "project", self.out_planes), (1, 1), use_bias=False, kernel_init=conv_init(),
                    dtype=self.dtype, name="project")(y)
        y = _bn("project_bn", train, self.dtype)(y)
        y = reindex(y, positions(ko, "project", self.out_planes), out_pos)
        if self.residual:
            y = materialize(reindex(x, positions(self.keep_in, "expand", self.in_planes), out_pos) + y)
        return y


class MobileNetV2Tiny(KeepMixin, nn.Module):
    num_classes: int = 10
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(width(self.keep_out, "stem", STEM_WIDTH), (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=conv_init(), dtype=self.dtype, name="stem")(x)
        x = nn.relu6(_bn("stem_bn", train, self.dtype)(x))
        x = reindex(x, positions(self.keep_out, "stem", STEM_WIDTH), positions(self.keep_in, "block0/expand", STEM_WIDTH))
        in_planes = STEM_WIDTH
        n = len(MOBILENET_TINY_BLOCKS)
        for i, (t, c, s) in enumerate(MOBILENET_TINY_BLOCKS):
            consumer = f"block{i + 1}/expand" if i + 1 < n else "head"
            x = InvertedResidual(
                in_planes=in_planes,
                out_planes=c,
                expand_ratio=t,
                stride=s,
                out_positions=positions(self.keep_in, consumer, c),
                keep_out=sub_keep(self.keep_out, f"block{i}"),
                keep_in=sub_keep(self.keep_in, f"block{i}"),
                dtype=self.dtype,
                name=f"block{i}",
            )(x, train)
            in_planes = c
        x = nn.Conv(width(self.keep_out, "head", HEAD_WIDTH), (1, 1), use_bias=False, kernel_init=conv_init(),
                    dtype=self.dtype, name="head")(x)
        x = nn.relu6(_bn("head_bn", train, self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
