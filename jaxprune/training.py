"""Training: the optimizer, LR schedules, the jitted data-parallel train/eval steps, the epoch loop.

Read top to bottom (design.md section 7):

- `make_optimizer`: PyTorch-style SGD (weight decay added to the gradient, then Nesterov
  momentum, then the learning rate), as in the papers' code.
- `sfp_cifar_schedule`, `step_schedule`, `constant_schedule`: ``step -> lr`` optax schedules.
- `create_train_state`: a fresh `TrainState` (all-ones ``masks`` and ``hard``).
- `train_step` (pure) / `make_train_step` (jitted, sharded): forward with ``train=True``,
  cross-entropy + ``method.penalty``, optimizer update, then everything a hard-pruned channel
  owns (update, new value, optimizer moments, BN running statistics) multiplied by
  ``state.hard`` so it stays exactly zero, while soft-pruned channels train normally.
- `make_train_chunk`: many train steps in one jitted call (a ``lax.scan``) over a training set
  that lives on the devices; `fit` runs every epoch through it.
- `put_eval_data` / `make_eval_fn` / `evaluate`: exact accuracy and mean loss over a whole
  evaluation set on the devices, one jitted call.
- `fit`: the epoch loop of the CLI, with automatic resume from the latest checkpoint.

Data parallelism uses `jax.sharding`, not ``pmap``: a 1-D mesh named ``'data'`` over all devices,
the batch sharded on its leading axis, the state replicated; XLA inserts the gradient
all-reduce, and BatchNorm's batch statistics are computed over the GLOBAL batch (the
cross-device mean is part of the sharded computation), so an N-device step computes what the
1-device step computes on the same batch, up to float summation order.

Multi-host: call `maybe_initialize_distributed` first. Every process then runs the same program
and feeds only its process-local slice of each global batch (`shard_batch` builds the global
array with ``jax.make_array_from_process_local_data``); `fit` and `evaluate` take that slice
themselves from the full host arrays every process holds.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.masks import apply_masks, init_masks, mask_optimizer_state

DATA_AXIS = "data"

# (rng, uint8 images [B,H,W,C]) -> float images; e.g. partial(data.augment_batch, mean=.., std=..)
Augment = Callable[[jax.Array, jax.Array], jax.Array]
# uint8 images -> float images; e.g. partial(data.normalize, mean=.., std=..)
Preprocess = Callable[[jax.Array], jax.Array]


@struct.dataclass
class TrainState:
    """Everything one training run carries between steps; a pytree.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: the model's ``'params'`` collection (full width, never compacted during training).
      batch_stats: the ``'batch_stats'`` collection (``{}`` for models without BN).
      opt_state: the optax state of ``params``.
      masks: group name -> float32 ``[C]``, the masks of the last selection.
      hard: group name -> float32 ``[C]``, 0 where a channel is hard-pruned, else 1.
      method_state: method-specific pytree (``{}`` if none), e.g. HFP's threshold.
      rng: PRNG key for dropout-free models' augmentation etc.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: dict
    hard: dict
    method_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict:
        """``{'params': ..., 'batch_stats': ...}`` as ``model.apply`` wants them."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out


# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedules
# --------------------------------------------------------------------------------------------


def make_optimizer(
    learning_rate: float | optax.Schedule,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
    """PyTorch ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` as an optax chain.

    ``g <- g + weight_decay * p`` (on every parameter, BN scales and biases included, as the
    papers' code), then ``buf <- momentum * buf + g``, ``update = g + momentum * buf``
    (Nesterov) or ``buf``, then ``p <- p - lr * update``. The chain always has the same two
    members (``add_decayed_weights``, ``sgd``) so the optimizer state's structure, and hence
    the checkpoints, do not depend on the hyper-parameters.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True needs momentum > 0 (as in PyTorch)")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum if momentum > 0 else None, nesterov=nesterov),
    )


def step_schedule(
    steps_per_epoch: int,
    base_lr: float = 0.1,
    boundaries: Sequence[float] = (30, 60, 90),
    factor: float = 0.1,
    warmup_epochs: float = 0,
    warmup_lr: float | None = None,
) -> optax.Schedule:
    """Piecewise-constant LR over epochs as an optax schedule of the step count.

    ``boundaries`` and ``warmup_epochs`` are in epochs and may be fractional (a shortened
    recipe keeps each phase's share of training); each becomes the step
    ``round(epochs * steps_per_epoch)``. ``warmup_lr`` before the warm-up step, else
    ``base_lr * factor ** (number of boundary steps <= step)``. The defaults are the ImageNet
    recipe (0.1, x0.1 at epochs 30, 60, 90). The values are computed once in float64 and
    rounded to float32, as PyTorch multiplies its Python-float LR.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    bounds = [float(b) for b in boundaries]
    if bounds != sorted(bounds) or any(not (b >= 0) or not np.isfinite(b) for b in bounds):
        raise ValueError(f"boundaries must be sorted non-negative epochs, got {tuple(boundaries)}")
    if not (warmup_epochs >= 0 and np.isfinite(warmup_epochs)):
        raise ValueError(f"warmup_epochs must be a finite number >= 0, got {warmup_epochs}")
    if warmup_epochs and warmup_lr is None:
        raise ValueError("warmup_epochs > 0 needs warmup_lr")
    values = jnp.asarray([base_lr * factor**k for k in range(len(bounds) + 1)], jnp.float32)
    bound_steps = jnp.asarray([int(round(b * steps_per_epoch)) for b in bounds], jnp.int32)
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_epochs and warmup_steps == 0:
        warmup_steps = 1  # a scaled-down warm-up still happens, for one step

    def schedule(count):
        step = jnp.asarray(count, jnp.int32)
        lr = values[jnp.sum(step >= bound_steps)] if bounds else values[0]
        if warmup_steps:
            lr = jnp.where(step < warmup_steps, jnp.float32(warmup_lr), lr)
        return lr

    return schedule


def sfp_cifar_schedule(
    steps_per_epoch: int,
    base_lr: float = 0.1,
    warmup_lr: float = 0.01,
    boundaries: Sequence[float] = (60, 120, 160),
    factor: float = 0.2,
    warmup_epochs: float = 1.0,
) -> optax.Schedule:
    """The official SFP CIFAR recipe (methods.md section 2): 0.01 for the first epoch, then 0.1,
    x0.2 at epochs 60, 120 and 160 (a shortened recipe scales ``warmup_epochs`` too)."""
    return step_schedule(steps_per_epoch, base_lr, boundaries, factor,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr)


def constant_schedule(learning_rate: float) -> optax.Schedule:
    """A constant LR (PFEC retraining: 0.001), as a float32 scalar like the other schedules."""
    value = np.float32(learning_rate)

    def schedule(count):
        del count
        return jnp.asarray(value)

    return schedule


# --------------------------------------------------------------------------------------------
# Devices: mesh, sharding, multi-host
# --------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize`` when the environment describes a multi-host run.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; all three or none must be set. Returns True if it initialised (or
    JAX already was), False for a single-process run. Call it before anything touches a
    device. Each process then feeds its own slice of every global batch (see module docstring).
    """
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = {n: os.environ[n] for n in names if os.environ.get(n)}
    if not present:
        return False
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"multi-host run needs all of {names}; missing {missing}")
    if jax.distributed.is_initialized():
        return True
    try:
        num, pid = int(present["JAX_NUM_PROCESSES"]), int(present["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                         f"{present['JAX_NUM_PROCESSES']!r}, {present['JAX_PROCESS_ID']!r}") from None
    if not 0 <= pid < num:
        raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    jax.distributed.initialize(coordinator_address=present["JAX_COORDINATOR_ADDRESS"],
                               num_processes=num, process_id=pid)
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over ``devices`` (default: all devices, all hosts)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devs, dtype=object), (DATA_AXIS,))


def _check_batch(mesh: Mesh, local_batch: int) -> None:
    n_local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    if local_batch % max(n_local, 1):
        if jax.process_count() == 1:
            raise ValueError(f"batch size {local_batch} is not divisible by the {mesh.size} devices "
                             "of the mesh; use a multiple of the device count")
        raise ValueError(f"process-local batch size {local_batch} is not divisible by this "
                         f"process's {n_local} devices of the mesh")


def shard_batch(mesh: Mesh, images: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
    """Places a batch on the mesh, split along its leading axis (``P('data')``).

    ``images``/``labels`` are this process's rows of the global batch (the whole batch in a
    single-process run); the global array is assembled with
    ``jax.make_array_from_process_local_data``. Raises ValueError if the batch does not split
    evenly over the devices.
    """
    _check_batch(mesh, int(np.shape(images)[0]))
    if np.shape(labels)[0] != np.shape(images)[0]:
        raise ValueError(f"images and labels disagree on the batch size: {np.shape(images)[0]} "
                         f"vs {np.shape(labels)[0]}")
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    if jax.process_count() == 1:
        return jax.device_put((images, labels), sharding)
    return (jax.make_array_from_process_local_data(sharding, np.asarray(images)),
            jax.make_array_from_process_local_data(sharding, np.asarray(labels)))


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Puts every leaf of ``tree`` fully replicated on the mesh (``P()``)."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def _process_rows(global_batch: int) -> slice:
    """This process's rows of a global batch (devices are ordered by process in the mesh)."""
    n = jax.process_count()
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} is not divisible by the {n} processes")
    local = global_batch // n
    return slice(jax.process_index() * local, (jax.process_index() + 1) * local)


# --------------------------------------------------------------------------------------------
# State and the train step
# --------------------------------------------------------------------------------------------


def _call_kwargs(model: Any, train: bool) -> dict:
    import inspect

    return {"train": train} if "train" in inspect.signature(model.__call__).parameters else {}


@functools.partial(jax.jit, static_argnums=0)
def _init_variables(model: Any, rng: jax.Array, x: jax.Array) -> Any:
    return model.init(rng, x, **_call_kwargs(model, False))


def create_train_state(model: Any, graph: Any, rng: jax.Array, sample_input: Any,
                       optimizer: optax.GradientTransformation, *, mesh: Mesh | None = None
                       ) -> TrainState:
    """A fresh `TrainState`: initialised variables, ``masks`` and ``hard`` all ones, no method state.

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
        variables = jax.jit(functools.partial(model.init, **_call_kwargs(model, False)))(init_rng, x)
    variables = dict(variables)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    masks = init_masks(graph) if graph is not None else {}
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        masks=masks,
        hard=dict(masks),
        method_state={},
        rng=state_rng,
    )
    return replicate(mesh, state) if mesh is not None else state


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``[B]`` of integer labels, computed in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, *, model: Any,
               graph: Any, optimizer: optax.GradientTransformation, method: Any, ctx: Any,
               augment: Augment | None = None, mask_hard: bool = True
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step (pure; `make_train_step` jits and shards it).

    ``images [B, H, W, C]`` (uint8 with ``augment``, else already preprocessed floats),
    ``labels int [B]``. The loss is the mean cross-entropy plus
    ``method.penalty(params, batch_stats, method_state, ctx)``, differentiated with respect
    to ``params`` only (the batch statistics and the method state are constants of the step).
    With ``mask_hard`` (and a graph), hard-pruned channels (``state.hard == 0``) get a zero
    update, are re-zeroed after the update, and lose their optimizer moments and BN running
    statistics, so they stay exactly zero whatever momentum and weight decay do; soft-pruned
    channels (``masks == 0``, ``hard == 1``) are trained like any other.

    Returns the new state and the metrics ``loss`` (cross-entropy), ``accuracy`` (top-1),
    ``penalty`` and the penalty's own metrics.
    """
    rng, aug_rng = jax.random.split(state.rng)
    if augment is not None:
        x = augment(aug_rng, images)
    elif not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images of dtype {images.dtype} need augment= (e.g. "
                        "functools.partial(data.augment_batch, mean=..., std=...))")
    else:
        x = images
    kwargs = _call_kwargs(model, True)
    has_bn = bool(jax.tree.leaves(state.batch_stats))

    def loss_fn(params):
        variables = {"params": params}
        if has_bn:
            variables["batch_stats"] = state.batch_stats
            logits, updated = model.apply(variables, x, mutable=["batch_stats"], **kwargs)
            new_bs = updated["batch_stats"]
        else:
            logits, new_bs = model.apply(variables, x, **kwargs), state.batch_stats
        ce = jnp.mean(cross_entropy(logits, labels))
        penalty, pen_metrics = method.penalty(params, state.batch_stats, state.method_state, ctx)
        penalty = jnp.asarray(penalty, jnp.float32)
        return ce + penalty, (ce, penalty, pen_metrics, logits, new_bs)

    grads, (ce, penalty, pen_metrics, logits, new_bs) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    masking = mask_hard and graph is not None and bool(state.hard)
    if masking:
        updates = apply_masks(updates, state.hard, graph, prefix=("params",))
    params = optax.apply_updates(state.params, updates)
    if masking:
        params = apply_masks(params, state.hard, graph, prefix=("params",))
        opt_state = mask_optimizer_state(opt_state, state.hard, graph)
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
                    method: Any, ctx: Any, *, mesh: Mesh | None = None,
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
    # A one-step lax.scan, so that the program is the loop body `make_train_chunk` runs: XLA
    # compiles a loop body differently from straight-line code (last-bit differences otherwise).
    def fn(big, small, images, labels):
        def body(state, batch):
            return train_step(state, *batch, model=model, graph=graph, optimizer=optimizer,
                              method=method, ctx=ctx, augment=augment, mask_hard=mask_hard)

        state, metrics = jax.lax.scan(body, TrainState(*big, *small), (images[None], labels[None]))
        return state, jax.tree.map(lambda v: v[0], metrics)

    jitted = jax.jit(fn, in_shardings=(repl, repl, batch, batch), out_shardings=(repl, repl),
                     donate_argnums=(0,) if donate else ())

    def step(state: TrainState, images: Any, labels: Any):
        if not (isinstance(images, jax.Array) and isinstance(labels, jax.Array)):
            images, labels = shard_batch(mesh, images, labels)
        else:
            _check_batch(mesh, images.shape[0] // jax.process_count())
        big = (state.step, state.params, state.batch_stats, state.opt_state)
        small = (state.masks, state.hard, state.method_state, state.rng)
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


def put_replicated(mesh: Mesh, *arrays: Any) -> tuple[jax.Array, ...]:
    """Host arrays placed once on every device of ``mesh`` (explicit transfers; every process
    passes the same full arrays)."""
    return tuple(replicate(mesh, np.asarray(a)) for a in arrays)


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
                     method: Any, ctx: Any, *, steps: int, mesh: Mesh | None = None,
                     augment: Augment | None = None, donate: bool = False,
                     runs: int = 0) -> Callable:
    """``steps`` train steps in one jitted call over data that already lives on the devices.

    ``chunk(state, images, labels, order, start) -> (state, metrics, start + steps)``:
    ``images``/``labels`` are the whole training set on the devices (`put_replicated`),
    ``order`` the epoch's ``int32 [steps_per_epoch, batch]`` batch indices on the devices
    (`jaxprune.data.epoch_batches`), ``start`` an int32 device scalar, the first row of
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
                              method=method, ctx=ctx, augment=augment)

        if runs:
            rows = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(order, start, steps, axis=1), 0, 1)
            body = jax.vmap(one)
        else:
            rows = jax.lax.dynamic_slice_in_dim(order, start, steps, axis=0)
            body = one
        state, metrics = jax.lax.scan(body, TrainState(*big, *small), rows)
        return ((state.step, state.params, state.batch_stats, state.opt_state),
                (state.masks, state.hard, state.method_state, state.rng), metrics, start + steps)

    jitted = jax.jit(fn, in_shardings=(repl, repl, repl, repl, repl, repl),
                     out_shardings=(repl, repl, repl, repl),
                     donate_argnums=(0,) if donate else ())

    def chunk(state: TrainState, images: jax.Array, labels: jax.Array, order: jax.Array,
              start: jax.Array):
        big = (state.step, state.params, state.batch_stats, state.opt_state)
        small = (state.masks, state.hard, state.method_state, state.rng)
        big, small, metrics, nxt = jitted(big, small, images, labels, order, start)
        return TrainState(*big, *small), metrics, nxt

    chunk.mesh, chunk.jitted, chunk.steps = mesh, jitted, steps
    chunk.with_steps = lambda n: make_train_chunk(model, graph, optimizer, method, ctx, steps=n,
                                                  mesh=mesh, augment=augment, donate=donate,
                                                  runs=runs)
    return chunk


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def eval_step(variables: Any, images: jax.Array, labels: jax.Array, *, model: Any,
              preprocess: Preprocess | None = None) -> tuple[jax.Array, jax.Array]:
    """``(number correct, summed cross-entropy)`` of a batch; rows with ``label < 0`` are padding
    and count for nothing."""
    if preprocess is not None:
        images = preprocess(images)
    logits = model.apply(variables, images, **_call_kwargs(model, False))
    valid = labels >= 0
    ce = cross_entropy(logits, jnp.where(valid, labels, 0))
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.int32)
    return correct, jnp.sum(jnp.where(valid, ce, 0.0))


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
                 *, runs: int = 0) -> Callable[[Any, EvalData], tuple[jax.Array, jax.Array]]:
    """``fn(variables, data) -> (correct_count, loss_sum)`` over a whole `EvalData` in one
    jitted call (a ``lax.scan`` of `eval_step` over its batches; one compiled shape).
    ``variables`` replicated on ``mesh`` (default all devices). ``runs=R``: variables with a
    leading run axis (`stack_runs`), counts and sums ``[R]``."""
    mesh = make_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, P())
    batches = NamedSharding(mesh, P(None, DATA_AXIS))

    def whole(variables, images, labels):
        def body(acc, xy):
            c, l = eval_step(variables, *xy, model=model, preprocess=preprocess)
            return (acc[0] + c, acc[1] + l), None

        zero = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
        return jax.lax.scan(body, zero, (images, labels))[0]

    if runs:
        whole = jax.vmap(whole, in_axes=(0, None, None))
    jitted = jax.jit(whole, in_shardings=(repl, batches, batches), out_shardings=(repl, repl))

    def fn(variables: Any, data: EvalData):
        return jitted(variables, data.images, data.labels)

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


def evaluate(model: Any, variables: Any, images: np.ndarray | EvalData, labels: np.ndarray | None,
             batch_size: int, mesh: Mesh | None = None, preprocess: Preprocess | None = None,
             *, step: Callable | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy over a whole data set.

    ``images [N, H, W, C]`` (uint8 needs ``preprocess``, e.g.
    ``partial(data.normalize, mean=..., std=...)``) and ``labels int [N]`` host arrays, placed on
    the devices for this call; or an `EvalData` already there (``labels`` None). Every example
    counts exactly once (padding has label -1) and one batch shape is compiled. Pass ``step``
    (from `make_eval_fn`) to reuse a compiled program across calls (`fit` does); ``variables``
    must then be replicated on its mesh.
    """
    if step is not None:
        preprocess = getattr(step, "preprocess", preprocess)
    if not isinstance(images, EvalData):
        if int(np.shape(images)[0]) and preprocess is None and not np.issubdtype(
                np.asarray(images[:1]).dtype, np.floating):
            raise TypeError("integer images need preprocess= (e.g. functools.partial("
                            "data.normalize, mean=..., std=...))")
    if step is None:
        step = make_eval_fn(model, mesh, preprocess)
        variables = replicate(step.mesh, variables)
    data = images if isinstance(images, EvalData) else put_eval_data(step.mesh, images, labels, batch_size)
    correct, loss = jax.device_get(step(variables, data))
    return {"accuracy": int(correct) / data.n, "loss": float(loss) / data.n}


# --------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------


# steps dispatched ahead of the one the host waits for (keeps the device busy, bounds the queue)
IN_FLIGHT = 2


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped training at a step boundary; a mid-epoch checkpoint was saved
    and rerunning the same command resumes exactly."""


class _StopSignals:
    """Turns SIGTERM / SIGINT into a flag checked at step boundaries (main thread only). A
    repeated SIGTERM is ignored (the checkpoint is being saved); a second Ctrl-C interrupts at
    once, without a checkpoint."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:  # a second Ctrl-C: stop now, without saving
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        # a repeated SIGTERM is ignored: the checkpoint of the first one is being written

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or non-finite parameters; nothing was saved from the
    non-finite state (the last good checkpoint stays the latest)."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_finite(state: TrainState, train_metrics: Mapping[str, float], *, epoch: int) -> None:
    """Raises `DivergenceError` naming the epoch, the optimizer step and the quantity when the
    epoch's mean training loss, the params or the batch statistics are not finite."""
    step = int(jax.device_get(state.step))
    loss = train_metrics.get("loss")
    if loss is not None and not np.isfinite(loss):
        raise DivergenceError(f"training diverged: the mean training loss of epoch {epoch + 1} "
                              f"is {loss} (optimizer step {step}); lower optimizer.base_lr")
    for name, tree in (("params", state.params), ("batch statistics", state.batch_stats)):
        if not bool(_all_finite(tree)):
            raise DivergenceError(f"training diverged: the {name} hold non-finite values after "
                                  f"epoch {epoch + 1} (optimizer step {step})")


def _stack(per_step: list[dict]) -> dict[str, np.ndarray]:
    """Per-step metric dicts as one dict of ``[n]`` arrays."""
    return {k: np.asarray([m[k] for m in per_step], np.float32) for k in per_step[0]}


def _per_step(chunks: list[dict]) -> list[dict[str, float]]:
    """Chunks of stacked ``[n]`` metrics (host or device) as one float dict per step."""
    out = []
    for c in jax.device_get(chunks):
        n = len(next(iter(c.values())))
        out += [{key: float(v[j]) for key, v in c.items()} for j in range(n)]
    return out


def _mean_metrics(chunks: list[dict]) -> dict[str, float]:
    """The epoch mean of every metric over all its steps."""
    if not chunks:
        return {}
    host = jax.device_get(chunks)
    return {k: float(np.mean(np.concatenate([np.asarray(c[k], np.float64).reshape(-1) for c in host])))
            for k in host[0]}


def fit(
    model: Any,
    graph: Any,
    method: Any,
    ctx: Any,
    state: TrainState,
    optimizer: optax.GradientTransformation,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    augment: Augment | None = None,
    preprocess: Preprocess | None = None,
    checkpoint_manager: Any = None,
    metrics_writer: Callable[[dict], None] | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    eval_batch_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    run_init: bool = True,
    run_finalize: bool = True,
    steps_per_call: int = 50,
) -> tuple[TrainState, list[dict]]:
    """Trains ``epochs`` epochs and returns ``(state, history)`` (one dict per epoch).

    The training and test sets are placed on the devices once; per epoch only the batch order
    `jaxprune.data.epoch_batches(N, batch_size, seed, epoch)` (drop-last; ``int32 [steps,
    batch]``) is uploaded, and the steps run in chunks of `chunk_steps` ``(steps,
    steps_per_call)`` steps per jitted call (`make_train_chunk`: one dispatch, batches gathered
    and ``augment``-ed on the devices, metrics fetched once per chunk; the progress bar
    advances per chunk, a stop signal is honoured between chunks).

    Before the first epoch ``method.init`` runs (``run_init``). Per epoch: the chunks, then
    ``method.end_of_epoch(state, epoch, ctx)``, then `evaluate` on ``test_data`` (with
    ``preprocess``), then a checkpoint of the state with its meta (epoch, the epoch to resume
    at, metrics, history, ``config``, method name), then ``metrics_writer(record)``. After the
    last epoch ``method.finalize`` runs (``run_finalize``).

    If ``checkpoint_manager`` (`jaxprune.checkpoints.make_checkpoint_manager`) already holds a
    checkpoint, the run resumes from the latest one: the passed ``state`` (after
    ``method.init``) serves only as the structure and shape target of the restore, and training
    continues at the next epoch with the restored history. Because the batch order is a pure
    function of ``(seed, epoch)`` and the augmentation key lives in the state, a resumed run
    reproduces the uninterrupted one exactly.

    ``train_data``/``test_data`` are ``(uint8 images [N, H, W, C], int labels [N])`` host arrays.
    ``ctx.total_epochs`` must equal ``epochs``. An epoch has ``data.num_batches(N, batch_size)``
    steps (the incomplete last batch is dropped: one compiled shape, even device shards), which
    is the ``steps_per_epoch`` an LR schedule must use. Checkpoints are written
    asynchronously while the next epoch runs (Orbax commits a step only once it is complete, so
    a crash during the write leaves the previous one as the latest).
    """
    from tqdm import tqdm

    from jaxprune.checkpoints import load_preempt, restore_latest_good
    from jaxprune.data import epoch_batches, num_batches

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if getattr(ctx, "total_epochs", epochs) != epochs:
        raise ValueError(f"ctx.total_epochs={ctx.total_epochs} but fit was asked for epochs={epochs}; "
                         "the method's schedules would not line up")
    x_train, y_train = train_data
    n_train = int(np.shape(x_train)[0])
    steps_per_epoch = num_batches(n_train, batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n_train} training examples")
    mesh = make_mesh() if mesh is None else mesh
    _check_batch(mesh, batch_size // jax.process_count())
    _process_rows(batch_size)  # the global batch splits over the processes
    main_process = jax.process_index() == 0
    method_name = getattr(method, "name", type(method).__name__)
    k = chunk_steps(steps_per_epoch, steps_per_call)

    chunks = {k: make_train_chunk(model, graph, optimizer, method, ctx, steps=k, mesh=mesh,
                                  augment=augment, donate=True)}
    x_dev, y_dev = put_replicated(mesh, x_train, np.asarray(y_train).astype(np.int32))
    eval_fn = eval_data = None
    if test_data is not None:
        eval_fn = make_eval_fn(model, mesh, preprocess)
        eval_data = put_eval_data(mesh, test_data[0], test_data[1], eval_batch_size or batch_size)

    if run_init:
        state = method.init(state, ctx)
    # the steps donate their input state: work on a copy so the caller's state stays valid
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                         replicate(mesh, state))
    history: list[dict] = []
    start_epoch = 0
    if checkpoint_manager is not None and checkpoint_manager.latest_step() is not None:
        state, meta, _ = restore_latest_good(checkpoint_manager, state, mesh=mesh,
                                             warn=lambda m: print(f"warning: {m}", flush=True))
        if meta.get("method") not in (None, method_name):
            raise ValueError(f"the checkpoint in {checkpoint_manager.directory} was written by method "
                             f"{meta.get('method')!r}, not {method_name!r}")
        start_epoch = int(meta["next_epoch"])
        history = list(meta.get("history", []))
        if metrics_writer is not None and hasattr(metrics_writer, "rebuild"):
            metrics_writer.rebuild(history)  # the checkpoint's history is the truth
        if main_process and progress:
            print(f"resuming from {checkpoint_manager.directory} at epoch {start_epoch}")

    resume_step, carried = 0, []
    preempt_dir = None if checkpoint_manager is None else Path(str(checkpoint_manager.directory))
    if preempt_dir is not None:
        pre = load_preempt(preempt_dir, state)
        if pre is not None and int(pre[1]["epoch"]) >= start_epoch:
            state, pmeta = replicate(mesh, pre[0]), pre[1]
            start_epoch, resume_step = int(pmeta["epoch"]), int(pmeta["resume_step"])
            carried, history = list(pmeta["step_metrics"]), list(pmeta["history"])
            if main_process and progress:
                print(f"resuming a preempted epoch {start_epoch + 1} at step {resume_step}")

    stop = _StopSignals()
    with stop:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            order = replicate(mesh, epoch_batches(n_train, batch_size, seed, epoch).astype(np.int32))
            first = resume_step if epoch == start_epoch else 0
            pos = replicate(mesh, np.int32(first))
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (progress and main_process), leave=False, dynamic_ncols=True)
            # the epoch's per-step metrics, in chunks of stacked [n] arrays (host or device)
            step_metrics = [_stack(carried)] if epoch == start_epoch and carried else []
            # the images never leave the devices: an implicit host transfer in here is a bug
            with jax.transfer_guard_host_to_device("disallow"):
                state, i = _run_steps(chunks, k, first, steps_per_epoch, state, x_dev, y_dev,
                                      order, pos, step_metrics, bar, stop)
            bar.close()
            if i < steps_per_epoch:  # stopped by a signal between chunks
                _preempt(stop.received, checkpoint_manager, state, epoch, i, step_metrics, history)
            state, history = _end_epoch(
                state, history, step_metrics, epoch, t0, method=method, ctx=ctx, mesh=mesh,
                eval_fn=eval_fn, eval_data=eval_data,
                checkpoint_manager=checkpoint_manager, config=config,
                method_name=method_name, metrics_writer=metrics_writer,
                show=progress and main_process, epochs=epochs)
            if stop.received and epoch + 1 < epochs:
                saved = "no checkpoint manager: nothing was saved"
                if checkpoint_manager is not None:  # still ignoring a repeated SIGTERM
                    checkpoint_manager.wait_until_finished()
                    saved = "its checkpoint was saved"
                raise Preempted(f"stopped by {stop.received} at the end of epoch {epoch + 1}; "
                                f"{saved}; rerun the same command to resume")

    if checkpoint_manager is not None:
        checkpoint_manager.wait_until_finished()
        if history:
            from jaxprune.checkpoints import clear_preempt

            clear_preempt(preempt_dir)  # superseded by the committed epoch checkpoint
    if run_finalize:
        state = replicate(mesh, method.finalize(state, ctx))
    return state, history


def _run_steps(chunks: dict, k: int, i: int, steps_per_epoch: int, state: TrainState,
               x_dev, y_dev, order, pos, step_metrics: list, bar, stop) -> tuple[TrainState, int]:
    """Runs the epoch's steps from ``i`` in chunks of ``k`` (``chunks[k]``; single steps until a
    resume off the chunk grid is back on it), appending each chunk's metrics to
    ``step_metrics``; returns early (at a chunk boundary) when a stop signal arrived. Returns
    the state and the next step."""
    while i < steps_per_epoch:
        n = k if i % k == 0 else 1
        if n not in chunks:
            chunks[n] = chunks[k].with_steps(n)
        state, m, pos = chunks[n](state, x_dev, y_dev, order, pos)
        step_metrics.append(m)
        i += n
        if len(step_metrics) > IN_FLIGHT:  # bound the dispatch queue: a stop (or a save)
            done = jax.device_get(step_metrics[-1 - IN_FLIGHT])  # waits <= 2 chunks
            step_metrics[-1 - IN_FLIGHT] = done
            bar.set_postfix(loss=f"{float(np.mean(done['loss'])):.3f}",
                            acc=f"{float(np.mean(done['accuracy'])):.3f}")
        bar.update(n)
        if stop.received:
            break
    return state, i


def _preempt(signal_name: str, manager: Any, state: TrainState, epoch: int,
             resume_step: int, step_metrics: list, history: list) -> None:
    """Saves the mid-epoch checkpoint (process 0) once the last epoch checkpoint is committed,
    and raises `Preempted`."""
    from jaxprune.checkpoints import save_preempt

    where = f"epoch {epoch + 1}, step {resume_step}"
    if manager is None:
        saved = "no checkpoint manager: nothing was saved"
    else:
        manager.wait_until_finished()
        preempt_dir = Path(str(manager.directory))
        if jax.process_index() == 0:
            save_preempt(preempt_dir, state, {
                "epoch": epoch, "resume_step": resume_step, "history": history,
                "step_metrics": _per_step(step_metrics)})
        saved = f"a checkpoint of {where} was saved"
    raise Preempted(f"stopped by {signal_name} at {where}; {saved}; rerun the same command to resume")


def _end_epoch(state, history, step_metrics, epoch, t0, *, method, ctx, mesh, eval_fn,
               eval_data, checkpoint_manager, config, method_name, metrics_writer, show, epochs):
    """End of an epoch: finiteness check, the method's re-selection, evaluation, an
    asynchronous checkpoint (which supersedes a preempted one once committed), metrics."""
    from jaxprune.checkpoints import save_checkpoint

    train = _mean_metrics(step_metrics)
    check_finite(state, train, epoch=epoch)  # before anything is saved from this state
    state = replicate(mesh, method.end_of_epoch(state, epoch, ctx))
    record: dict[str, Any] = {"epoch": epoch, "step": int(jax.device_get(state.step))}
    record.update({f"train_{k}": v for k, v in train.items()})
    if eval_fn is not None:
        ev = evaluate(None, state.variables, eval_data, None, 0, step=eval_fn)
        record.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
    record["epoch_time_s"] = time.perf_counter() - t0
    history = history + [record]
    if checkpoint_manager is not None:
        # the next steps donate the state's buffers: the asynchronous write gets its own copy
        snapshot = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        save_checkpoint(checkpoint_manager, snapshot, epoch=epoch, metrics=record,
                        history=history, config=config, method=method_name)
    if metrics_writer is not None:
        metrics_writer(record)
    if show:
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        print(f"epoch {epoch + 1}/{epochs} {shown}")
    return state, history


__all__ = [
    "TrainState",
    "make_optimizer",
    "step_schedule",
    "sfp_cifar_schedule",
    "constant_schedule",
    "maybe_initialize_distributed",
    "make_mesh",
    "shard_batch",
    "replicate",
    "create_train_state",
    "cross_entropy",
    "train_step",
    "make_train_step",
    "chunk_steps",
    "put_replicated",
    "make_train_chunk",
    "stack_runs",
    "unstack_runs",
    "eval_step",
    "EvalData",
    "put_eval_data",
    "make_eval_fn",
    "evaluate",
    "eval_batch_size",
    "check_finite",
    "DivergenceError",
    "Preempted",
    "fit",
]
