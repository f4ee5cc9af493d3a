"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016, option-A shortcuts), compactable.

depth = 6n + 2: stem conv3x3(16) + BN + ReLU, three stages of n basic blocks with widths
16 / 32 / 64 (the first block of stages 2 and 3 has stride 2), global average pool, Dense.
Option-A shortcut of a stride-2 block: ``x[:, ::2, ::2]`` then zero-pad the channels equally on
both sides (``lo = hi = (C_out - C_in) // 2`` in the dense model). Convs have no bias and are
followed by BN (momentum 0.9 == PyTorch 0.1, epsilon 1e-5). Padding is explicit (1 pixel for
3x3), as in the PyTorch reference, so a stride-2 conv samples positions 0, 2, 4, ... like the
shortcut does.

Module paths: ``'stem'``, ``'stem_bn'``, ``'layer{s}_{b}/conv1'``, ``'.../bn1'``, ``'.../conv2'``,
``'.../bn2'`` (s = 1..3, b = 0..n-1), ``'fc'``.

Compaction (design.md section 6): conv widths come from ``keep_out``. In a block the residual
stream enters at positions ``positions(keep_in, block/conv1)`` and leaves at ``out_positions``
(= ``keep_in`` of the next consumer: the next block's conv1, or ``'fc'``); the branch output is at
``positions(keep_out, block/conv2)``; both operands of the add are reindexed to ``out_positions``.
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
    carried,
    carried_reindex,
    conv_init,
    materialize,
    positions,
    sub_keep,
    width,
)

CIFAR_RESNET_DEPTHS = (20, 32, 44, 56, 110)
STAGE_WIDTHS = (16, 32, 64)


def _bn(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name
    )


class CifarBasicBlock(KeepMixin, nn.Module):
    """Basic block with an option-A shortcut; keep dicts are relative to the block."""

    in_planes: int
    planes: int
    stride: int = 1
    out_positions: Optional[tuple[int, ...]] = None  # None: range(planes)
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_pos = positions(self.keep_in, "conv1", self.in_planes)
        out_pos = self.out_positions if self.out_positions is not None else tuple(range(self.planes))
        branch_pos = positions(self.keep_out, "conv2", self.planes)

        y = nn.Conv(
            width(self.keep_out, "conv1", self.planes), (3, 3), (self.stride, self.stride),
            padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init(), dtype=self.dtype, name="conv1",
        )(x)
        y = nn.relu(_bn("bn1", train, self.dtype)(carried(self, "conv1", y)))
        y = nn.Conv(
            width(self.keep_out, "conv2", self.planes), (3, 3), padding=((1, 1), (1, 1)),
            use_bias=False, kernel_init=conv_init(), dtype=self.dtype, name="conv2",
        )(y)
        y = _bn("bn2", train, self.dtype)(carried(self, "conv2", y))

        if self.stride != 1 or self.in_planes != self.planes:
            # option A: subsample, then zero channels on both sides (dense offset lo).
            lo = (self.planes - self.in_planes) // 2
            shortcut = carried_reindex(self, "shortcut", x[:, :: self.stride, :: self.stride, :],
                                       tuple(lo + p for p in in_pos), out_pos)
        else:
            shortcut = carried_reindex(self, "shortcut", x, in_pos, out_pos)
        return materialize(nn.relu(shortcut + carried_reindex(self, "branch", y, branch_pos, out_pos)))


class CifarResNet(KeepMixin, nn.Module):
    """CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...)."""

    depth: int = 20
    num_classes: int = 10
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    def block_names(self) -> list[tuple[str, int, int, int]]:
        """``[(name, in_planes, planes, stride), ...]`` of every block in forward order."""
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (n >= 1), got {self.depth}")
        n = (self.depth - 2) // 6
        out, in_planes = [], STAGE_WIDTHS[0]
        for s, planes in enumerate(STAGE_WIDTHS, start=1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                out.append((f"layer{s}_{b}", in_planes, planes, stride))
                in_planes = planes
        return out

    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks = self.block_names()
        x = nn.Conv(
            width(self.keep_out, "stem", STAGE_WIDTHS[0]), (3, 3), padding=((1, 1), (1, 1)),
            use_bias=False, kernel_init=conv_init(), dtype=self.dtype, name="stem",
        )(x)
        x = nn.relu(_bn("stem_bn", train, self.dtype)(x))
        # the stream's positions are those its first consumer reads (identity when consistent)
        x = carried_reindex(
            self, "stream",
            x,
            positions(self.keep_out, "stem", STAGE_WIDTHS[0]),
            positions(self.keep_in, f"{blocks[0][0]}/conv1", STAGE_WIDTHS[0]),
        )
        for i, (name, in_planes, planes, stride) in enumerate(blocks):
            consumer = f"{blocks[i + 1][0]}/conv1" if i + 1 < len(blocks) else "fc"
            x = CifarBasicBlock(
                in_planes=in_planes,
                planes=planes,
                stride=stride,
                out_positions=positions(self.keep_in, consumer, planes),
                keep_out=sub_keep(self.keep_out, name),
                keep_in=sub_keep(self.keep_in, name),
                dtype=self.dtype,
                name=name,
            )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return carried(self, "fc", nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))
