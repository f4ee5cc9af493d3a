"""`compact`: one entry for every model, the bundled models' contract or the traced program."""

from __future__ import annotations

from typing import Any, Mapping

import jax

from jaxprune.compaction.bundled import compact_bundled, is_bundled
from jaxprune.compaction.plan import CompactResult
from jaxprune.compaction.program_model import compact_traced
from jaxprune.graph import PruningGraph
from jaxprune.masks import check_hard_masks


def compact(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
            align: int = 1, *, keep_constants: bool = False, sample_input: Any = None,
            **call_kwargs: Any) -> CompactResult:
    """Builds the physically smaller model and variables.

    ``model`` is a bundled model (a Linen module with ``keep_out`` and ``keep_in`` fields: it is
    cloned narrow, `jaxprune.compaction.bundled`), or any other Linen module or NNX model that
    `jaxprune.graph.trace` follows: its program is compacted (`jaxprune.compaction.program`)
    and ``model`` of the result is a `jaxprune.compaction.ProgramModel` (``apply(variables, x,
    **kwargs)``; for NNX, ``variables`` is `jaxprune.pruner.nnx_variables`'s dict), checked
    against the masked model on ``sample_input``, which it needs. Channels whose mask is 0 are
    removed; the kept ones are copied unchanged. With ``align > 1`` each group keeps a
    multiple of ``align`` channels (`align_masks`): faster kernels, same outputs.
    ``keep_constants=True`` (bundled models, with ``sample_input``, a batch of model inputs)
    carries the BN constants of the removed channels, as SFP's official final model keeps them;
    the result is checked against the filters-only masked model on ``sample_input`` (ValueError
    if the model has no `carried` hook where a constant flows). Masks must be exactly 0 or 1
    (ValueError naming the group and channel otherwise: a decayed or NaN value would give a
    compact model that differs from the masked one).

    ``call_kwargs`` are the model's inference keyword arguments (``deterministic=True``,
    ``training=False``; a Linen ``train`` argument defaults to False) for a model compacted
    from its program: the compact model's ``apply`` and `jaxprune.save_compact` pass them on
    every call. A bundled model takes none.

    Compaction computes at full float32 precision (``jax.default_matmul_precision('highest')``),
    also where float32 matmuls default to TF32 (NVIDIA GPUs); the compact model then runs at
    whatever precision its caller sets.
    """
    check_hard_masks(masks, what="compact's masks")
    # The carried constants and the checks against the masked model are float32 arithmetic:
    # on a GPU, float32 convolutions and matmuls default to TF32 (~1e-3 relative error).
    with jax.default_matmul_precision("highest"):
        return _compact(model, variables, masks, graph, align, keep_constants=keep_constants,
                        sample_input=sample_input, **call_kwargs)


def _compact(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
             align: int, *, keep_constants: bool, sample_input: Any,
             **call_kwargs: Any) -> CompactResult:
    if is_bundled(model):
        if call_kwargs:
            raise ValueError(f"compact got keyword arguments {sorted(call_kwargs)} for a bundled "
                             "model, which takes none (they are for models compacted from their program)")
        return compact_bundled(model, variables, masks, graph, align,
                               keep_constants=keep_constants, sample_input=sample_input)
    return compact_traced(model, variables, masks, graph, align, keep_constants=keep_constants,
                          sample_input=sample_input, **call_kwargs)
