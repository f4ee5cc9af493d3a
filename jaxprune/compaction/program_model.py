"""The compact form of a model without the bundled models' contract: `ProgramModel` (its
traced program, compacted) and `ExportedModel` (that program restored from its ``jax.export``
artifact), and `compact_traced`, which builds the former."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.export  # noqa: F401  (jax < 0.8 does not import the submodule by itself)
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.compaction.plan import CompactResult, align_masks, surgery
from jaxprune.compaction.program import CompactProgram, build_program, compact_program, export
from jaxprune.graph import PruningGraph
from jaxprune.masks import apply_masks, binarize, check_tree, validate_masks
from jaxprune.pruner import nnx_apply


def _spec(a: Any) -> jax.ShapeDtypeStruct:
    return a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))


@dataclasses.dataclass(eq=False)
class ProgramModel:
    """The compact form of a model without the bundled models' ``keep_out``/``keep_in``
    contract (`jaxprune.compaction.compact` returns it): ``apply(variables, *args, **kwargs)``
    as Linen's, with the compact variables; each set of keyword arguments (``train=True``,
    ``mutable=['batch_stats']``, ...) is compacted from the model's own program when first used.
    ``kwargs`` (the inference keyword arguments it was compacted with, e.g. ``train=False``)
    are passed to every call unless the call overrides them.

    Attributes:
      call: ``call(dense_variables, *args, **kwargs)``, the original model (Linen
        ``module.apply``, or an NNX model's call over `jaxprune.pruner.nnx_variables`).
      dense_specs: the dense variables' shapes; masks, graph: what was compacted.
      kwargs: the default keyword arguments of every call.
    """

    call: Callable[..., Any]
    dense_specs: Any
    masks: Mapping[str, np.ndarray]
    graph: PruningGraph
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    _programs: dict = dataclasses.field(default_factory=dict)

    def program(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> CompactProgram:
        """The `CompactProgram` for these keyword arguments over `kwargs` (built once)."""
        kwargs = {**self.kwargs, **kwargs}
        key = repr(sorted(kwargs.items()))
        if key not in self._programs:
            fn = lambda v, *a: self.call(v, *a, **kwargs)  # noqa: E731
            self._programs[key] = build_program(fn, self.dense_specs, self.masks, self.graph,
                                                jax.tree_util.tree_map(_spec, tuple(args)))
        return self._programs[key]

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        return self.program(args, kwargs)(variables, *args)

    def export(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """`export` of ``apply`` at the shapes of ``args``."""
        return export(self.program(args, kwargs), variables, *args)


@dataclasses.dataclass(eq=False)
class ExportedModel:
    """A compact model restored from its ``jax.export`` artifact (`jaxprune.load` of a
    `ProgramModel`): ``apply(variables, x)`` runs without the model's Python code. The artifact
    has a fixed batch size; other batch sizes are padded to a multiple of it and run in chunks
    (outputs are batch-major; inference mode, where examples are independent)."""

    exported: Any
    batch_size: int

    def apply(self, variables: Any, x: Any) -> Any:
        n, b = int(x.shape[0]), self.batch_size
        if n == b:
            return self.exported.call(variables, x)
        m = -(-n // b)
        pad = jnp.concatenate([x, jnp.zeros((m * b - n,) + tuple(x.shape[1:]), x.dtype)]) if m * b > n else x
        chunks = pad.reshape((m, b) + tuple(x.shape[1:]))
        out = jax.lax.map(lambda c: self.exported.call(variables, c), chunks)
        return jax.tree_util.tree_map(lambda o: o.reshape((m * b,) + o.shape[2:])[:n], out)

    def variable_specs(self) -> Any:
        args, _ = jax.tree_util.tree_unflatten(self.exported.in_tree, self.exported.in_avals)
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args[0])


def compact_traced(model: Any, variables: Any, masks: Mapping[str, Any], graph: PruningGraph,
                   align: int = 1, *, keep_constants: bool = False, sample_input: Any = None,
                   **call_kwargs: Any) -> CompactResult:
    """`jaxprune.compaction.compact` of a model without the keep contract (any Linen module or
    NNX model `jaxprune.graph.trace` follows): its traced program, compacted; the result's
    ``model`` is a `ProgramModel`, checked against the masked model on ``sample_input``.
    ``call_kwargs`` (e.g. ``deterministic=True``) go to every call of the model, compact or
    dense; a Linen module whose ``__call__`` takes ``train`` gets ``train=False`` unless given."""
    name = type(model).__name__
    if keep_constants:
        raise ValueError(f"keep_constants=True needs a bundled model (keep_out/keep_in and "
                         f"`carried` hooks); {name} is compacted from its program, which removes "
                         "the pruned channels' BN constants with them (SFP(final_bn='zero'))")
    if sample_input is None:
        raise ValueError(f"compacting {name}, which has no keep_out/keep_in fields, traces its "
                         "program: pass sample_input= (a batch of model inputs)")
    infer = dict(call_kwargs)
    if isinstance(model, nnx.Module):
        call = nnx_apply(model)
    elif isinstance(model, nn.Module):
        call = model.apply
        if "train" not in infer and "train" in inspect.signature(model.__call__).parameters:
            infer["train"] = False
    else:
        raise TypeError(f"compact takes a Flax Linen module or an NNX model, got {name}")
    validate_masks(masks, graph)
    check_tree(variables, graph)
    kept = align_masks(masks, align)
    if align > 1:
        variables = apply_masks(variables, binarize(masks), graph)
    fn = lambda v, x: call(v, x, **infer)  # noqa: E731
    program, small = compact_program(fn, variables, kept, graph, (jnp.asarray(sample_input),))
    axis_keep, keep_out, keep_in = surgery(kept, graph)
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    pm = ProgramModel(call, jax.tree_util.tree_map(spec, variables),
                      {k: np.asarray(v) for k, v in kept.items()}, graph, infer)
    pm._programs[repr(sorted(infer.items()))] = program
    return CompactResult(pm, small, keep_out, keep_in, axis_keep, kept)
