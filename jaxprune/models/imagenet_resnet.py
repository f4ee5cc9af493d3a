"""ImageNet ResNet-18/34 (basic blocks) and 50/101/152 (bottleneck), compactable.

torchvision layout: stem ``conv7x7/2`` (``'stem'``) + ``'stem_bn'`` + ReLU + maxpool 3x3/2 (pad 1),
four stages ``'layer{s}_{b}'`` (s = 1..4) of widths 64/128/256/512 (x4 output for bottlenecks;
stride 2 in the first block of stages 2-4, on the 3x3 conv of a bottleneck, "v1.5"), a projection
shortcut ``'downsample'`` (1x1 conv, stride) + ``'downsample_bn'`` where the shape changes,
global average pool and ``'fc'``. Convs have no bias, padding is explicit (PyTorch's).

Compaction: as in :mod:`jaxprune.models.cifar_resnet`. A block's stream input is at
``positions(keep_in, block/conv1)``, its output at ``out_positions`` (``keep_in`` of the next
block's conv1, or of ``'fc'``), the branch at ``positions(keep_out, block/conv2 | conv3)``, a
projection shortcut at ``positions(keep_out, block/downsample)``.

Dense params for 1000 classes: ResNet-18 11,689,512; -34 21,797,672; -50 25,557,032;
-101 44,549,160; -152 60,192,808 (the torchvision numbers).
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

# depth -> (bottleneck?, blocks per stage)
IMAGENET_RESNET_CFGS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def _bn(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, name=name
    )


def _conv(features: int, k: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    p = k // 2
    return nn.Conv(
        features, (k, k), (stride, stride), padding=((p, p), (p, p)), use_bias=False,
        kernel_init=conv_init(), dtype=dtype, name=name,
    )


class ResNetBlock(KeepMixin, nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3/stride, 1x1 x4) block; keep dicts block-relative."""

    in_planes: int
    planes: int
    stride: int = 1
    bottleneck: bool = False
    out_positions: Optional[tuple[int, ...]] = None  # None: range(out_planes)
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    @property
    def out_planes(self) -> int:
        return self.planes * (4 if self.bottleneck else 1)

    @property
    def has_projection(self) -> bool:
        return self.stride != 1 or self.in_planes != self.out_planes

    @nn.compact
    def __call__(self, x, train: bool = False):
        ko, c_out = self.keep_out, self.out_planes
        in_pos = positions(self.keep_in, "conv1", self.in_planes)
        out_pos = self.out_positions if self.out_positions is not None else tuple(range(c_out))

        if self.bottleneck:
            y = carried(self, "conv1",
                        _conv(width(ko, "conv1", self.planes), 1, 1, "conv1", self.dtype)(x))
            y = nn.relu(_bn("bn1", train, self.dtype)(y))
            y = carried(self, "conv2",
                        _conv(width(ko, "conv2", self.planes), 3, self.stride, "conv2", self.dtype)(y))
            y = nn.relu(_bn("bn2", train, self.dtype)(y))
            y = carried(self, "conv3",
                        _conv(width(ko, "conv3", c_out), 1, 1, "conv3", self.dtype)(y))
            y = _bn("bn3", train, self.dtype)(y)
            branch_pos = positions(ko, "conv3", c_out)
        else:
            y = carried(self, "conv1",
                        _conv(width(ko, "conv1", self.planes), 3, self.stride, "conv1", self.dtype)(x))
            y = nn.relu(_bn("bn1", train, self.dtype)(y))
            y = carried(self, "conv2",
                        _conv(width(ko, "conv2", c_out), 3, 1, "conv2", self.dtype)(y))
            y = _bn("bn2", train, self.dtype)(y)
            branch_pos = positions(ko, "conv2", c_out)

        if self.has_projection:
            s = carried(self, "downsample",
                        _conv(width(ko, "downsample", c_out), 1, self.stride, "downsample", self.dtype)(x))
            s = _bn("downsample_bn", train, self.dtype)(s)
            shortcut = carried_reindex(self, "shortcut", s, positions(ko, "downsample", c_out), out_pos)
        else:
            shortcut = carried_reindex(self, "shortcut", x, in_pos, out_pos)
        return materialize(nn.relu(shortcut + carried_reindex(self, "branch", y, branch_pos, out_pos)))


class ImageNetResNet(KeepMixin, nn.Module):
    depth: int = 18
    num_classes: int = 1000
    keep_out: Mapping[str, tuple[int, ...]] = EMPTY
    keep_in: Mapping[str, tuple[int, ...]] = EMPTY
    dtype: Any = jnp.float32

    def block_names(self) -> list[tuple[str, int, int, int, bool]]:
        """``[(name, in_planes, planes, stride, bottleneck), ...]`` in forward order."""
        if self.depth not in IMAGENET_RESNET_CFGS:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_RESNET_CFGS)}, got {self.depth}")
        bottleneck, layers = IMAGENET_RESNET_CFGS[self.depth]
        exp = 4 if bottleneck else 1
        out, in_planes = [], STAGE_WIDTHS[0]
        for s, (planes, n) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                out.append((f"layer{s}_{b}", in_planes, planes, stride, bottleneck))
                in_planes = planes * exp
        return out

    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks = self.block_names()
        c0 = STAGE_WIDTHS[0]
        x = _conv(width(self.keep_out, "stem", c0), 7, 2, "stem", self.dtype)(x)
        x = nn.relu(_bn("stem_bn", train, self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = carried_reindex(
            self, "stream", x, positions(self.keep_out, "stem", c0),
            positions(self.keep_in, f"{blocks[0][0]}/conv1", c0)
        )
        for i, (name, in_planes, planes, stride, bottleneck) in enumerate(blocks):
            c_out = planes * (4 if bottleneck else 1)
            consumer = f"{blocks[i + 1][0]}/conv1" if i + 1 < len(blocks) else "fc"
            x = ResNetBlock(
                in_planes=in_planes,
                planes=planes,
                stride=stride,
                bottleneck=bottleneck,
                out_positions=positions(self.keep_in, consumer, c_out),
                keep_out=sub_keep(self.keep_out, name),
                keep_in=sub_keep(self.keep_in, name),
                dtype=self.dtype,
                name=name,
            )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return carried(self, "fc", nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))
