"""One experiment from a config, end to end: data -> model -> groups -> method -> train ->
final masks -> compaction -> checks -> saved compact model and a result record.

`setup` builds what a config names (`jaxprune.factories`), `run` trains and `finish`
compacts. `run(config, workdir)` is what ``jaxprune train`` and the experiments runner call;
the resume policy is `jaxprune.resume`, the metrics log `jaxprune.metrics_log`, pretrained
starts `jaxprune.pretrained`, the other commands `jaxprune.commands`. Every artefact lands in
``workdir``::

    workdir/checkpoints/   Orbax steps (one per epoch; resumed automatically)
    workdir/metrics.jsonl  one JSON line per epoch (also TensorBoard events in workdir/tb/)
    workdir/compact/       the compact model (`jaxprune.load(workdir + '/compact')`)
    workdir/result.json    the result record (accuracies dense-arch masked / compact, costs)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxprune import config as config_lib
from jaxprune import data as data_lib
from jaxprune import augment as augment_lib
from jaxprune import evaluation, flops, optim, parallel, train_step, training
from jaxprune.compaction import compact
from jaxprune.factories import (fit_sets, for_compaction, is_bundled, load_dataset, make_method,
                                make_model, make_schedule, own_model_method, soft_methods,
                                test_set)
from jaxprune.files import write_text_atomic
from jaxprune.graph import trace_linen
from jaxprune.imagenet import StreamedDataset
from jaxprune.masks import apply_masks, binarize
from jaxprune.methods.base import final_roles
from jaxprune.metrics_log import MetricsWriter, as_finetune_epoch
from jaxprune.pretrained import baseline_provenance, load_trained, with_pretrained_normalization
from jaxprune.pruner import Pruner
from jaxprune.resume import check_resume, check_workdir, undo_refused_start


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config builds before training: everything `run` and the CLI commands share."""

    config: ml_collections.ConfigDict
    dataset: data_lib.Dataset
    model: Any
    variables: Any
    graph: Any
    optimizer: Any
    method: Any
    pruner: Pruner  # ``method.pruner(graph, config.epochs, steps_per_epoch)``
    # (dense, pruned) costs of the original architecture when ``model`` is already the compact
    # one (`compact_for_retraining`); None: computed from ``graph`` and the final masks
    reference_costs: tuple[dict, dict] | None = None


RETRAIN_MODEL = "retrain_model"  # the compact model a compact_before_retraining run retrains


def compact_for_retraining(s: Setup, pruned: train_step.TrainState
                           ) -> tuple[Setup, train_step.TrainState, Any]:
    """PFEC's retraining of the physically smaller model, in memory: ``pruned`` is the state
    after the pruner's ``init`` (one-shot pruning), `compact` removes the pruned filters, and
    `retraining_setup` retrains that model with no masks. Returns ``(setup, state, compacted)`` (``compacted``: the
    `jaxprune.compaction.CompactResult`, whose model a run saves as ``workdir/retrain_model``
    for `jaxprune compact` and `jaxprune eval`)."""
    masks = binarize(pruned.masks)
    res = compact(s.model, pruned.variables, masks, s.graph)
    small, fresh = retraining_setup(s, res.model, res.variables,
                                    (costs(s.graph), costs(s.graph, masks)))
    return small, fresh, res


def retraining_setup(s: Setup, model: Any, variables: Any, reference_costs: tuple[dict, dict]
                     ) -> tuple[Setup, train_step.TrainState]:
    """The setup that retrains the compact ``model`` with no masks (method ``dense``: nothing is
    pruned any more) from a fresh train state with the same RNG, starting at ``variables``, so it
    computes what retraining the masked model computes, up to float rounding (tested).
    ``reference_costs``: ``(dense, pruned)`` costs of the original architecture, so that the
    record compares with the dense model."""
    from jaxprune.methods import get_method

    x = jnp.zeros((1,) + s.dataset.image_shape, jnp.float32)
    graph = trace_linen(model, variables, x, residual=s.config.method.residual)
    dense = get_method("dense")
    small = dataclasses.replace(s, model=model, variables=variables, graph=graph, method=dense,
                                pruner=dense.pruner(graph, s.config.epochs),
                                reference_costs=reference_costs)
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(s.config.seed), x,
                                          s.optimizer)
    fresh = fresh.replace(params=jax.tree.map(jnp.asarray, variables["params"]),
                          batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})))
    return small, train_step.prune_init(small.pruner, fresh)


def save_retrain_model(s: Setup, compacted: Any, workdir: Path) -> None:
    """Saves the compact starting model of a ``compact_before_retraining`` run once, to
    ``workdir/retrain_model`` (with the original architecture's costs): `jaxprune compact` and
    `jaxprune eval` rebuild the retrained model from it."""
    from jaxprune.artifact import save_compact

    where = workdir / RETRAIN_MODEL
    if where.is_dir():
        return
    dense, pruned = s.reference_costs
    save_compact(where, compacted.model, compacted.variables, {
        "input_shape": list(s.dataset.image_shape), "method": s.config.method.name,
        "dense": dense, "compact": pruned})


def setup(config: ml_collections.ConfigDict, data: data_lib.Dataset | None = None,
          model: Any = None) -> Setup:
    """Validates ``config`` and builds data, model, graph, optimizer and method.

    ``data``: a `jaxprune.data.Dataset` to use instead of ``config.dataset``; ``model``: a
    model object of the user's own instead of ``config.model`` (see `make_model`)."""
    config_lib.validate(config)
    ds = data if data is not None else load_dataset(config)
    model = make_model(config, ds.num_classes, model)
    x = jnp.zeros((1,) + ds.image_shape, jnp.float32)
    variables = model.init(jax.random.PRNGKey(config.seed), x, train=False)
    graph = trace_linen(model, variables, x, residual=config.method.residual)
    if config.batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{jax.device_count()} devices; use a multiple of {jax.device_count()}")
    steps = ds.num_train // config.batch_size
    if steps == 0:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the {ds.num_train} training images")
    o = config.optimizer
    optimizer = optim.make_optimizer(make_schedule(config, steps), momentum=o.momentum,
                                        nesterov=o.nesterov, weight_decay=o.weight_decay)
    method = make_method(config)
    if not is_bundled(model):
        method = own_model_method(method, config)
    pruner = method.pruner(graph, config.epochs, steps)
    return Setup(config, ds, model, variables, graph, optimizer, method, pruner)


def costs(graph, masks=None) -> dict[str, int]:
    """MACs in both conventions and params of the model under ``masks`` (None: dense)."""
    conv = flops.count(graph, masks, convention="conv")
    conv_fc = flops.count(graph, masks, convention="conv_fc")
    return {"macs_conv": conv.macs, "macs_conv_fc": conv_fc.macs, "params": conv.params}


def _initial_params(s: Setup, state: train_step.TrainState) -> tuple[train_step.TrainState, dict]:
    """Starts from the weights of ``config.pretrained`` (see `load_trained`) if set; returns the
    state and where its weights came from (`load_trained`'s ``weights_from``; {} when unset).

    Only params and batch stats are taken (a fresh optimizer, masks and step), so the
    pretrained run may have used another method or residual policy.
    """
    path = s.config.pretrained
    if not path:
        return state, {}
    _, restored, weights_from = load_trained(path)
    from jaxprune.tree_io import check_shapes

    check_shapes(restored["params"], state.params, what=f"pretrained params of {path!r}")
    check_shapes(restored["batch_stats"], state.batch_stats, what=f"pretrained batch stats of {path!r}")
    put = lambda t, like: jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), t, like)  # noqa: E731
    return state.replace(params=put(restored["params"], state.params),
                         batch_stats=put(restored["batch_stats"], state.batch_stats)), weights_from


def _record_start(s: Setup, state: train_step.TrainState, pruned: train_step.TrainState,
                  workdir: Path, weights_from: dict) -> dict:
    """``workdir/start.json``: test accuracy of the pretrained weights (``state``) and of the
    same weights right after the pruner's ``init`` (``pruned``; PFEC: pruned, not yet
    retrained), and which checkpoint of the pretrained run they are (``weights_from``, see
    `load_trained`), written once."""
    path = workdir / "start.json"
    if path.is_file():
        return json.loads(path.read_text())
    ds = s.dataset
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    ev = lambda v: evaluation.evaluate(s.model, v, *test_set(ds), s.config.eval_batch_size,  # noqa: E731
                                     preprocess=preprocess)["accuracy"]
    masks = binarize(pruned.masks)
    rec = {"pretrained_accuracy": ev(state.variables),
           "after_init_accuracy": ev(apply_masks(pruned.variables, masks, s.graph,
                                                 roles=final_roles(s.method))),
           "after_init_costs": costs(s.graph, masks), "dense_costs": costs(s.graph),
           "test_images": int(ds.num_test), "weights_from": weights_from}
    write_text_atomic(path, json.dumps(rec, indent=2))
    return rec


def _fit_phase(s: Setup, state: train_step.TrainState, pruner: Pruner, method_name: str,
               optimizer: optax.GradientTransformation, *, epochs: int, seed: int, ckpt_dir: Path,
               writer, augment, preprocess, progress: bool) -> tuple[train_step.TrainState, list[dict]]:
    """One `training.fit` phase of a run with its own Orbax checkpoints in ``ckpt_dir``;
    ``state`` is already after ``pruner.init`` (`train_step.prune_init`)."""
    from jaxprune.checkpoints import make_checkpoint_manager

    c, ds = s.config, s.dataset
    manager = make_checkpoint_manager(ckpt_dir, max_to_keep=c.keep_checkpoints, async_save=True)
    try:
        return training.fit(
            s.model, s.graph, pruner, state, optimizer,
            *fit_sets(ds), training.FitOptions(
                epochs=epochs, batch_size=c.batch_size, seed=seed,
                augment=augment, preprocess=preprocess, checkpoint_manager=manager,
                metrics_writer=writer, progress=progress, eval_batch_size=c.eval_batch_size,
                config=c.to_dict(), run_init=False, method_name=method_name,
                steps_per_call=None if c.steps_per_call == -1 else c.steps_per_call))
    finally:
        manager.close()


def finetune(s: Setup, state: train_step.TrainState, workdir: Path, augment, preprocess, *,
             progress: bool = True) -> tuple[train_step.TrainState, list[dict]]:
    """``config.finetune_epochs`` epochs at the constant LR ``config.finetune_lr`` with the final
    hard masks fixed (`jaxprune.methods.FixedMasks`), from fresh optimizer moments; its own
    checkpoints (``workdir/checkpoints_finetune``) so an interrupted fine-tuning resumes too.
    Epochs are logged after the main run's (``epoch`` continues counting, ``phase='finetune'``)."""
    c = s.config
    o = c.optimizer
    optimizer = optim.make_optimizer(optax.constant_schedule(c.finetune_lr), momentum=o.momentum,
                                        nesterov=o.nesterov, weight_decay=o.weight_decay)
    state = state.replace(opt_state=optimizer.init(state.params))
    pruner, state = finetune_start(s, state)
    relabel = functools.partial(as_finetune_epoch, main_epochs=c.epochs)
    writer = MetricsWriter(workdir, phase="finetune", relabel=relabel)
    state, history = _fit_phase(s, state, pruner, "finetune", optimizer, epochs=c.finetune_epochs,
                                seed=c.seed + 1, ckpt_dir=workdir / "checkpoints_finetune",
                                writer=writer, augment=augment,
                                preprocess=preprocess, progress=progress)
    return state, [relabel(r) for r in history]


def finetune_start(s: Setup, state: train_step.TrainState) -> tuple[Pruner, train_step.TrainState]:
    """The fine-tuning phase's pruner (`jaxprune.methods.FixedMasks` of the final masks) and
    ``state`` after its ``init``."""
    from jaxprune.methods import FixedMasks

    pruner = FixedMasks(state.masks, state.hard).pruner(s.graph, s.config.finetune_epochs)
    return pruner, train_step.prune_init(pruner, state)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, progress: bool = True,
        model: Any = None, data: data_lib.Dataset | None = None,
        allow_schedule_change: bool = False) -> dict:
    """Trains/prunes/compacts as ``config`` says; returns (and writes) the result record.

    ``model``: a model of your own instead of ``config.model`` (a Linen module or NNX model
    instance, or a class / factory called with ``config.model_kwargs``; ``config.model`` may
    also name one by import path, ``"my_package.models:make_net"``). It is traced
    (`jaxprune.graph.trace`), pruned and compacted through its traced program; the saved
    compact model loads without its code (`jaxprune.load`). ``data``: a
    `jaxprune.data.Dataset` instead of ``config.dataset``.

    Everything that can be checked (config, the run directory's usability, the compatibility
    of a run already there, pretrained weights) is checked before anything is written."""
    from jaxprune.runlock import RunLock
    from jaxprune.user_models import import_path_of

    t0 = time.time()
    if model is not None:  # recorded as the class's import path
        config = ml_collections.ConfigDict(config.to_dict())
        config.model = import_path_of(model)
    parallel.maybe_initialize_distributed()
    config = with_pretrained_normalization(config)
    workdir = Path(workdir)
    check_workdir(workdir)
    # one writer per run directory (process 0 of a multi-host run writes its files)
    lock = RunLock(workdir) if jax.process_index() == 0 else None
    try:
        if lock is not None:
            lock.acquire()  # an existing directory: before its records are read
        return _run(config, workdir, lock, t0, progress=progress, model=model, data=data,
                    allow_schedule_change=allow_schedule_change)
    finally:
        if lock is not None:
            lock.release()


def _run(config: ml_collections.ConfigDict, workdir: Path, lock: Any, t0: float, *,
         progress: bool, model: Any, data: Any, allow_schedule_change: bool) -> dict:
    """`run` once the run directory is locked."""
    changes = check_resume(workdir, config, allow_schedule_change=allow_schedule_change,
                           weights_digest_of=lambda path: load_trained(path)[2]["sha256"])
    s = setup(config, data, model)
    ds = s.dataset
    x = jnp.zeros((1,) + ds.image_shape, jnp.float32)
    state = train_step.create_train_state(s.model, s.graph, jax.random.PRNGKey(config.seed), x, s.optimizer)
    state, weights_from = _initial_params(s, state)
    # everything checkable is checked: only now is the run directory written
    created = not workdir.exists()
    before = {n: (workdir / n).read_bytes() if (workdir / n).is_file() else None
              for n in ("config.json", "config_changes.jsonl")}
    workdir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
        lock.acquire()  # a new directory: as soon as it exists
    try:
        return _train_and_finish(s, state, config, workdir, changes, t0, progress=progress,
                                 weights_from=weights_from)
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        undo_refused_start(workdir, created, before)
        raise


def _train_and_finish(s: Setup, state: train_step.TrainState, config: ml_collections.ConfigDict,
                      workdir: Path, changes: dict, t0: float, *, progress: bool,
                      weights_from: dict) -> dict:
    """The writing part of `run`: records, training phases, compaction, result."""
    ds = s.dataset
    if changes:
        with open(workdir / "config_changes.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}) + "\n")
    write_text_atomic(workdir / "config.json", json.dumps(config.to_dict(), indent=2, default=list))
    pruned = train_step.prune_init(s.pruner, state)  # the method's one init of the run
    if config.pretrained:
        _record_start(s, state, pruned, workdir, weights_from)
    state = pruned
    if config.compact_before_retraining:
        s, state, compacted = compact_for_retraining(s, state)
        save_retrain_model(s, compacted, workdir)
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    if isinstance(ds, StreamedDataset):  # the stream crops and flips on the host
        augment = lambda rng, images: preprocess(images)  # noqa: E731
    else:
        augment_flag = config.dataset in ("cifar10", "cifar100")
        augment = functools.partial(augment_lib.augment_batch, mean=ds.mean, std=ds.std,
                                    flip=augment_flag, pad=4 if augment_flag else 0,
                                    cutout_length=config.cutout)
    state, history = _fit_phase(s, state, s.pruner, s.method.name, s.optimizer, epochs=config.epochs,
                                seed=config.seed, ckpt_dir=workdir / "checkpoints",
                                writer=MetricsWriter(workdir), augment=augment,
                                preprocess=preprocess, progress=progress)
    if config.finetune_epochs and config.method.name != "dense":
        state, tuned = finetune(s, state, workdir, augment, preprocess, progress=progress)
        history = history + tuned
    record = finish(s, state, workdir, preprocess, history=history)
    record["wall_time_s"] = round(time.time() - t0, 1)
    write_text_atomic(workdir / "result.json", json.dumps(record, indent=2))
    return record


def trained_on(history: list) -> dict[str, int]:
    """Epochs trained per device (`jaxprune.parallel.device_label`) from a run's epoch records,
    in the order first seen; a run resumed on another machine lists both. Epochs recorded
    before the records named their device count under ``'unrecorded'``."""
    out: dict[str, int] = {}
    for rec in history:
        key = str(rec.get("device", "unrecorded")) if isinstance(rec, dict) else "unrecorded"
        out[key] = out.get(key, 0) + 1
    return out


def finish(s: Setup, state: train_step.TrainState, workdir: Path, preprocess, *,
           history: list | None = None, save: bool = True, which: str = "final",
           compact_dir: str = "compact") -> dict:
    """Final masks -> compaction -> accuracy check (compact == masked) -> saved compact model
    (``workdir/compact_dir``). The final masks must be hard (`check_hard_masks`)."""
    from jaxprune.artifact import save_compact
    from jaxprune.masks import check_hard_masks

    ds = s.dataset
    check_hard_masks(state.masks, what="the final masks")
    masks = binarize(state.masks)
    variables = state.variables
    roles = final_roles(s.method)
    masked_vars = apply_masks(variables, masks, s.graph, roles=roles)
    ev = lambda m, v: evaluation.evaluate(m, v, *test_set(ds), s.config.eval_batch_size,  # noqa: E731
                                        preprocess=preprocess)
    masked = ev(s.model, masked_vars)
    # SFP's official final model keeps the BN constants of its pruned channels: carry them
    sample = jax.random.normal(jax.random.PRNGKey(0), (2,) + tuple(ds.image_shape), jnp.float32)
    res = compact(for_compaction(s.model), variables, masks, s.graph,
                  keep_constants=roles is not None, sample_input=sample)
    small = ev(res.model, res.variables)
    # The compact model must predict exactly like the masked one (same correct count). In
    # bfloat16 compute the narrower convs round differently (a few near-tie images flip), so
    # the exactness check then runs both models in float32; the record keeps both accuracies.
    check = (masked, small)
    if jnp.dtype(s.config.dtype) != jnp.float32:
        f32 = lambda m: m.clone(dtype=jnp.float32)  # noqa: E731
        check = (ev(f32(s.model), masked_vars), ev(f32(res.model), res.variables))
    if abs(check[1]["accuracy"] - check[0]["accuracy"]) * ds.num_test > 0.5:
        raise AssertionError(f"compact accuracy {check[1]['accuracy']:.4f} != masked accuracy "
                             f"{check[0]['accuracy']:.4f} (float32): compaction bug")
    dense_cost, pruned_cost = s.reference_costs or (costs(s.graph), costs(s.graph, masks))
    record = {
        "name": s.config.name,
        "model": s.config.model,
        "dataset": s.config.dataset,
        "method": s.config.method.name,
        "rate": s.config.method.rate,
        "residual": s.config.method.residual,
        "seed": s.config.seed,
        "epochs": s.config.epochs,
        "finetune_epochs": s.config.finetune_epochs,
        "masked_accuracy": masked["accuracy"],
        "compact_accuracy": small["accuracy"],
        "masked_top5": masked["top5"],
        "compaction_check": {"dtype": "float32", "masked_accuracy": check[0]["accuracy"],
                             "compact_accuracy": check[1]["accuracy"]},
        "compact_top5": small["top5"],
        "best_accuracy": max([h.get("test_accuracy", 0.0) for h in history or []] or [masked["accuracy"]]),
        "dense": dense_cost,
        "compact": pruned_cost,
        "macs_reduction_conv": 1 - pruned_cost["macs_conv"] / dense_cost["macs_conv"],
        "macs_reduction_conv_fc": 1 - pruned_cost["macs_conv_fc"] / dense_cost["macs_conv_fc"],
        "params_reduction": 1 - pruned_cost["params"] / dense_cost["params"],
        "widths": {k: len(v) for k, v in res.keep_out.items()},
        "device": parallel.device_label(),  # where this record was made (compaction, evaluation)
        "trained_on": trained_on(history or []),
        "host": platform.node(),
        "paper": s.config.paper.to_dict(),
        "normalization": {"mean": list(ds.mean), "std": list(ds.std)},
        "width_policy": {"round_to": int(s.config.method.get("round_to", 1)),
                         "direction": s.config.method.get("round_direction", "up"),
                         "latency_table": s.config.method.get("width_table", "")},
        # which weights this record (and the compact model) comes from: 'final' or 'best'; with
        # 'best' the epoch whose state it is has optimizer step ``optimizer_step``
        "from_state": {"which": which, "optimizer_step": int(jax.device_get(state.step)),
                       "epochs_done": len(history or [])},
    }
    if s.config.pretrained:
        record["baseline"] = baseline_provenance(s.config.pretrained)
        if (workdir / "start.json").is_file():
            record["start"] = json.loads((workdir / "start.json").read_text())
    if (is_bundled(s.model) and s.config.model.startswith("resnet")
            and s.config.method.name in soft_methods()):
        depth = int(s.config.model[len("resnet"):])
        if (depth - 2) % 6 == 0:
            record["sfp_formula_macs_reduction"] = flops.sfp_formula_reduction(depth, 1 - s.config.method.rate)
    if save:
        meta = {k: record[k] for k in ("method", "rate", "residual", "dense", "compact",
                                        "masked_accuracy", "compact_accuracy", "dataset")}
        meta["input_shape"] = list(ds.image_shape)
        meta["test_subset"] = int(s.config.test_subset)
        meta["mean"], meta["std"] = list(ds.mean), list(ds.std)
        save_compact(workdir / compact_dir, res.model, res.variables, meta, overwrite=True)
    return record


# ----------------------------------------------------------------------------- CLI helpers


