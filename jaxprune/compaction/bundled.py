"""Compaction of the bundled models through their compactable-model contract.

`compact_bundled` slices every leaf that a group touches down to the kept positions and
rebuilds the model through the contract (docs/design.md section 6): the model is cloned with
``keep_out`` / ``keep_in`` (module path -> kept original channel indices of that conv/dense's
output / input), from which it derives its widths and the static re-indexing at residual adds.
The result computes exactly what the masked model computes: ``compact_model.apply(compact_vars,
x) == model.apply(apply_masks(variables, binarize(masks), graph), x)``: a removed channel's BN
scale and bias are removed with its filter, so the BN constant of a zeroed filter never reaches
the compact model (methods.md section 6).

``keep_constants=True`` compacts SFP's official final model instead, whose removed channels
were zeroed in their filters only (``apply_masks(..., roles=('out',))``) and so still emit their
BN constants: what those constants contribute downstream is computed on the dense model and
carried in the compact model's ``'carry'`` collection (`jaxprune.compaction.carry`), so that
``compact_model.apply(compact_vars, x) == model.apply(apply_masks(variables, binarize(masks),
graph, roles=('out',)), x)`` in inference mode (running BN statistics), at the spatial size of
``sample_input``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax.core import FrozenDict

from jaxprune.compaction.carry import carry_constants
from jaxprune.compaction.plan import CompactResult, align_masks, refuse_empty, slice_tree, surgery
from jaxprune.graph import PruningGraph
from jaxprune.masks import apply_masks, binarize, check_tree, validate_masks

# the members SFP's official code zeroes: only the filters (a removed channel keeps its BN)
FILTERS_ONLY = ("out",)


def is_bundled(model: Any) -> bool:
    """Whether ``model`` follows the compactable-model contract (``keep_out``/``keep_in``)."""
    return hasattr(model, "keep_out") and hasattr(model, "keep_in")


def compact_bundled(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
                    align: int = 1, *, keep_constants: bool = False, sample_input: Any = None
                    ) -> CompactResult:
    """`jaxprune.compaction.compact` of a bundled model: ``model.clone(keep_out=...,
    keep_in=...)`` and its sliced variables (see the module docstring)."""
    validate_masks(masks, graph)
    check_tree(variables, graph)
    refuse_empty(masks)
    kept = align_masks(masks, align)
    old_out = dict(getattr(model, "keep_out") or {})
    old_in = dict(getattr(model, "keep_in") or {})
    if keep_constants:
        if sample_input is None:
            raise ValueError("keep_constants=True needs sample_input= (a batch of model inputs): "
                             "the carried constants are computed by running the dense model")
        if old_out or old_in:
            raise ValueError("keep_constants=True compacts a dense model; this one is already "
                             "compact (non-empty keep_out/keep_in)")
        variables = apply_masks(variables, binarize(masks), graph, roles=FILTERS_ONLY)
    elif align > 1:
        variables = apply_masks(variables, binarize(masks), graph)
    axis_keep, keep_out, keep_in = surgery(kept, graph)
    new_out = _compose(old_out, keep_out)
    new_in = _compose(old_in, keep_in)
    new_model = model.clone(keep_out=FrozenDict(new_out), keep_in=FrozenDict(new_in))
    new_vars = slice_tree(variables, axis_keep)
    if keep_constants:
        new_vars = carry_constants(model, variables, new_model, new_vars, new_in, new_out,
                                   jnp.asarray(sample_input))
    return CompactResult(new_model, new_vars, new_out, new_in, axis_keep, kept)


def _compose(old: Mapping[str, tuple[int, ...]], new: Mapping[str, tuple[int, ...]]
             ) -> dict[str, tuple[int, ...]]:
    """Keeps indices in the ORIGINAL numbering when an already compact model is compacted."""
    out = dict(old)
    for k, idx in new.items():
        out[k] = tuple(old[k][i] for i in idx) if k in old else tuple(idx)
    return out

