"""The train state and the jitted train step: one step (`make_train_step`) or many in one call
over data that lives on the devices (`make_train_chunk`), for one run or R runs together.

The trainer is built on the `jaxprune.pruner.Pruner` API: ``state.prune`` is the pruner's
typed state, `prune_init` / `prune_update` / `prune_finalize` apply the pruner's functions to
the state's variables. `train_step` (pure): forward with ``train=True``, cross-entropy +
``pruner.penalty``, the optimizer wrapped in `jaxprune.masks.hard_masked` with the pruning
state's hard set (updates and optimizer moments of hard-pruned channels masked), then the new
params and BN running statistics multiplied by it, so a hard channel stays exactly zero, while
soft-pruned channels train normally.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.masked_norm import masked_apply
from jaxprune.masks import HardMaskedState, apply_masks, hard_masked, init_masks
from jaxprune.parallel import DATA_AXIS, check_batch, make_mesh, replicate, shard_batch
from jaxprune.pruner import MaskState, Pruner, zero_count


# (rng, uint8 images [B,H,W,C]) -> float images; e.g. partial(augment.augment_batch, mean=.., std=..)
Augment = Callable[[jax.Array, jax.Array], jax.Array]

@struct.dataclass
class TrainState:
    """Everything one training run carries between steps; a pytree.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's ``'params'`` collection (full width, never compacted during training).
      batch_stats: the ``'batch_stats'`` collection (``{}`` for models without BN).
      opt_state: the optax state of ``params``.
      prune: the pruner's state (`jaxprune.pruner`): a NamedTuple with ``masks`` (the masks of
        the last selection), ``hard`` (0 where a channel is hard-pruned) and ``count`` (epochs
        done), plus what the method needs (e.g. HFP's threshold).
      rng: PRNG key for dropout-free models' augmentation etc.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    prune: Any
    rng: jax.Array

    @property
    def masks(self) -> dict:
        """``prune.masks``: group name -> float32 ``[C]``, the masks of the last selection."""
        return self.prune.masks

    @property
    def hard(self) -> dict:
        """``prune.hard``: group name -> float32 ``[C]``, 0 where a channel is hard-pruned."""
        return self.prune.hard

    @property
    def variables(self) -> dict:
        """``{'params': ..., 'batch_stats': ...}`` as ``model.apply`` wants them."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


def _pruned(state: TrainState, variables: Any, prune: Any) -> TrainState:
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         prune=prune)


def prune_init(pruner: Pruner, state: TrainState) -> TrainState:
    """``state`` after ``pruner.init`` of its variables (the selection before training)."""
    return _pruned(state, *pruner.init({"params": state.params, "batch_stats": state.batch_stats}))


def prune_update(pruner: Pruner, state: TrainState) -> TrainState:
    """``state`` after ``pruner.update`` (the re-selection at the end of epoch
    ``state.prune.count``)."""
    return _pruned(state, *pruner.update({"params": state.params, "batch_stats": state.batch_stats},
                                         state.prune))


def prune_finalize(pruner: Pruner, state: TrainState) -> TrainState:
    """``state`` after ``pruner.finalize`` (the final hard masks)."""
    return _pruned(state, *pruner.finalize(
        {"params": state.params, "batch_stats": state.batch_stats}, state.prune))

def call_kwargs(model: Any, train: bool) -> dict:
    """``{'train': train}`` if ``model.__call__`` takes ``train``, else ``{}``."""
    import inspect

    call = getattr(model, "__call__", None)  # a compact ProgramModel / ExportedModel has none
    return {"train": train} if call is not None and "train" in inspect.signature(call).parameters else {}

@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model: Any, rng: jax.Array, x: jax.Array) -> Any:
    return model.init(rng, x, **call_kwargs(model, False))

def create_train_state(model: Any, graph: Any, rng: jax.Array, sample_input: Any,
                       optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None
                       ) -> TrainState:
    """A fresh `TrainState`: initialised variables, a `MaskState` of ones (`prune_init` with
    the method's pruner replaces it).

    Args:
      model: a Flax Linen module called as ``model.apply(variables, x, train=...)``.
      graph: its `jaxprune.graph.PruningGraph` (None: a model with nothing to prune).
      rng: a raw ``uint32 [2]`` PRNG key (``jax.random.PRNGKey``); split into the init key and
        ``state.rng``.
      sample_input: an input batch or a ``ShapeDtypeStruct`` (only its per-example shape is used;
        integer images are initialised as float32).
      optimizer: the optax transform the state's ``opt_state`` belongs to.
      mesh: if given, the state is replicated on it.
    """
    init_rng, state_rng = jax.random.split(rng)
    shape = tuple(np.shape(sample_input))
    dtype = getattr(sample_input, "dtype", jnp.float32)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x = jnp.zeros((1,) + shape[1:], dtype)
    try:
        variables = _init_variables(model, init_rng, x)
    except TypeError:  # an unhashable module: no compile cache across calls
        variables = jax.jit(functools.partial(model.init, **call_kwargs(model, False)))(init_rng, x)
    variables = dict(variables)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    masks = init_masks(graph) if graph is not None else {}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        prune=MaskState(masks, dict(masks), zero_count()),
        rng=state_rng,
    )
    return replicate(mesh, state) if mesh is not None else state

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``[B]`` of integer labels, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: Any,
               graph: Any, optimizer: optax.GradientTransformation, pruner: Pruner,
               augment: Augment | None = None, mask_hard: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step (pure; `make_train_step` jits and shards it).

    ``images [B, H, W, C]`` (uint8 with ``augment``, else already preprocessed floats),
    ``labels int [B]``. The loss is the mean cross-entropy plus
    ``pruner.penalty({'params': params, 'batch_stats': batch_stats}, state.prune)``,
    differentiated with respect to ``params`` only (the batch statistics and the pruning state
    are constants of the step).
    With ``mask_hard`` (and a graph), the optimizer runs as ``jaxprune.masks.hard_masked(
    optimizer, graph, mask_gradients=False)`` with ``masks=state.hard`` (the same result for
    the element-wise optimizers of `jaxprune.optim`): hard-pruned channels (``state.hard ==
    0``) get a zero update and lose their optimizer moments; their params and BN running
    statistics are re-zeroed after the update, so they stay exactly zero whatever momentum and
    weight decay do; soft-pruned channels (``masks == 0``, ``hard == 1``) are trained like any
    other. A graph with normalised channels (``graph.normalised``) runs the model through
    `jaxprune.masked_norm.masked_apply` with ``state.hard``: its statistics count the channels
    not hard-pruned (a soft-pruned channel is live, as in the plain model).

    Returns the new state and the metrics ``loss`` (cross-entropy), ``accuracy`` (top-1),
    ``penalty`` and the penalty's own metrics.
    """
    rng, aug_rng = jax.random.split(state.rng)
    if augment is not None:
        x = augment(aug_rng, images)
    elif not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images of dtype {images.dtype} need augment= (e.g. "
                        "functools.partial(augment.augment_batch, mean=..., std=...))")
    else:
        x = images
    kwargs = call_kwargs(model, True)
    has_bn = bool(jax.tree.leaves(state.batch_stats))
    apply = model.apply
    if graph is not None and graph.normalised:
        apply = functools.partial(masked_apply(model.apply, graph), masks=state.hard)

    def loss_fn(params):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
            logits, updated = apply(variables, x, mutable=["batch_stats"], **kwargs)
            new_bs = updated["batch_stats"]
        else:
            logits, new_bs = apply(variables, x, **kwargs), state.batch_stats
        ce = jnp.mean(cross_entropy(logits, labels))
        penalty, pen_metrics = pruner.penalty({"params": params, "batch_stats": state.batch_stats},
                                              state.prune)
        penalty = jnp.asarray(penalty, jnp.float32)
        return ce + penalty, (ce, penalty, pen_metrics, logits, new_bs)

    grads, (ce, penalty, pen_metrics, logits, new_bs) = jax.grad(loss_fn, has_aux=True)(state.params)
    masking = mask_hard and graph is not None and bool(state.hard)
    if masking:  # the one hard-masking path: updates and moments of hard channels
        tx = hard_masked(optimizer, graph, mask_gradients=False)  # element-wise SGD: same result
        updates, masked = tx.update(grads, HardMaskedState(state.opt_state), state.params,
                                    masks=state.hard)
        opt_state = masked.inner
    else:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masking:  # a hard channel's params and BN statistics stay exactly zero
        params = apply_masks(params, state.hard, graph, prefix=("params",))
        if has_bn:
            new_bs = apply_masks(new_bs, state.hard, graph, prefix=("batch_stats",))
    metrics = dict(pen_metrics)
    metrics.update(
        loss=ce,
        accuracy=jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
        penalty=penalty,
    )
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state, rng=rng)
    return new_state, metrics

def make_train_step(model: Any, graph: Any, optimizer: optax.GradientTransformation,
                    pruner: Pruner, *, mesh: Mesh | None = None,
                    augment: Augment | None = None, mask_hard: bool = True,
                    donate: bool = False) -> Callable[[TrainState, Any, Any],
                                                      tuple[TrainState, dict]]:
    """The jitted, data-parallel `train_step`: ``step(state, images, labels) -> (state, metrics)``.

    The batch is sharded over ``mesh`` (default: all devices) on its leading axis, the state
    and the metrics are replicated. ``state`` must live replicated on the mesh (`replicate`;
    `create_train_state(..., mesh=)` and `fit` do it). Host (numpy) batches are placed with
    `shard_batch`; a batch size that is not a multiple of the device count raises ValueError.
    ``mask_hard=False`` builds the plain step (no masking) for overhead comparisons;
    ``donate=True`` lets XLA reuse the buffers of the old ``step``, ``params``, ``batch_stats``
    and ``opt_state`` (the passed state is then invalid).
    Changing mask values never recompiles; the returned function has ``.mesh`` and ``.jitted``.
    """
    mesh = make_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(DATA_AXIS))

    # Only the big, never-aliased part of the state is donated: methods routinely put the same
    # array in `masks` and `hard`, and XLA refuses to donate one buffer twice.
    # Straight-line code, the same program as a one-step `make_train_chunk` (XLA:CPU runs the
    # convolutions of a loop body, even a one-trip one, far slower:
    # experiments/bench/records/loop_body_cpu.txt).
    def fn(big, small, images, labels):
        return train_step(TrainState(*big, *small), images, labels, model=model, graph=graph,
                          optimizer=optimizer, pruner=pruner, augment=augment,
                          mask_hard=mask_hard)

    jitted = jax.jit(fn, in_shardings=(repl, repl, batch, batch), out_shardings=(repl, repl),
                     donate_argnums=(0,) if donate else ())

    def step(state: TrainState, images: Any, labels: Any):
        if not (isinstance(images, jax.Array) and isinstance(labels, jax.Array)):
            images, labels = shard_batch(mesh, images, labels)
        else:
            check_batch(mesh, images.shape[0] // jax.process_count())
        big = (state.step, state.params, state.batch_stats, state.opt_state)
        small = (state.prune, state.rng)
        return jitted(big, small, images, labels)

    step.mesh = mesh
    step.jitted = jitted
    return step

def chunk_steps(steps_per_epoch: int, requested: int) -> int:
    """Steps per device call: the largest divisor of ``steps_per_epoch`` that is at most
    ``requested`` (0 = the whole epoch), so an epoch is whole chunks of one compiled length."""
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 0:
        raise ValueError(f"steps_per_call={requested!r}: expected 0 (the whole epoch) or a "
                         "positive integer")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch}: expected a positive integer")
    limit = steps_per_epoch if requested == 0 else min(int(requested), steps_per_epoch)
    return max(k for k in range(1, limit + 1) if steps_per_epoch % k == 0)

def stack_runs(states: Sequence[Any]) -> Any:
    """R pytrees of one structure (e.g. the `TrainState`s of R seeds) as one pytree whose leaves
    have a leading run axis of R, for ``make_train_chunk(..., runs=R)``."""
    if not states:
        raise ValueError("stack_runs needs at least one state")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

def unstack_runs(stacked: Any) -> list[Any]:
    """The inverse of `stack_runs`: one pytree per run."""
    n = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if len(n) != 1:
        raise ValueError(f"leaves disagree on the run axis: sizes {sorted(n)}")
    return [jax.tree.map(lambda x, r=r: x[r], stacked) for r in range(n.pop())]

def make_train_chunk(model: Any, graph: Any, optimizer: optax.GradientTransformation,
                     pruner: Pruner, *, steps: int, mesh: Mesh | None = None,
                     augment: Augment | None = None, donate: bool = False,
                     runs: int = 0) -> Callable:
    """``steps`` train steps in one jitted call over data that already lives on the devices.

    ``chunk(state, images, labels, order, start) -> (state, metrics, start + steps)``:
    ``images``/``labels`` are the whole training set on the devices (`put_replicated`),
    ``order`` the epoch's ``int32 [steps_per_epoch, batch]`` batch indices on the devices
    (`jaxprune.batching.epoch_batches`), ``start`` an int32 device scalar, the first row of
    ``order`` to run (it must leave ``steps`` rows). A ``lax.scan`` runs `train_step` on
    ``images[order[start + i]]``, gathered on the devices and sharded over the batch axis, for
    ``i < steps``; ``metrics`` stacks each step's metrics (``[steps]``). It computes what
    `make_train_step`'s step computes on those batches one by one, with one dispatch and no
    host transfer per chunk (the returned ``start`` feeds the next call). ``donate`` as in
    `make_train_step`.

    ``runs=R > 0`` trains R independent runs together (e.g. the seeds of one row), vectorised
    with ``jax.vmap``: every leaf of ``state`` has a leading axis of R (`stack_runs`), ``order``
    is ``[R, steps_per_epoch, batch]`` (each run its own batch order) and the metrics are
    ``[steps, R]``; the data set is shared. Each run computes what it computes alone up to float
    rounding (XLA batches the R convolutions into one; see tests/test_engine.py).

    ``steps > 1`` is a rolled loop, which XLA compiles differently from straight-line code: it
    agrees with stepping one by one to float rounding, not bitwise; a given chunk size is
    deterministic. XLA:CPU runs convolutions inside a loop body far slower
    (``experiments/bench/records/loop_body_cpu.txt``), so `fit` uses one-step chunks there by
    default.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected a positive integer")
    if runs < 0:
        raise ValueError(f"runs={runs}: expected 0 (one run, no run axis) or a positive count")
    mesh = make_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(DATA_AXIS))

    def fn(big, small, images, labels, order, start):
        def one(state, idx):
            x = jax.lax.with_sharding_constraint(images[idx], batch)
            y = jax.lax.with_sharding_constraint(labels[idx], batch)
            return train_step(state, x, y, model=model, graph=graph, optimizer=optimizer,
                              pruner=pruner, augment=augment)

        if runs:
            rows = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(order, start, steps, axis=1), 0, 1)
            body = jax.vmap(one)
        else:
            rows = jax.lax.dynamic_slice_in_dim(order, start, steps, axis=0)
            body = one
        # one step: straight-line (the `make_train_step` program, no loop); more: a loop
        if steps == 1:
            state, m = body(TrainState(*big, *small), rows[0])
            metrics = jax.tree.map(lambda v: v[None], m)
        else:
            state, metrics = jax.lax.scan(body, TrainState(*big, *small), rows)
        return ((state.step, state.params, state.batch_stats, state.opt_state),
                (state.prune, state.rng), metrics, start + steps)

    jitted = jax.jit(fn, in_shardings=(repl, repl, repl, repl, repl, repl),
                     out_shardings=(repl, repl, repl, repl),
                     donate_argnums=(0,) if donate else ())

    def chunk(state: TrainState, images: jax.Array, labels: jax.Array, order: jax.Array,
              start: jax.Array):
        big = (state.step, state.params, state.batch_stats, state.opt_state)
        small = (state.prune, state.rng)
        big, small, metrics, nxt = jitted(big, small, images, labels, order, start)
        return TrainState(*big, *small), metrics, nxt

    chunk.mesh, chunk.jitted, chunk.steps = mesh, jitted, steps
    chunk.with_steps = lambda n: make_train_chunk(model, graph, optimizer, pruner, steps=n,
                                                  mesh=mesh, augment=augment, donate=donate,
                                                  runs=runs)
    return chunk


__all__ = [
    "Augment",
    "TrainState",
    "create_train_state",
    "prune_finalize",
    "prune_init",
    "prune_update",
    "cross_entropy",
    "train_step",
    "make_train_step",
    "chunk_steps",
    "stack_runs",
    "unstack_runs",
    "make_train_chunk",
]
