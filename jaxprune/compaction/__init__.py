"""Compaction: remove pruned channels for real and build a smaller model.

`compact` takes any model. The bundled models are cloned narrow through their
``keep_out``/``keep_in`` contract (`bundled`, with `carry` for SFP's kept BN constants); any
other Linen or NNX model that `jaxprune.graph.trace` follows is compacted from its own traced
program (`program`: every equation re-evaluated narrow through the per-primitive rules of
`jaxprune.graph.rules`; the result is a `ProgramModel`, `program_model`). Both paths share one
plan (`plan`): the kept positions of every leaf axis (`surgery`), their rounding to
kernel-friendly counts (`align_masks`) and the slicing that applies them (`slice_tree`).
A graph with normalised channels (`jaxprune.graph.trace(norms='masked')`) is compacted with its
sums over channels narrowed to the kept ones: the compact model equals
`jaxprune.masked_norm.masked_apply` of the model, the masked model of such a graph.
"""

from jaxprune.compaction.bundled import FILTERS_ONLY, compact_bundled, is_bundled
from jaxprune.compaction.carry import carry_constants
from jaxprune.compaction.model import compact
from jaxprune.compaction.plan import (AxisKeep, CompactResult, align_masks, axis_keep_from_json,
                                      axis_keep_to_json, compact_variables, refuse_empty,
                                      slice_tree, surgery)
from jaxprune.compaction.program import (CompactProgram, ProgramError, build_program,
                                         compact_program, export)
from jaxprune.compaction.program_model import ExportedModel, ProgramModel, compact_traced

__all__ = [
    "FILTERS_ONLY", "AxisKeep", "CompactProgram", "CompactResult", "ExportedModel",
    "ProgramError", "ProgramModel", "align_masks", "axis_keep_from_json", "axis_keep_to_json",
    "build_program", "carry_constants", "compact", "compact_bundled", "compact_program",
    "compact_traced", "compact_variables", "export", "is_bundled", "refuse_empty", "slice_tree",
    "surgery",
]
