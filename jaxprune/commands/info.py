"""``jaxprune info``: a per-layer table of a model or a saved compact model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import flops
from jaxprune.graph import leaf_paths, trace_linen
from jaxprune.models import get_model


_IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def model_info(target: str, input_size: int = 0, residual: str = "scatter") -> str:
    """A per-layer table (widths, params, MACs in both conventions) of a model or checkpoint.

    ``target`` is a bundled model name (``resnet56``) or a directory holding a compact model
    (``jaxprune.load``) or a run directory with ``compact/`` inside.
    """
    from jaxprune.models import MODEL_NAMES

    from jaxprune.compaction import ExportedModel
    from jaxprune.user_models import build_model, is_import_path

    p = Path(target)
    if is_import_path(target) and not p.exists():
        model = build_model(target, num_classes=10)
        shape = (input_size or 32, input_size or 32, 3)
        x = jnp.zeros((1,) + shape, jnp.float32)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
        title = f"{target} (dense), input {shape}"
    elif target in MODEL_NAMES:
        model = get_model(target)
        size = input_size or (224 if target in _IMAGENET_MODELS else 32)
        shape = (size, size, 3)
        x = jnp.zeros((1,) + shape, jnp.float32)
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
        title = f"{target} (dense), input {shape}"
    elif p.exists():
        from jaxprune.artifact import load

        if (p / "compact").is_dir():
            p = p / "compact"
        model, variables, meta = load(p)
        shape = tuple(meta.get("input_shape") or (input_size or 32, input_size or 32, 3))
        if input_size:
            shape = (input_size, input_size, shape[-1])
        x = jnp.zeros((1,) + tuple(shape), jnp.float32)
        title = f"{p} ({meta.get('method', '?')}), input {tuple(shape)}"
        if isinstance(model, ExportedModel):
            return _exported_info(title, variables, meta)
    else:
        raise ValueError(f"{target!r} is neither a bundled model ({', '.join(MODEL_NAMES)}) "
                         "nor an existing checkpoint directory, nor a model's import path ('package.module:name')")
    graph = trace_linen(model, variables, x, residual=residual)
    conv = flops.count(graph, convention="conv")
    conv_fc = flops.count(graph, convention="conv_fc")
    params_by_module: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    for leaf in graph.leaves:
        if leaf.is_param:
            mod = "/".join(leaf.path[1:-1])
            params_by_module[mod] = params_by_module.get(mod, 0) + int(np.prod(leaf.shape))
            if leaf.path[-1] == "kernel":
                shapes[mod] = leaf.shape
    lines = [title, "", f"{'layer':28s} {'kind':5s} {'in':>5s} {'out':>5s} {'params':>12s} {'MACs':>14s}"]
    for op in graph.ops:
        if not op.module:
            continue
        k = shapes.get(op.module, ())
        cin, cout = (k[-2], k[-1]) if len(k) >= 2 else ("", "")
        lines.append(f"{op.module:28s} {op.kind:5s} {cin:>5} {cout:>5} "
                     f"{params_by_module.get(op.module, 0):>12d} {conv_fc.per_layer.get(op.module, 0):>14d}")
    lines += ["", f"total params                       {conv.params}",
              f"total MACs, conv only (SFP)        {conv.macs}",
              f"total MACs, conv + fc (PFEC)       {conv_fc.macs}",
              f"prunable groups ({residual})       {len(graph.groups)}"]
    return "\n".join(lines)


def _exported_info(title: str, variables: Any, meta: dict) -> str:
    """`model_info` of a compact model saved as its exported program (a model of the user's
    own): every variable's shape, and the totals recorded when it was compacted."""
    lines = [title + " (an exported program: per-variable shapes)", "",
             f"{'variable':40s} {'shape':>20s} {'size':>12s}"]
    for path, leaf in zip(leaf_paths(variables), jax.tree.leaves(variables)):
        lines.append(f"{'/'.join(path):40s} {str(tuple(np.shape(leaf))):>20s} {int(np.size(leaf)):>12d}")
    c = meta.get("compact") or {}
    lines += ["", f"total params                       {c.get('params', '?')}",
              f"total MACs, conv only (SFP)        {c.get('macs_conv', '?')}",
              f"total MACs, conv + fc (PFEC)       {c.get('macs_conv_fc', '?')}"]
    return "\n".join(lines)
