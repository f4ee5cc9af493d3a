"""The training loop: `fit` runs a method's epochs over a data set on the devices, with
evaluation, asynchronous checkpoints, automatic resume, preemption and a divergence guard.

The pieces it is built from live in their own modules: `jaxprune.optim` (optimizer, LR
schedules), `jaxprune.parallel` (mesh, sharding, multi-host), `jaxprune.train_step` (the train
state, the jitted step and the multi-step chunk), `jaxprune.evaluation` (whole-set device
evaluation); `jaxprune.checkpoints` writes and restores the state. See design.md section 7.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxprune import train_step as _ts
from jaxprune.evaluation import Preprocess, is_stream, evaluate, make_eval_fn, put_eval_data
from jaxprune.parallel import (check_batch, device_label, process_rows, make_mesh, put_replicated,
                               replicate, shard_batch)
from jaxprune.pruner import Pruner
from jaxprune.train_step import Augment, TrainState, chunk_steps


# steps dispatched ahead of the one the host waits for (keeps the device busy, bounds the queue)
IN_FLIGHT = 2


class Preempted(RuntimeError):
    """SIGTERM or SIGINT stopped training at a step boundary; a mid-epoch checkpoint was saved
    and rerunning the same command resumes exactly."""


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C during training: stopped at once, without a checkpoint of the epoch."""


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
            raise SecondInterrupt
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
                              f"is {loss}; stopped after epoch {epoch + 1} (optimizer step {step}); "
                              "lower optimizer.base_lr")
    for name, tree in (("params", state.params), ("batch statistics", state.batch_stats)):
        if not bool(_all_finite(tree)):
            raise DivergenceError(f"training diverged: the {name} hold non-finite values after "
                                  f"epoch {epoch + 1} (optimizer step {step})")


def auto_steps_per_call() -> int:
    """The default chunk size: 50 steps per device call on accelerators; 1 on CPU, where XLA runs
    the convolutions of a rolled loop body far slower than straight-line code (BENCHMARKS.md)."""
    return 1 if jax.default_backend() == "cpu" else 50


def _stack(per_step: list[dict]) -> dict[str, np.ndarray]:
    """Per-step metric dicts as one dict of ``[n]`` arrays."""
    return {k: np.asarray([m[k] for m in per_step], np.float32) for k in per_step[0]}


def _per_step(chunks: list[dict]) -> list[dict[str, float]]:
    """Chunks of stacked ``[n]`` metrics (host or device) as one float dict per step."""
    out = []
    for c in jax.device_get(chunks):
        c = {key: np.reshape(v, -1) for key, v in c.items()}  # a single step's are scalars
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


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How `fit` trains: everything but the model, pruner, state, optimizer and data.

    Attributes:
      epochs: epochs to train (>= 1; equals the pruner's ``total_epochs``).
      batch_size: the global batch (every step; the incomplete last batch is dropped).
      seed: the batch order is ``epoch_batches(N, batch_size, seed, epoch)``.
      augment: ``augment(rng, uint8 images) -> float images`` on the devices (None: cast).
      preprocess: the evaluation's normalisation (None: cast).
      checkpoint_manager: `jaxprune.checkpoints.make_checkpoint_manager`'s manager (None: no
        checkpoints, no resume).
      metrics_writer: called with each epoch's record (its ``rebuild(history)``, if any, on
        resume).
      progress: a progress bar and one line per epoch.
      mesh: the data-parallel mesh (None: `jaxprune.parallel.make_mesh`).
      eval_batch_size: evaluation batch (None: ``batch_size``).
      config: JSON-safe config recorded with each checkpoint (the resume reference).
      run_init: run ``pruner.init`` before the first epoch.
      run_finalize: run ``pruner.finalize`` after the last epoch.
      steps_per_call: steps per jitted call (None: `auto_steps_per_call`).
      method_name: recorded with each checkpoint; a checkpoint of another method is refused.
    """

    epochs: int
    batch_size: int
    seed: int = 0
    augment: Augment | None = None
    preprocess: Preprocess | None = None
    checkpoint_manager: Any = None
    metrics_writer: Callable[[dict], None] | None = None
    progress: bool = True
    mesh: Mesh | None = None
    eval_batch_size: int | None = None
    config: Mapping[str, Any] | None = None
    run_init: bool = True
    run_finalize: bool = True
    steps_per_call: int | None = None
    method_name: str | None = None


def fit(
    model: Any,
    graph: Any,
    pruner: Pruner,
    state: TrainState,
    optimizer: optax.GradientTransformation,
    train_data: Any,
    test_data: Any,
    options: FitOptions,
) -> tuple[TrainState, list[dict]]:
    """Trains ``options.epochs`` epochs and returns ``(state, history)`` (one dict per epoch).

    Example::

        state, history = fit(model, graph, pruner, state, optimizer, (x, y), (xt, yt),
                             FitOptions(epochs=2, batch_size=128, progress=False))

    The names below are `FitOptions` fields.

    The training and test sets are placed on the devices once; per epoch only the batch order
    `jaxprune.batching.epoch_batches(N, batch_size, seed, epoch)` (drop-last; ``int32 [steps,
    batch]``) is uploaded, and the steps run in chunks of `chunk_steps` ``(steps,
    steps_per_call)`` steps per jitted call (None: `auto_steps_per_call`) (`make_train_chunk`: one dispatch, batches gathered
    and ``augment``-ed on the devices, metrics fetched once per chunk; the progress bar
    advances per chunk, a stop signal is honoured between chunks).

    ``pruner`` is the method as a `jaxprune.pruner.Pruner` built for ``epochs`` epochs
    (``method.pruner(graph, epochs, steps_per_epoch)``). Before the first epoch
    ``pruner.init`` runs (``run_init``; `prune_init`). Per epoch: the chunks, then
    ``pruner.update`` (`prune_update`: the re-selection after ``state.prune.count`` epochs),
    then `evaluate` on ``test_data`` (with ``preprocess``), then a checkpoint of the state with
    its meta (epoch, the epoch to resume at, metrics, history, ``config``, ``method_name``),
    then ``metrics_writer(record)``. After the last epoch ``pruner.finalize`` runs
    (``run_finalize``). A checkpoint written by another ``method_name`` is refused.

    If ``checkpoint_manager`` (`jaxprune.checkpoints.make_checkpoint_manager`) already holds a
    checkpoint, the run resumes from the latest one: the passed ``state`` (after
    ``pruner.init``) serves only as the structure and shape target of the restore, and training
    continues at the next epoch with the restored history. Because the batch order is a pure
    function of ``(seed, epoch)`` and the augmentation key lives in the state, a resumed run
    reproduces the uninterrupted one exactly.

    ``train_data``/``test_data`` are ``(uint8 images [N, H, W, C], int labels [N])`` host arrays,
    or streams of batches too large to hold on the devices (`jaxprune.imagenet.ImagenetStream`:
    ``len()`` batches of ``batch_size`` per epoch, ``for_epoch(e)``, ``iter_from(k)``). A
    streamed epoch runs `make_train_step` on each batch as it arrives (the stream decodes the
    next batches on host threads meanwhile, and the step is dispatched asynchronously); its
    ``augment`` gets the stream's already-augmented uint8 images (pass the normalisation). The
    data position is the step: a preempted epoch resumes with ``iter_from(step)``, reading
    exactly the remaining batches. A streamed ``test_data`` is evaluated batch by batch.
    An epoch has ``batching.num_batches(N, batch_size)``
    steps (the incomplete last batch is dropped: one compiled shape, even device shards), which
    is the ``steps_per_epoch`` an LR schedule must use. Checkpoints are written
    asynchronously while the next epoch runs (Orbax commits a step only once it is complete, so
    a crash during the write leaves the previous one as the latest).
    """
    from tqdm import tqdm

    from jaxprune.checkpoints import first_line, load_preempt, restore_latest_good, set_aside_preempt
    from jaxprune.batching import epoch_batches, num_batches

    epochs, batch_size, seed = options.epochs, options.batch_size, options.seed
    augment, preprocess, mesh = options.augment, options.preprocess, options.mesh
    checkpoint_manager, metrics_writer = options.checkpoint_manager, options.metrics_writer
    progress, eval_batch_size, config = options.progress, options.eval_batch_size, options.config
    run_init, run_finalize, steps_per_call = options.run_init, options.run_finalize, options.steps_per_call
    method_name = options.method_name
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if getattr(pruner, "total_epochs", None) not in (None, epochs):
        raise ValueError(f"the pruner was built for total_epochs={pruner.total_epochs} but fit was "
                         f"asked for epochs={epochs}; the method's schedules would not line up")
    streamed = is_stream(train_data)
    if streamed:
        if train_data.batch_size != batch_size:
            raise ValueError(f"the training stream yields batches of {train_data.batch_size}, "
                             f"but fit was asked for batch_size={batch_size}")
        n_train, steps_per_epoch = int(train_data.num_examples), len(train_data)
    else:
        x_train, y_train = train_data
        n_train = int(np.shape(x_train)[0])
        steps_per_epoch = num_batches(n_train, batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n_train} training examples")
    mesh = make_mesh() if mesh is None else mesh
    check_batch(mesh, batch_size // jax.process_count())
    process_rows(batch_size)  # the global batch splits over the processes
    main_process = jax.process_index() == 0
    k = chunk_steps(steps_per_epoch, auto_steps_per_call() if steps_per_call is None else steps_per_call)

    if streamed:
        step_fn = _ts.make_train_step(model, graph, optimizer, pruner, mesh=mesh,
                                      augment=augment, donate=True)
    else:
        chunks = {k: _ts.make_train_chunk(model, graph, optimizer, pruner, steps=k, mesh=mesh,
                                          augment=augment, donate=True)}
        x_dev, y_dev = put_replicated(mesh, x_train, np.asarray(y_train).astype(np.int32))
    eval_fn = eval_data = None
    if test_data is not None:
        eval_fn = make_eval_fn(model, mesh, preprocess, graph=graph)
        eval_data = test_data if is_stream(test_data) else put_eval_data(
            mesh, test_data[0], test_data[1], eval_batch_size or batch_size)

    if run_init:
        state = _ts.prune_init(pruner, state)
    # the steps donate their input state: work on a copy so the caller's state stays valid
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x,
                         replicate(mesh, state))
    history: list[dict] = []
    start_epoch = 0
    if checkpoint_manager is not None and checkpoint_manager.latest_step() is not None:
        state, meta, _ = restore_latest_good(checkpoint_manager, state, mesh=mesh,
                                             warn=lambda m: print(f"warning: {m}", flush=True))
        if method_name is not None and meta.get("method") not in (None, method_name):
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
        try:
            pre = load_preempt(preempt_dir, state, steps_per_epoch=steps_per_epoch)
        except Exception as e:  # noqa: BLE001 - damaged, truncated or edited: like a bad step
            moved = set_aside_preempt(preempt_dir)
            print(f"warning: the preempted checkpoint {preempt_dir / 'preempt'} is unreadable "
                  f"({type(e).__name__}: {first_line(e)}); set aside as {moved.name if moved else '-'}"
                  f"; resuming from epoch {start_epoch}", flush=True)
            pre = None
        if pre is not None and int(pre[1]["epoch"]) >= start_epoch:
            state, pmeta = replicate(mesh, pre[0]), pre[1]
            start_epoch, resume_step = int(pmeta["epoch"]), int(pmeta["resume_step"])
            carried, history = list(pmeta["step_metrics"]), list(pmeta["history"])
            if main_process and progress:
                print(f"resuming a preempted epoch {start_epoch + 1} at step {resume_step}")
    if checkpoint_manager is not None and hasattr(checkpoint_manager, "apply_retention"):
        checkpoint_manager.apply_retention()  # steps a kill before Orbax's clean-up left behind

    stop = _StopSignals()
    timer_stopped = None  # when the previous epoch's `epoch_time_s` ended
    with stop:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            between = None if timer_stopped is None else t0 - timer_stopped
            first = resume_step if epoch == start_epoch else 0
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not (progress and main_process and sys.stderr.isatty()),
                       leave=False, dynamic_ncols=True)  # no carriage-return frames in log files
            # the epoch's per-step metrics, in chunks of stacked [n] arrays (host or device)
            step_metrics = [_stack(carried)] if epoch == start_epoch and carried else []
            # resident data never leaves the devices and a streamed batch is placed explicitly:
            # an implicit host transfer in here is a bug
            if streamed:
                with jax.transfer_guard_host_to_device("disallow"):
                    state, i = _run_stream(step_fn, train_data.for_epoch(epoch), first, state,
                                           step_metrics, bar, stop)
            else:
                order = replicate(mesh, epoch_batches(n_train, batch_size, seed, epoch).astype(np.int32))
                pos = replicate(mesh, np.int32(first))
                with jax.transfer_guard_host_to_device("disallow"):
                    state, i = _run_steps(chunks, k, first, steps_per_epoch, state, x_dev, y_dev,
                                          order, pos, step_metrics, bar, stop)
            bar.close()
            if i < steps_per_epoch:  # stopped by a signal between chunks
                _preempt(stop.received, checkpoint_manager, state, epoch, i, step_metrics, history,
                         config)
            state, history = _end_epoch(
                state, history, step_metrics, epoch, t0, pruner=pruner, graph=graph, mesh=mesh,
                eval_fn=eval_fn, eval_data=eval_data,
                checkpoint_manager=checkpoint_manager, config=config,
                method_name=method_name, metrics_writer=metrics_writer,
                show=progress and main_process, epochs=epochs, between=between)
            timer_stopped = t0 + history[-1]["epoch_time_s"]
            if stop.received:  # the last epoch too: what follows it (compaction) is skipped
                saved = "no checkpoint manager: nothing was saved"
                if checkpoint_manager is not None:  # still ignoring a repeated SIGTERM
                    checkpoint_manager.wait_until_finished()
                    saved = "its checkpoint was saved"
                rest = "resume" if epoch + 1 < epochs else "finish the run"
                raise Preempted(f"stopped by {stop.received} at the end of epoch {epoch + 1}; "
                                f"{saved}; rerun the same command to {rest}")

    if checkpoint_manager is not None:
        checkpoint_manager.wait_until_finished()
        if history:
            from jaxprune.checkpoints import clear_preempt

            clear_preempt(preempt_dir)  # superseded by the committed epoch checkpoint
    if run_finalize:
        state = replicate(mesh, _ts.prune_finalize(pruner, state))
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
        i += n
        _dispatched(step_metrics, m, bar, n)
        if stop.received:
            break
    return state, i


def _run_stream(step: Callable, stream: Any, i: int, state: TrainState, step_metrics: list,
                bar, stop) -> tuple[TrainState, int]:
    """Runs an epoch of a batch stream from batch ``i``, one `make_train_step` call per batch
    (this process's rows of it, placed on the mesh); returns early when a stop signal arrived.
    Returns the state and the next step."""
    rows = process_rows(stream.batch_size)
    for b in stream.iter_from(i):
        images, labels = shard_batch(step.mesh, b["image"][rows], b["label"][rows])
        state, m = step(state, images, labels)
        i += 1
        _dispatched(step_metrics, m, bar, 1)
        if stop.received:
            break
    return state, i


def _dispatched(step_metrics: list, metrics: dict, bar, steps: int) -> None:
    """Books a dispatched call's metrics and bounds the dispatch queue: a stop (or a save) then
    waits for at most `IN_FLIGHT` calls."""
    step_metrics.append(metrics)
    if len(step_metrics) > IN_FLIGHT:
        done = jax.device_get(step_metrics[-1 - IN_FLIGHT])
        step_metrics[-1 - IN_FLIGHT] = done
        bar.set_postfix(loss=f"{float(np.mean(done['loss'])):.3f}",
                        acc=f"{float(np.mean(done['accuracy'])):.3f}")
    bar.update(steps)


def _preempt(signal_name: str, manager: Any, state: TrainState, epoch: int,
             resume_step: int, step_metrics: list, history: list,
             config: Mapping[str, Any] | None = None) -> None:
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
                "step_metrics": _per_step(step_metrics),
                "config": dict(config) if config is not None else None})
        saved = f"a checkpoint of {where} was saved"
    raise Preempted(f"stopped by {signal_name} at {where}; {saved}; rerun the same command to resume")


# the keys of an epoch record that are wall-clock times (they differ between identical runs)
TIMING_KEYS = ("epoch_time_s", "between_epochs_s")


def _end_epoch(state, history, step_metrics, epoch, t0, *, pruner, graph, mesh, eval_fn,
               eval_data, checkpoint_manager, config, method_name, metrics_writer, show, epochs,
               between=None):
    """End of an epoch: finiteness check, the method's re-selection, evaluation, an
    asynchronous checkpoint (which supersedes a preempted one once committed), metrics.

    The record's `TIMING_KEYS`: ``epoch_time_s`` (training, re-selection and evaluation) and,
    from a run's (or resumed run's) second epoch on, ``between_epochs_s`` (``between``: from
    the previous epoch's timer stop to this epoch's start, the previous checkpoint save and
    records)."""
    from jaxprune.checkpoints import save_checkpoint

    train = _mean_metrics(step_metrics)
    check_finite(state, train, epoch=epoch)  # before anything is saved from this state
    done = int(jax.device_get(state.prune.count))
    if done != epoch:  # the re-selection reads the epoch from the count
        raise ValueError(f"the pruning state counts {done} epochs done at the end of epoch "
                         f"{epoch}; expected {epoch}")
    state = replicate(mesh, _ts.prune_update(pruner, state))
    record: dict[str, Any] = {"epoch": epoch, "step": int(jax.device_get(state.step))}
    record.update({f"train_{k}": v for k, v in train.items()})
    if eval_fn is not None:
        normalised = graph is not None and bool(graph.normalised)
        ev = evaluate(None, state.variables, eval_data, None, 0, step=eval_fn,
                      masks=state.masks if normalised else None)
        record.update(test_accuracy=ev["accuracy"], test_top5=ev["top5"], test_loss=ev["loss"])
    record["epoch_time_s"] = time.perf_counter() - t0
    if between is not None:
        record["between_epochs_s"] = between
    record["device"] = device_label()  # a run may resume elsewhere (GPU window, then CPU)
    history = history + [record]
    if checkpoint_manager is not None:
        # the next steps donate the state's buffers: the asynchronous write gets its own copy
        snapshot = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
        save_checkpoint(checkpoint_manager, snapshot, epoch=epoch, metrics=record,
                        history=history, config=config, method=method_name)
    if metrics_writer is not None:
        metrics_writer(record)
    if show:
        print(epoch_line(record, epochs, kept_channels(state.masks)), flush=True)
    return state, history


def kept_channels(masks: Any) -> tuple[int, int]:
    """``(kept, total)`` channels over every group of ``masks`` (a mask entry > 0 is kept)."""
    leaves = [np.asarray(jax.device_get(m)) for m in jax.tree.leaves(masks)]
    return int(sum(int(np.sum(m > 0)) for m in leaves)), int(sum(m.size for m in leaves))


def epoch_line(record: dict, epochs: int, kept: tuple[int, int] | None = None) -> str:
    """The one human line printed per epoch: epoch, train loss and accuracy, test accuracy,
    kept channels (``(kept, total)``; omitted when None or no channel is prunable) and time."""
    parts = [f"epoch {record['epoch'] + 1}/{epochs}"]
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.4f}")
    if "train_accuracy" in record:
        parts.append(f"train acc {record['train_accuracy']:.4f}")
    if "test_accuracy" in record:
        parts.append(f"test acc {record['test_accuracy']:.4f}")
    if kept is not None and kept[1]:
        parts.append(f"kept {kept[0]}/{kept[1]} channels")
    parts.append(f"{record.get('epoch_time_s', 0.0):.1f} s")
    return "  ".join(parts)


__all__ = ["fit", "FitOptions", "TIMING_KEYS", "check_finite", "auto_steps_per_call", "DivergenceError",
           "Preempted", "SecondInterrupt"]
