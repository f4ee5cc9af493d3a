"""Fast repeated evaluation of one model whose weights change only from one module on.

PFEC's sensitivity analysis evaluates the test set hundreds of times, each time with one layer
pruned: everything computed before that layer's top-level module is the same every time. A
`CutEvaluator` computes, once per cut, the input of a top-level child module (``'layer2_3'``)
on the whole evaluation set, keeps it on the device, and then evaluates any variables by
running the model with that module's input replaced by the cached activation (through
``flax.linen.intercept_methods``); XLA drops the prefix, which is dead code, so each
evaluation costs only the modules from the cut on. One compiled program per cut, whatever the
mask values.

Exact by construction when the variables differ from the cached ones only in modules called at
or after the cut (`cut_for` picks the earliest top-level module a group touches) and the cut
module is called once per forward pass; otherwise use a plain evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _is_child(module: nn.Module) -> bool:
    """Whether ``module`` is a direct child of the root module (scope path of length 1)."""
    scope = getattr(module, "scope", None)
    return scope is not None and len(scope.path) == 1


def top_level_order(model: nn.Module, variables: Any, sample: jax.Array) -> list[str]:
    """Names of ``model``'s direct children in the order a forward pass first calls them."""
    order: list[str] = []

    def icpt(next_fun, args, kwargs, context):
        m = context.module
        if _is_child(m) and m.name not in order and context.method_name == "__call__":
            order.append(m.name)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, sample)
    return order


def cut_for(member_paths: Iterable[Sequence[str]], order: Sequence[str]) -> str | None:
    """The earliest top-level module (of ``order``) that any of the variable paths
    ``('params', 'layer2_3', 'conv1', 'kernel')`` lies in; None if one lies outside them."""
    idx = []
    for path in member_paths:
        if len(path) < 2 or path[1] not in order:
            return None
        idx.append(order.index(path[1]))
    return order[min(idx)] if idx else None


class CutEvaluator:
    """Top-1 accuracy of ``model`` on ``(images, labels)`` with a cached prefix per cut.

    ``preprocess`` maps a uint8 batch to the model's input (e.g. `jaxprune.augment.normalize`).
    ``variables`` are the reference weights the prefixes are computed with. Batches of
    ``batch_size`` (the last one padded with label -1).
    """

    def __init__(self, model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
                 preprocess: Callable[[jax.Array], jax.Array], batch_size: int = 1000):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        self.model, self.variables = model, variables
        n = int(len(labels))
        if n == 0:
            raise ValueError("CutEvaluator needs at least one example")
        self.n = n
        self.batch_size = bs = min(batch_size, n)
        pad = (-n) % bs
        x = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]) if pad else images
        y = np.concatenate([labels, np.full((pad,), -1, labels.dtype)]) if pad else labels
        self.x = [jnp.asarray(x[i:i + bs]) for i in range(0, len(y), bs)]
        self.y = [jnp.asarray(y[i:i + bs], jnp.int32) for i in range(0, len(y), bs)]
        self.preprocess = preprocess
        self._cut: str | None = None
        self._acts: list[jax.Array] = []
        self._full = jax.jit(self._correct_full)
        self._suffix: Callable | None = None

    # -- programs
    def _correct(self, logits, y):
        return jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0), dtype=jnp.int32)

    def _correct_full(self, variables, x, y):
        return self._correct(self.model.apply(variables, self.preprocess(x)), y)

    def _apply_with(self, variables, x, cut: str, replace: Callable[[Any], Any] | None):
        """The model on ``x``; at the first call of child ``cut`` its input is passed to
        ``replace`` (which may return a substitute, or record it and return it unchanged)."""
        seen = []

        def icpt(next_fun, args, kwargs, context):
            m = context.module
            if (replace is not None and not seen and m.name == cut and _is_child(m)
                    and context.method_name == "__call__"):
                seen.append(True)
                args = (replace(args[0]),) + tuple(args[1:])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(icpt):
            out = self.model.apply(variables, self.preprocess(x))
        if replace is not None and not seen:
            raise ValueError(f"module {cut!r} was never called: not a top-level child of the model")
        return out

    def set_cut(self, cut: str | None) -> None:
        """Caches the input of top-level child ``cut`` on every batch (None: no cache)."""
        if cut == self._cut:
            return
        self._cut, self._acts, self._suffix = cut, [], None
        if cut is None:
            return

        def prefix(variables, x):
            box = []

            def record(a):
                box.append(a)
                return a

            self._apply_with(variables, x, cut, record)
            return box[0]

        pre = jax.jit(prefix)
        self._acts = [pre(self.variables, x) for x in self.x]

        def suffix(variables, x, act, y):
            return self._correct(self._apply_with(variables, x, cut, lambda _: act), y)

        self._suffix = jax.jit(suffix)

    def accuracy(self, variables: Any) -> float:
        """Top-1 accuracy of ``variables`` (which must equal the reference ones before the
        current cut)."""
        if self._suffix is None:
            counts = [self._full(variables, x, y) for x, y in zip(self.x, self.y)]
        else:
            counts = [self._suffix(variables, x, a, y) for x, a, y in zip(self.x, self._acts, self.y)]
        return int(np.sum(jax.device_get(counts))) / self.n


__all__ = ["CutEvaluator", "cut_for", "top_level_order"]
