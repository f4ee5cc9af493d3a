"""Shared fixtures and host-side references for the core-library tests.

Speed matters here (2 CPU cores): variables are built from ``jax.eval_shape`` shapes and filled
with numpy (no jitted ``init``, whose RNG compiles slowly), references are computed on the host
with numpy, and everything a test module reuses is a module- or session-scoped fixture.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.graph import PruningGraph, leaf_paths, trace_linen
from jaxprune.models import get_model


def pytest_configure(config: Any) -> None:
    """One persistent XLA compilation cache for the session, in a fresh temporary directory:
    a test that builds a program compiled before (every in-process run of the same config does)
    loads it instead of compiling it again. Removed at the end of the session."""
    import tempfile

    config._jaxprune_jit_cache = tempfile.mkdtemp(prefix="jaxprune-tests-jit-")
    jax.config.update("jax_compilation_cache_dir", config._jaxprune_jit_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config: Any) -> None:
    import shutil

    shutil.rmtree(getattr(config, "_jaxprune_jit_cache", ""), ignore_errors=True)


def random_variables(model: Any, x: Any, seed: int = 0, **init_kwargs: Any) -> Any:
    """Variables of a Linen ``model`` for input ``x``, filled with numpy random values.

    Kernels: He normal over the fan-in (``kernel[..., j]`` has ``prod(shape[:-1])`` inputs),
    so activations stay O(1) through deep nets. BN: scale in [0.5, 1.5], bias N(0, 0.2),
    running mean N(0, 0.5), running var in [0.5, 2] (positive). Dense biases N(0, 0.2).
    (The fresh-init kernels of the models are He normal too, over the fan-out.)
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x[:1], **init_kwargs))
    flat, treedef = jax.tree_util.tree_flatten(shapes)
    out = []
    for path, s in zip(leaf_paths(shapes), flat):
        name, shape = path[-1], tuple(s.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            v = rng.normal(size=shape) * np.sqrt(2.0 / max(fan_in, 1))
        elif name == "mean":
            v = rng.normal(size=shape) * 0.5
        elif name == "var":
            v = rng.uniform(0.5, 2.0, size=shape)
        elif name == "scale":
            v = rng.uniform(0.5, 1.5, size=shape)
        else:  # biases (BN and dense)
            v = rng.normal(size=shape) * 0.2
        out.append(jnp.asarray(v, getattr(s, "dtype", jnp.float32)))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_masks(graph: PruningGraph, seed: int = 0, low: float = 0.1, high: float = 0.9
                 ) -> dict[str, jax.Array]:
    """0/1 masks with a per-group pruning rate drawn in [low, high]; never all zero."""
    rng = np.random.default_rng(seed)
    masks = {}
    for name, g in graph.groups.items():
        rate = rng.uniform(low, high)
        n_keep = min(g.size, max(1, int(round(g.size * (1.0 - rate)))))
        m = np.zeros(g.size, np.float32)
        m[rng.choice(g.size, n_keep, replace=False)] = 1.0
        masks[name] = jnp.asarray(m)
    return masks


def np_apply_masks(tree: Any, masks: Mapping[str, Any], graph: PruningGraph,
                   prefix: tuple[str, ...] = ()) -> Any:
    """Host reference of `apply_masks`: multiply each member slice by its channel's mask.

    Written member by member (``leaf[..., index[c, :], ...] *= mask[c]`` along the member's
    axis) with numpy, independently of the gather plan `jaxprune.masks` builds.
    """
    flat, treedef = jax.tree_util.tree_flatten(tree)
    by_path = {tuple(prefix) + p: np.array(leaf, dtype=np.float64)
               for p, leaf in zip(leaf_paths(tree), flat)}
    for name, g in graph.groups.items():
        m = np.asarray(masks[name], np.float64)
        for mem in g.members:
            if mem.path not in by_path:
                continue
            arr = np.moveaxis(by_path[mem.path], mem.axis, 0)  # a view: edits land in place
            rows = mem.index.ravel()  # channel c owns rows index[c, :]
            mult = np.repeat(m, mem.index.shape[1]).reshape((-1,) + (1,) * (arr.ndim - 1))
            arr[rows] = arr[rows] * mult
    out = [by_path[tuple(prefix) + p].astype(np.asarray(leaf).dtype)
           for p, leaf in zip(leaf_paths(tree), flat)]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(o) for o in out])


def rel_err(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def fast_compiles():
    """Turns off XLA's optimisation passes for one test module, then restores the setting.

    On CPU they take about two thirds of each compile, and the modules that use this compile
    dozens of one-off programs on tiny batches; nothing they check depends on the passes.
    """
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def resnet20():
    """``(model, variables, x)`` of CIFAR ResNet-20 with numpy-random variables, batch 2."""
    model = get_model("resnet20")
    x = jnp.asarray(np.random.default_rng(123).normal(size=(2, 32, 32, 3)), jnp.float32)
    return model, random_variables(model, x, seed=0), x


@pytest.fixture(scope="session")
def resnet20_graphs(resnet20):
    """Residual policy -> PruningGraph of ResNet-20."""
    model, variables, x = resnet20
    return {pol: trace_linen(model, variables, x, residual=pol) for pol in ("scatter", "coupled")}


_TINY_VALUES = {
    "name": "tiny", "model": "resnet20", "dataset": "digits", "image_size": 8, "epochs": 2,
    "batch_size": 64, "eval_batch_size": 128, "train_subset": 256, "test_subset": 128,
    "optimizer.schedule": "constant", "optimizer.base_lr": 0.05, "method.name": "sfp",
    "method.rate": 0.4, "keep_checkpoints": 1,
}


def tiny_config_source(**changes: Any) -> str:
    """Source of a config file for a seconds-long run (ResNet-20 on 8x8 digits, SFP 40%);
    ``changes`` override its values, dotted keys as ``optimizer__base_lr``."""
    values = dict(_TINY_VALUES)
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    lines = ["from jaxprune.config import base_config", "", "", "def get_config():",
             "    c = base_config()"]
    lines += [f"    c.{k} = {v!r}" for k, v in values.items()]
    return "\n".join(lines + ["    return c", ""])


def untimed(records: Any) -> list[dict]:
    """Epoch records without their wall-clock times (`jaxprune.training.TIMING_KEYS`): what two
    runs that computed the same things must agree on."""
    from jaxprune.training import TIMING_KEYS

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
