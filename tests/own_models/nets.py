"""A user's own small CNNs: `LinenNet` (Linen, a residual block) and `NNXNet` (NNX)."""

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


class LinenNet(nn.Module):
    """conv-BN-ReLU, a residual block of two convs, global pooling, a linear head."""

    width: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        x = nn.relu(bn("bn0")(nn.Conv(self.width, (3, 3), use_bias=False, name="conv0")(x)))
        y = nn.relu(bn("bn1")(nn.Conv(self.width, (3, 3), use_bias=False, name="conv1")(x)))
        y = bn("bn2")(nn.Conv(self.width, (3, 3), use_bias=False, name="conv2")(y))
        x = nn.relu(x + y)
        x = nn.relu(bn("bn3")(nn.Conv(2 * self.width, (3, 3), strides=2, use_bias=False,
                                      name="conv3")(x)))
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def make_linen_net(width: int = 8, num_classes: int = 10) -> nn.Module:
    """A factory, as a config names it: 'own_models.nets:make_linen_net'."""
    return LinenNet(width=width, num_classes=num_classes)


class NNXNet(nnx.Module):
    """conv-BN-ReLU twice, global pooling, a linear head (NNX)."""

    def __init__(self, width: int = 8, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))
