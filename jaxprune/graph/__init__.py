"""Prunable-group graph: which parameter slices belong to each prunable channel.

`trace` runs the model's apply function abstractly (`jax.make_jaxpr`) and propagates channel
identity through every primitive of the jaxpr. Each channel of each tensor axis is a node;
primitive rules add edges between nodes that must be removed together (a conv's output
filter, its BN entries, the next conv's input slice, residual partners). Connected components
are single prunable channels; components with the same set of member leaves form a `Group`.

Modules: `types` (Member, Group, PruningGraph, cost factors), `paths` (leaf paths, NNX naming),
`constants` (constant folding), `tracer` (the walk), `rules` (the per-primitive registry, with
its halves `links` for tracing and `narrow` for compaction), `groups` (`trace`, group
building), `costs` (cost factors).
"""

from jaxprune.graph.groups import build_graph, trace, trace_linen
from jaxprune.graph.paths import leaf_paths
from jaxprune.graph.rules import RULES, Rule, register_rule, rule_for
from jaxprune.graph.tracer import Body, Tracer, TracerRun, Visit, run_tracer
from jaxprune.graph.types import (RESIDUAL_POLICIES, ROLES, CostOp, Factor, Group, LeafInfo, Member,
                                  PruningGraph, module_path)

__all__ = [
    "RESIDUAL_POLICIES", "ROLES", "RULES", "Body", "CostOp", "Factor", "Group", "LeafInfo",
    "Member", "PruningGraph", "Rule", "Tracer", "TracerRun", "Visit", "build_graph", "leaf_paths",
    "module_path", "register_rule", "rule_for", "run_tracer", "trace", "trace_linen",
]
