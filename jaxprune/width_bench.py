"""Latency of each prunable group at candidate widths, measured on the current device
(``jaxprune bench-widths``), for the ``latency`` width policy (`jaxprune.selection.WidthPolicy`).

For a group kept at width ``w`` the table holds the forward time of the convolutions whose
output channels it owns (its producers, ``w`` filters) plus those that read it (its consumers,
``w`` input channels), each timed alone at the deploy batch size with its real input shape,
kernel, strides and padding, everything else at full width; the median of ``repeats`` runs.
Convolutions of the same signature (shapes and hyper-parameters) are timed once. Tables are
cached as JSON per device kind, model and input shape (`cache_path`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def conv_calls(model: nn.Module, variables: Any, x: Any) -> dict[str, dict]:
    """Every ``nn.Conv`` call of a forward pass: module path -> its input shape, features,
    kernel size, strides, padding and feature groups."""
    calls: dict[str, dict] = {}

    def icpt(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Conv) and context.method_name == "__call__":
            path = "/".join(m.scope.path)
            calls.setdefault(path, dict(
                input_shape=tuple(int(d) for d in args[0].shape), features=int(m.features),
                kernel_size=tuple(m.kernel_size), strides=m.strides or 1,
                padding=m.padding if isinstance(m.padding, str) else tuple(tuple(p) for p in m.padding),
                groups=int(m.feature_group_count)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
        jax.eval_shape(lambda v, a: model.apply(v, a), variables, x)
    return calls


def time_conv(spec: Mapping[str, Any], cin: int, cout: int, repeats: int = 5,
              dtype: Any = jnp.float32) -> float:
    """Median seconds of one forward of the conv ``spec`` with ``cin`` inputs, ``cout`` filters."""
    shape = tuple(spec["input_shape"][:-1]) + (int(cin),)
    conv = nn.Conv(int(cout), spec["kernel_size"], spec["strides"], padding=spec["padding"],
                   use_bias=False, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)
    params = conv.init(jax.random.PRNGKey(0), x[:1])
    fn = jax.jit(conv.apply)
    jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def candidate_widths(size: int, step: int) -> list[int]:
    """Multiples of ``step`` up to ``size``, and ``size`` itself."""
    return sorted(set(range(step, size + 1, step)) | {size})


def bench_widths(model: nn.Module, variables: Any, graph: Any, batch_shape: tuple[int, ...], *,
                 step: int = 8, repeats: int = 5, groups: Iterable[str] | None = None,
                 timer: Callable[[Mapping[str, Any], int, int], float] | None = None,
                 progress: bool = False) -> dict[str, dict[int, float]]:
    """``{group: {width: seconds}}`` for every conv group (or ``groups``), see the module
    docstring. ``batch_shape`` is the deploy batch (e.g. ``(256, 32, 32, 3)``); ``timer``
    replaces `time_conv` (tests)."""
    from tqdm import tqdm

    timer = timer or (lambda spec, cin, cout: time_conv(spec, cin, cout, repeats))
    calls = conv_calls(model, variables, jnp.zeros(batch_shape, jnp.float32))
    names = list(groups) if groups is not None else graph.conv_groups()
    cache: dict[tuple, float] = {}

    def timed(path: str, cin: int, cout: int) -> float:
        spec = calls[path]
        key = (spec["input_shape"][:-1], spec["kernel_size"], str(spec["strides"]),
               str(spec["padding"]), cin, cout)
        if key not in cache:
            cache[key] = float(timer(spec, cin, cout))
        return cache[key]

    table: dict[str, dict[int, float]] = {}
    for name in tqdm(names, disable=not progress, desc="bench-widths"):
        g = graph.groups[name]
        producers = [m.module for m in g.members if m.role == "out" and m.module in calls]
        consumers = [m.module for m in g.members if m.role == "in" and m.module in calls]
        if any(calls[p]["groups"] != 1 for p in producers + consumers):
            continue  # grouped / depthwise convs: widths move with their inputs; not tabulated
        row = {}
        for w in candidate_widths(g.size, step):
            t = sum(timed(p, calls[p]["input_shape"][-1], w) for p in dict.fromkeys(producers))
            t += sum(timed(c, w, calls[c]["features"]) for c in dict.fromkeys(consumers))
            row[w] = t
        table[name] = row
    return table


def cache_path(model_name: str, batch_shape: tuple[int, ...], root: str | os.PathLike | None = None
               ) -> Path:
    """``<root>/<device kind>/<model>-<B>x<H>x<W>x<C>.json``; root default
    ``$XDG_CACHE_HOME/jaxprune/widths`` (``~/.cache/jaxprune/widths``)."""
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "jaxprune" / "widths"
    kind = jax.devices()[0].device_kind.replace(" ", "_").replace("/", "_")
    return Path(root) / kind / f"{model_name}-{'x'.join(str(int(d)) for d in batch_shape)}.json"


def save_table(path: str | os.PathLike, table: Mapping[str, Mapping[int, float]], meta: Mapping) -> Path:
    """Writes a latency table (group -> width -> seconds) with its ``meta`` to ``path`` as JSON,
    atomically (temporary file, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": dict(meta), "table": {g: {str(w): t for w, t in row.items()} for g, row in table.items()}}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def load_table(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """The ``{group: {width: seconds}}`` table of a `save_table` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"width table {str(p)!r} does not exist (make one with jaxprune bench-widths)")
    doc = json.loads(p.read_text())
    return {g: {int(w): float(t) for w, t in row.items()} for g, row in doc["table"].items()}


__all__ = ["bench_widths", "cache_path", "candidate_widths", "conv_calls", "load_table",
           "save_table", "time_conv"]
