"""The pruning graph's types: the groups of coupled channels, their members, and the channel
factors that count a pruned model's cost."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

ROLES = ("out", "in", "vector", "other")
RESIDUAL_POLICIES = ("coupled", "scatter")
NORM_POLICIES = ("refuse", "masked")


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One leaf's share of a group: ``leaf[..., index[c, :], ...]`` along ``axis`` is channel c.

    Attributes:
      path: leaf path from the variables root, e.g. ``('params', 'conv1', 'kernel')``.
      axis: the leaf axis the group indexes.
      index: int array ``[C, m]``; the ``m`` leaf positions along ``axis`` of each channel
        (``m > 1`` when a flatten spreads a channel over several classifier rows).
      role: ``'out'`` (output filters of a conv/dense kernel), ``'in'`` (input slice of a
        consumer kernel), ``'vector'`` (bias, BN scale/bias/mean/var) or ``'other'``.
    """

    path: tuple[str, ...]
    axis: int
    index: np.ndarray
    role: str

    @property
    def module(self) -> str:
        """Module path of the leaf: the path without collection and leaf name."""
        return module_path(self.path)


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """A set of coupled channels pruned together; its mask is one vector of shape ``[size]``."""

    name: str
    size: int
    members: tuple[Member, ...]
    producers: tuple[str, ...]
    kind: str  # 'conv' if any producer is a convolution, else 'dense'

    def filters(self) -> tuple[Member, ...]:
        """The members whose slices are the group's filters (role ``'out'``)."""
        return tuple(m for m in self.members if m.role == "out")


def module_path(path: Sequence[str]) -> str:
    """``('params', 'layer1_0', 'conv1', 'kernel') -> 'layer1_0/conv1'``."""
    return "/".join(path[1:-1])


@dataclasses.dataclass(frozen=True, eq=False)
class Factor:
    """A channel count of one tensor axis, as a function of the groups' masks.

    ``count = fixed + sum_g sum_c per_channel[g][c] * keep_g[c]``: ``fixed`` positions belong to
    no group, ``per_channel[g][c]`` positions of the axis are channel ``c`` of group ``g``.
    """

    size: int
    fixed: int
    per_channel: tuple[tuple[str, np.ndarray], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class CostOp:
    """One multiply-accumulate op (conv or dot_general) of the forward pass, per example.

    ``macs = const * prod(factor counts)``.
    """

    kind: str  # 'conv' or 'dense'
    module: str  # module path of the kernel, '' when the weights are not a variable
    const: int
    factors: tuple[Factor, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class LeafInfo:
    """One traced variable leaf: its path, shape and the channel factor of each axis."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    factors: tuple[Factor, ...]  # one per axis

    @property
    def is_param(self) -> bool:
        """Whether the leaf is in the ``'params'`` collection."""
        return self.path[0] == "params"


@dataclasses.dataclass(frozen=True, eq=False)
class PruningGraph:
    """The prunable groups of a model, plus what is needed to count its cost.

    Attributes:
      groups: group name -> `Group`, in forward order of their first producer.
      unprunable: producer module path -> reason its channels cannot be pruned.
      leaves: every traced variable leaf (path, shape, per-axis channel factors).
      ops: every conv / dot_general with its per-example MAC structure.
      residual: the residual policy used, 'coupled' or 'scatter'.
      normalised: names of the groups whose channels are summed over (a LayerNorm, RMSNorm or
        channel mean; traced with ``norms='masked'``): the masked model is
        `jaxprune.masked_norm.masked_apply` of the model, whose statistics count the kept
        channels only; empty for every other graph.
    """

    groups: Mapping[str, Group]
    unprunable: Mapping[str, str]
    leaves: tuple[LeafInfo, ...]
    ops: tuple[CostOp, ...]
    residual: str
    normalised: frozenset = frozenset()

    def group_sizes(self) -> dict[str, int]:
        return {name: g.size for name, g in self.groups.items()}

    def conv_groups(self) -> list[str]:
        """Names of groups whose filters come from convolutions."""
        return [n for n, g in self.groups.items() if g.kind == "conv"]

    def producer_to_group(self) -> dict[str, str]:
        """Producer module path -> name of the group holding its filters."""
        return {p: n for n, g in self.groups.items() for p in g.producers}

    def summary(self) -> str:
        lines = [f"{len(self.groups)} prunable groups (residual policy {self.residual!r}):"]
        for n, g in self.groups.items():
            extra = f" + {len(g.producers) - 1} coupled" if len(g.producers) > 1 else ""
            lines.append(f"  {n:32s} {g.size:5d} channels, {len(g.members):3d} slices{extra}")
        for p, why in self.unprunable.items():
            lines.append(f"  not prunable: {p}: {why}")
        return "\n".join(lines)
