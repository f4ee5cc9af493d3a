"""Shared set-ups of the benchmark scripts: models, method masks, train states, compiled steps.

Imported by train_throughput.py, inference_methods.py, reselect_cost.py, compile_times.py
(import `_harness` first: it puts the repository on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import _harness as H
from jaxprune import methods, optim, parallel, train_step as step_lib
from jaxprune.compaction import compact
from jaxprune.graph import trace_linen
from jaxprune.masks import init_masks
from jaxprune.pruner import Pruner
from jaxprune.models import get_model

IMAGE = (32, 32, 3)

# model -> SFP-like rate of the train-throughput benchmark (SFP's paper rates)
SFP_RATES = {"resnet20": 0.3, "resnet32": 0.3, "resnet56": 0.4, "resnet110": 0.3, "vgg16": 0.3}


def batch(b: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.PRNGKey(seed), (b,) + IMAGE)
    y = jax.random.randint(jax.random.PRNGKey(seed + 1), (b,), 0, 10)
    return x, y


@dataclasses.dataclass
class Setup:
    name: str
    model: Any
    graph: Any
    variables: Any
    optimizer: Any


def setup(name: str, residual: str = "scatter", seed: int = 1) -> Setup:
    """Model, random-init variables and its pruning graph (traced at batch 1)."""
    model = get_model(name)
    x1 = jnp.zeros((1,) + IMAGE)
    variables = jax.jit(lambda k: model.init(k, x1))(jax.random.PRNGKey(seed))
    graph = trace_linen(model, variables, x1, residual=residual)
    return Setup(name, model, graph, variables, optim.make_optimizer(0.1))


def fresh_state(s: Setup, model: Any = None, graph: Any = None) -> step_lib.TrainState:
    model = s.model if model is None else model
    return step_lib.create_train_state(model, graph, jax.random.PRNGKey(3), jnp.zeros((1,) + IMAGE),
                                       s.optimizer)


def with_variables(state: step_lib.TrainState, variables: Any, optimizer) -> step_lib.TrainState:
    params = variables["params"]
    return state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                         opt_state=optimizer.init(params))


def method_state(s: Setup, method: Any, total_epochs: int = 200) -> tuple[Any, Pruner]:
    """A train state over ``s.variables`` after the method's pruner's ``init`` (its first
    selection), and the pruner."""
    pr = method.pruner(s.graph, total_epochs, 390)
    st = with_variables(fresh_state(s, graph=s.graph), s.variables, s.optimizer)
    return step_lib.prune_init(pr, st), pr


def final_masks(s: Setup, method: Any) -> dict[str, jax.Array]:
    """The method's final hard masks (``finalize`` right after ``init``) on ``s.variables``."""
    st, pr = method_state(s, method)
    return step_lib.prune_finalize(pr, st).hard


def sfp_masks(s: Setup, rate: float) -> dict[str, jax.Array]:
    return final_masks(s, methods.get_method("sfp", rate=rate))


# ----------------------------------------------------------------------------- compiled steps


@dataclasses.dataclass
class Compiled:
    """A compiled, warm callable ``fn()`` (runs one step / one batch) and its compile times."""

    fn: Callable[[], Any]
    lower_s: float
    compile_s: float


def train_step(model: Any, graph: Any, state: step_lib.TrainState, optimizer, x, y, *,
               mask_hard: bool, pruner: Any = None) -> Compiled:
    """The library's jitted train step of ``model``, compiled once (lower + compile timed)."""
    pruner = methods.get_method("dense").pruner(graph, 1) if pruner is None else pruner
    step = step_lib.make_train_step(model, graph, optimizer, pruner, mask_hard=mask_hard)
    state = parallel.replicate(step.mesh, state)
    x, y = parallel.shard_batch(step.mesh, x, y)
    args = ((state.step, state.params, state.batch_stats, state.opt_state),
            (state.prune, state.rng), x, y)
    lower_s, compile_s, compiled = H.compile_seconds(step.jitted, *args)
    box = [args]

    def fn():
        new, _ = compiled(*box[0])
        box[0] = ((new.step, new.params, new.batch_stats, new.opt_state), box[0][1], x, y)
        return new.params

    H.block(fn())
    return Compiled(fn, lower_s, compile_s)


def inference(model: Any, variables: Any, x) -> Compiled:
    return inference_fn(jax.jit(lambda v, a: model.apply(v, a, train=False)), variables, x)


def inference_fn(jitted: Any, variables: Any, x) -> Compiled:
    """``jitted(variables, x)`` compiled once (lower + compile timed) and warm."""
    lower_s, compile_s, compiled = H.compile_seconds(jitted, variables, x)
    fn = lambda: compiled(variables, x)  # noqa: E731
    H.block(fn())
    return Compiled(fn, lower_s, compile_s)


def compact_setup(s: Setup, masks, align: int = 1):
    """``compact(...)`` of ``s`` under ``masks`` and the seconds it took."""
    t0 = time.perf_counter()
    res = compact(s.model, s.variables, masks, s.graph, align=align)
    H.block(res.variables)
    return res, time.perf_counter() - t0


def ones_masks(graph) -> dict[str, jax.Array]:
    return init_masks(graph)


def kept_fraction(masks) -> float:
    tot = sum(int(np.size(m)) for m in masks.values())
    return sum(int(np.sum(np.asarray(m) != 0)) for m in masks.values()) / max(tot, 1)
