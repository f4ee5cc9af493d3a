"""Exact evaluation: top-1 and top-5 accuracy and mean cross-entropy over a whole data set placed
on the devices once (`put_eval_data`), in one jitted call (`make_eval_fn`), or over a streamed
one (`jaxprune.imagenet.ImagenetStream`), batch by batch with the same compiled program."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.masked_norm import masked_apply
from jaxprune.parallel import DATA_AXIS, make_mesh, replicate
from jaxprune.train_step import call_kwargs, cross_entropy


# uint8 images -> float images; e.g. partial(augment.normalize, mean=.., std=..)
Preprocess = Callable[[jax.Array], jax.Array]

def eval_step(variables: Any, images: jax.Array, labels: jax.Array, *, model: Any,
              preprocess: Preprocess | None = None, graph: Any = None, masks: Any = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(number correct, number correct in the top 5, summed cross-entropy)`` of a batch; rows
    with ``label < 0`` are padding and count for nothing. With fewer than 5 classes every
    valid row is a top-5 hit. A ``graph`` with normalised channels runs the model through
    `jaxprune.masked_norm.masked_apply` with ``masks``."""
    if preprocess is not None:
        images = preprocess(images)
    kwargs = call_kwargs(model, False)
    if graph is not None and graph.normalised:
        logits = masked_apply(model.apply, graph)(variables, images, masks=masks, **kwargs)
    else:
        logits = model.apply(variables, images, **kwargs)
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    ce = cross_entropy(logits, safe)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.int32)
    # top-5: fewer than 5 logits beat the label's (ties count for the label, as torch.topk may)
    label_logit = jnp.take_along_axis(logits, safe[:, None], axis=-1)
    top5 = jnp.sum((jnp.sum(logits > label_logit, axis=-1) < 5) & valid, dtype=jnp.int32)
    return correct, top5, jnp.sum(jnp.where(valid, ce, 0.0))

class EvalData(NamedTuple):
    """An evaluation set on the devices, in equal batches: ``images [nb, bs, ...]`` and
    ``labels int32 [nb, bs]`` (the last batch padded with label ``-1``) sharded over the batch
    axis (axis 1); ``n`` real examples. Built by `put_eval_data`."""

    images: jax.Array
    labels: jax.Array
    n: int

def put_eval_data(mesh: Mesh, images: np.ndarray, labels: np.ndarray, batch_size: int) -> EvalData:
    """Places a whole evaluation set on ``mesh`` once (`EvalData`), in batches of
    `eval_batch_size` ``(batch_size, N, devices)``. Every process passes the full arrays."""
    n = int(np.shape(images)[0])
    if n == 0:
        raise ValueError("evaluation needs at least one example")
    if np.shape(labels)[0] != n:
        raise ValueError(f"images and labels disagree on the number of examples: {n} vs "
                         f"{np.shape(labels)[0]}")
    bs = eval_batch_size(batch_size, n, mesh.size)
    nb = -(-n // bs)
    x = np.asarray(images)
    y = np.asarray(labels).astype(np.int32)
    if nb * bs > n:
        x = np.concatenate([x, np.zeros((nb * bs - n,) + x.shape[1:], x.dtype)])
        y = np.concatenate([y, np.full((nb * bs - n,), -1, np.int32)])
    x, y = x.reshape((nb, bs) + x.shape[1:]), y.reshape(nb, bs)
    sharding = NamedSharding(mesh, P(None, DATA_AXIS))
    if jax.process_count() == 1:
        xd, yd = jax.device_put((x, y), sharding)
    else:
        xd, yd = (jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]) for a in (x, y))
    return EvalData(xd, yd, n)

def make_eval_fn(model: Any, mesh: Mesh | None = None, preprocess: Preprocess | None = None,
                 *, runs: int = 0, graph: Any = None
                 ) -> Callable[[Any, EvalData], tuple[jax.Array, ...]]:
    """``fn(variables, data) -> (correct_count, top5_count, loss_sum)`` over a whole `EvalData`
    in one jitted call (a ``lax.scan`` of `eval_step` over its batches; one compiled shape).
    ``variables`` replicated on ``mesh`` (default all devices). ``runs=R``: variables with a
    leading run axis (`stack_runs`), counts and sums ``[R]``. A ``graph`` with normalised
    channels (``graph.normalised``) makes it ``fn(variables, data, masks)``: the masked model
    of `jaxprune.masked_norm.masked_apply` (``masks`` with a leading run axis too when
    ``runs``)."""
    mesh = make_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, P())
    batches = NamedSharding(mesh, P(None, DATA_AXIS))
    normalised = graph is not None and bool(graph.normalised)

    def whole(variables, images, labels, masks):
        def body(acc, xy):
            out = eval_step(variables, *xy, model=model, preprocess=preprocess,
                            graph=graph if normalised else None, masks=masks)
            return tuple(a + o for a, o in zip(acc, out)), None

        zero = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
        return jax.lax.scan(body, zero, (images, labels))[0]

    if runs:
        whole = jax.vmap(whole, in_axes=(0, None, None, 0 if normalised else None))
    jitted = jax.jit(whole, in_shardings=(repl, batches, batches, repl), out_shardings=repl)

    def fn(variables: Any, data: EvalData, masks: Any = None):
        if normalised and masks is None:
            raise ValueError("a graph with normalised channels evaluates the masked model: pass "
                             "masks (group name -> [C])")
        return jitted(variables, data.images, data.labels, masks if normalised else None)

    fn.mesh, fn.jitted, fn.preprocess = mesh, jitted, preprocess
    return fn

def eval_batch_size(requested: int, num_examples: int, num_devices: int) -> int:
    """The evaluation batch for ``requested`` (an upper bound): a multiple of ``num_devices`` (at
    least one example per device), no larger than needed for ``num_examples``; the last batch
    is padded, so any device count works."""
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
        raise ValueError(f"evaluation batch size {requested!r} is not allowed; expected a positive integer")
    per_device = max(1, int(requested) // num_devices)
    per_device = min(per_device, -(-num_examples // num_devices))  # no all-padding batches
    return per_device * num_devices

def is_stream(data: Any) -> bool:
    """Whether ``data`` is a streamed dataset (``for_epoch``/``iter_from``), not arrays."""
    return hasattr(data, "for_epoch") and hasattr(data, "iter_from")


def _stream_batches(mesh: Mesh, stream: Any):
    """A streamed evaluation set as one-batch `EvalData`s (padding rows get label -1), each
    placed on the devices while the previous one is evaluated."""
    for b in stream:
        images = np.asarray(b["image"])
        labels = np.where(np.asarray(b["mask"]) > 0, np.asarray(b["label"]), -1).astype(np.int32)
        pad = -len(labels) % mesh.size  # any stream batch size on any device count
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.full(pad, -1, np.int32)])
        d = put_eval_data(mesh, images, labels, len(labels))
        yield EvalData(d.images, d.labels, int(np.sum(labels >= 0)))


def _with_masks(step: Callable, masks: Any) -> Callable:
    """``step`` called with ``masks``, keeping its ``mesh``."""
    fn = functools.partial(step, masks=masks)
    fn.mesh = step.mesh  # type: ignore[attr-defined]
    return fn


def evaluate(model: Any, variables: Any, images: Any, labels: np.ndarray | None,
             batch_size: int, mesh: Mesh | None = None, preprocess: Preprocess | None = None,
             *, step: Callable | None = None, graph: Any = None, masks: Any = None
             ) -> dict[str, float]:
    """Top-1 (``accuracy``) and top-5 (``top5``) accuracy and mean cross-entropy (``loss``) over
    a whole data set.

    ``images [N, H, W, C]`` (uint8 needs ``preprocess``, e.g.
    ``partial(augment.normalize, mean=..., std=...)``) and ``labels int [N]`` host arrays, placed on
    the devices for this call; or an `EvalData` already there (``labels`` None); or a stream of
    batches (`jaxprune.imagenet.ImagenetStream`, ``labels`` None; its batch size is used),
    evaluated batch by batch. Every example counts exactly once (padding has label -1) and one
    batch shape is compiled. Pass ``step`` (from `make_eval_fn`) to reuse a compiled program
    across calls (`fit` does); ``variables`` must then be replicated on its mesh. A ``graph``
    with normalised channels evaluates `jaxprune.masked_norm.masked_apply` with ``masks`` (a
    ``step`` built with that graph needs ``masks`` too).
    """
    if step is not None:
        preprocess = getattr(step, "preprocess", preprocess)
    if not isinstance(images, EvalData) and not is_stream(images):
        if int(np.shape(images)[0]) and preprocess is None and not np.issubdtype(
                np.asarray(images[:1]).dtype, np.floating):
            raise TypeError("integer images need preprocess= (e.g. functools.partial("
                            "augment.normalize, mean=..., std=...))")
    if step is None:
        step = make_eval_fn(model, mesh, preprocess, graph=graph)
        variables = replicate(step.mesh, variables)
    if masks is not None:
        step = _with_masks(step, replicate(step.mesh, masks))
    if is_stream(images):
        parts, n = [], 0
        for d in _stream_batches(step.mesh, images):
            parts.append(step(variables, d))  # dispatched: the next batch loads meanwhile
            n += d.n
        if n == 0:
            raise ValueError("evaluation needs at least one example; the stream has none")
        totals = np.sum(np.asarray(jax.device_get(parts), np.float64), axis=0)
    else:
        data = images if isinstance(images, EvalData) else put_eval_data(step.mesh, images, labels, batch_size)
        totals, n = np.asarray(jax.device_get(step(variables, data)), np.float64), data.n
    correct, top5, loss = totals
    return {"accuracy": int(correct) / n, "top5": int(top5) / n, "loss": float(loss) / n}


__all__ = [
    "Preprocess",
    "eval_step",
    "EvalData",
    "put_eval_data",
    "make_eval_fn",
    "eval_batch_size",
    "evaluate",
]
