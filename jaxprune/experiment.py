"""One experiment from a config, end to end: data -> model -> groups -> method -> train ->
final masks -> compaction -> checks -> saved compact model and a result record.

`run(config, workdir)` is what ``jaxprune train`` and the experiments runner call. Every
artefact lands in ``workdir``::

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
import numpy as np
import optax

from jaxprune import config as config_lib
from jaxprune import data as data_lib
from jaxprune import augment as augment_lib
from jaxprune import evaluation, flops, optim, parallel, train_step, training
from jaxprune.compaction import compact
from jaxprune.files import append_text, naming_writes, write_text_atomic
from jaxprune.graph import trace_linen
from jaxprune.imagenet import StreamedDataset, load_imagenet
from jaxprune.masks import apply_masks, binarize
from jaxprune.methods.base import MethodContext, final_roles
from jaxprune.models import get_model


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
    ctx: MethodContext
    # (dense, pruned) costs of the original architecture when ``model`` is already the compact
    # one (`compact_for_retraining`); None: computed from ``graph`` and the final masks
    reference_costs: tuple[dict, dict] | None = None


RETRAIN_MODEL = "retrain_model"  # the compact model a compact_before_retraining run retrains


def compact_for_retraining(s: Setup, state: train_step.TrainState, workdir: Path
                           ) -> tuple[Setup, train_step.TrainState]:
    """PFEC's retraining of the physically smaller model: ``s.method.init`` prunes (one shot),
    `compact` removes the pruned filters, and the returned setup retrains that model with no
    masks (method ``dense``: nothing is pruned any more) from a fresh train state with the same
    RNG, so it computes what retraining the masked model computes, up to float rounding (tested).
    The compact starting model is saved once to ``workdir/retrain_model`` (and reused on resume,
    by `jaxprune compact` and `jaxprune eval`); the costs of the original architecture go along
    so that the record compares with the dense model."""
    from jaxprune.checkpoints import load, save_compact
    from jaxprune.methods import get_method

    x = jnp.zeros((1,) + s.dataset.image_shape, jnp.float32)
    where = workdir / RETRAIN_MODEL
    if not where.is_dir():
        pruned = s.method.init(state, s.ctx)
        masks = binarize(pruned.masks)
        res = compact(s.model, pruned.variables, masks, s.graph)
        save_compact(where, res.model, res.variables, {
            "input_shape": list(s.dataset.image_shape), "method": s.config.method.name,
            "dense": costs(s.graph), "compact": costs(s.graph, masks)})
    model, variables, meta = load(where)
    graph = trace_linen(model, variables, x, residual=s.config.method.residual)
    ctx = MethodContext(graph=graph, total_epochs=s.ctx.total_epochs,
                        steps_per_epoch=s.ctx.steps_per_epoch)
    small = dataclasses.replace(s, model=model, variables=variables, graph=graph,
                                method=get_method("dense"), ctx=ctx,
                                reference_costs=(meta["dense"], meta["compact"]))
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(s.config.seed), x,
                                          s.optimizer)
    fresh = fresh.replace(params=jax.tree.map(jnp.asarray, variables["params"]),
                          batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})))
    return small, fresh


def load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset | StreamedDataset:
    """The config's data set: in-memory arrays (CIFAR, digits) or streams (ImageNet); optionally
    a subset, for smoke runs."""
    if config.dataset == "digits":
        ds = data_lib.load_digits_dataset(image_size=config.image_size or 16, seed=config.seed)
    elif config.dataset in ("cifar10", "cifar100"):
        ds = data_lib.load_cifar(config.dataset, config.data_dir or None)
    elif config.dataset == "imagenet2012":
        ds = load_imagenet(config.batch_size, config.eval_batch_size,
                           image_size=config.image_size or 224, seed=config.seed,
                           data_dir=config.data_dir or None, train_subset=config.train_subset,
                           test_subset=config.test_subset)
    else:
        raise ValueError(f"config.dataset={config.dataset!r}: expected cifar10, cifar100, digits "
                         "or imagenet2012")
    if tuple(config.mean):
        if len(config.mean) != len(ds.mean):
            raise ValueError(f"config.mean={tuple(config.mean)!r} has {len(config.mean)} values; "
                             f"{config.dataset} images have {len(ds.mean)} channels")
        ds = dataclasses.replace(ds, mean=tuple(config.mean), std=tuple(config.std))
    if isinstance(ds, StreamedDataset):
        return ds
    if config.train_subset or config.test_subset:
        n_tr = config.train_subset or ds.num_train
        n_te = config.test_subset or ds.num_test
        ds = dataclasses.replace(ds, x_train=ds.x_train[:n_tr], y_train=ds.y_train[:n_tr],
                                 x_test=ds.x_test[:n_te], y_test=ds.y_test[:n_te])
    return ds


def _fit_sets(ds: data_lib.Dataset | StreamedDataset) -> tuple[Any, Any]:
    """The training and test sets as `training.fit` takes them: host arrays or streams."""
    if isinstance(ds, StreamedDataset):
        return ds.train, ds.test
    return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)


def _test_set(ds: data_lib.Dataset | StreamedDataset) -> tuple[Any, Any]:
    """``(images, labels)`` of the test set as `evaluation.evaluate` takes them (a stream and
    None for a streamed data set)."""
    return (ds.test, None) if isinstance(ds, StreamedDataset) else (ds.x_test, ds.y_test)


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The LR schedule the config names (per optimizer step)."""
    o = config.optimizer
    if o.schedule == "sfp_cifar":
        return optim.sfp_cifar_schedule(steps_per_epoch, base_lr=o.base_lr, warmup_lr=o.warmup_lr,
                                           boundaries=tuple(o.boundaries), factor=o.factor,
                                           warmup_epochs=float(o.get("warmup_epochs", 1.0)))
    if o.schedule == "step":
        return optim.step_schedule(steps_per_epoch, base_lr=o.base_lr,
                                      boundaries=tuple(o.boundaries), factor=o.factor)
    if o.schedule == "cosine":
        import optax

        return optax.cosine_decay_schedule(o.base_lr, max(1, config.epochs * steps_per_epoch))
    return optim.constant_schedule(o.base_lr)


def make_method(config: ml_collections.ConfigDict):
    """The pruning method the config names."""
    from jaxprune.methods import get_method

    m = config.method
    kwargs = dict(m.kwargs.to_dict()) if m.kwargs else {}
    round_to, direction = int(m.get("round_to", 1)), m.get("round_direction", "up")
    table = m.get("width_table", "")
    if round_to != 1 or table:
        if m.name not in ("sfp", "asfp", "srfp", "asrfp", "ghfp", "pfec", "hfp"):
            what = f"round_to={round_to}" if round_to != 1 else f"width_table={table!r}"
            raise ValueError(f"config.method.{what}: method {m.name!r} does not take a "
                             "width policy (sfp, asfp, srfp, asrfp, ghfp, pfec and hfp do)")
        from jaxprune.width_bench import load_table

        kwargs["width"] = {"round_to": round_to, "direction": direction,
                           "latency": load_table(table) if table else None}
    return get_method(m.name, rate=m.rate, criterion=m.criterion, exclude=tuple(m.exclude), **kwargs)


def make_model(config: ml_collections.ConfigDict, num_classes: int, model: Any = None) -> Any:
    """The config's model: a bundled one by name, or a model of the user's own
    (`jaxprune.user_models.build_model`): ``model`` (an object) if given, else the import
    path ``config.model`` with ``config.model_kwargs``. An NNX model comes back as a
    `jaxprune.user_models.NNXModel`."""
    from jaxprune.user_models import build_model

    if model is None and not is_own_model(config):
        return get_model(config.model, num_classes=num_classes, dtype=jnp.dtype(config.dtype))
    if config.dtype != "float32":
        raise ValueError(f"config.dtype={config.dtype!r} is not allowed for a model of your own; "
                         "expected 'float32' (set the compute dtype in the model itself)")
    if config.compact_before_retraining:
        raise ValueError("config.compact_before_retraining=True is not allowed for a model of "
                         "your own; expected False (it retrains a bundled model's compact form)")
    kwargs = config.get("model_kwargs")
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs or {})
    return build_model(model if model is not None else config.model, kwargs,
                       num_classes=num_classes, seed=config.seed)


def is_own_model(config: ml_collections.ConfigDict) -> bool:
    """True when ``config.model`` is an import path (a model of the user's own)."""
    from jaxprune.user_models import is_import_path

    return is_import_path(config.model)


def _is_bundled(model: Any) -> bool:
    return hasattr(model, "keep_out")


def _for_compaction(model: Any) -> Any:
    """What `jaxprune.compaction.compact` takes for ``model`` (an NNX model in eval mode)."""
    from jaxprune.user_models import NNXModel

    return model.eval_module() if isinstance(model, NNXModel) else model


def _own_model_method(method: Any, config: ml_collections.ConfigDict) -> Any:
    """A method whose final model keeps pruned channels' BN constants (SFP's official
    ``final_bn='keep'``) needs a bundled model to carry them; a model of the user's own is
    compacted from its program, so its final model zeroes them (``final_bn='zero'``) unless
    the config asks for 'keep' (then refused)."""
    if final_roles(method) is None:
        return method
    asked = (config.method.kwargs.to_dict() if config.method.kwargs else {}).get("final_bn")
    if asked is None and dataclasses.is_dataclass(method) and hasattr(method, "final_bn"):
        return dataclasses.replace(method, final_bn="zero")
    raise ValueError(f"config.method.kwargs.final_bn={asked!r} is not allowed for a model of "
                     "your own; expected 'zero' (keeping pruned channels' BN constants needs a "
                     "bundled model)")


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
    if not _is_bundled(model):
        method = _own_model_method(method, config)
    ctx = MethodContext(graph=graph, total_epochs=config.epochs, steps_per_epoch=steps)
    return Setup(config, ds, model, variables, graph, optimizer, method, ctx)


def costs(graph, masks=None) -> dict[str, int]:
    """MACs in both conventions and params of the model under ``masks`` (None: dense)."""
    conv = flops.count(graph, masks, convention="conv")
    conv_fc = flops.count(graph, masks, convention="conv_fc")
    return {"macs_conv": conv.macs, "macs_conv_fc": conv_fc.macs, "params": conv.params}


class _MetricsWriter:
    """Appends each epoch record to metrics.jsonl and TensorBoard (process 0 only).

    ``phase``: None for the main training phase, ``'finetune'`` for the fine-tuning phase
    (whose records are renumbered by ``relabel``). `rebuild` rewrites this phase's lines from a
    checkpoint's history (on resume), so an epoch whose checkpoint committed but whose line was
    lost to a kill is never missing, and none is duplicated."""

    def __init__(self, workdir: Path, phase: str | None = None, relabel=None):
        self.path = workdir / "metrics.jsonl"
        self.phase, self.relabel = phase, relabel or (lambda r: r)
        self.tb = None
        if jax.process_index() != 0:
            return
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            pass

    def __call__(self, record: dict) -> None:
        if jax.process_index() != 0:
            return
        record = self.relabel(record)
        append_text(self.path, json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("epoch", 0)) + 1
            with naming_writes(self.path.parent / "tb"):
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()

    def rebuild(self, history: list[dict]) -> None:
        """Rewrites metrics.jsonl: this phase's lines become ``history`` (atomically)."""
        if jax.process_index() != 0:
            return
        others = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                if rec.get("phase") != self.phase:
                    others.append(line)
        mine = [json.dumps(self.relabel(h)) for h in history]
        lines = mine + others if self.phase is None else others + mine
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))


def _pretrained_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.name == "checkpoints":
        p = p.parent
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"config.pretrained={str(path)!r} is not a run directory (no config.json); give a "
            "directory written by `jaxprune train` / `jaxprune import`")
    return p


def load_trained(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """``(config, variables, weights_from)`` of a trained model directory: a run directory (its
    newest readable training checkpoint) or a directory written by ``jaxprune import`` (its
    dense ``compact/`` model). ``weights_from`` says which: ``{'checkpoint_step': k,
    'newest_step': n}`` (``k < n``: it fell back past a damaged step) or ``{'compact': dir}``."""
    from jaxprune.checkpoints import check_weights, load

    p = _pretrained_dir(path)
    cfg = ml_collections.ConfigDict(config_lib.with_defaults(json.loads((p / "config.json").read_text())))
    ckpts = p / "checkpoints"
    if ckpts.is_dir() and any(c.name.isdigit() for c in ckpts.iterdir()):
        _, state, _, step, newest = restore_run(p)  # its weights are checked as they are restored
        return (cfg, {"params": state.params, "batch_stats": state.batch_stats},
                {"checkpoint_step": int(step), "newest_step": int(newest)})
    if (p / "compact").is_dir():
        model, variables, _ = load(p / "compact")
        if getattr(model, "keep_out", None):
            raise ValueError(f"{str(p)!r} holds a pruned (compact) model; a pretrained start needs "
                             "the dense weights")
        check_weights(variables, what=f"the trained model in {str(p / 'compact')!r}")
        return cfg, variables, {"compact": str(p / "compact")}
    raise FileNotFoundError(f"{str(p)!r} holds neither a training checkpoint nor a compact model")


def with_pretrained_normalization(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``mean``/``std`` taken from ``config.pretrained``'s recorded config when
    unset (weights need the normalisation they were trained with); otherwise unchanged."""
    if tuple(config.mean) or not config.pretrained:
        return config
    cfg = json.loads((_pretrained_dir(config.pretrained) / "config.json").read_text())
    if not cfg.get("mean"):
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.mean, config.std = tuple(cfg["mean"]), tuple(cfg["std"])
    return config


def baseline_provenance(path: str | os.PathLike) -> dict:
    """Where a pretrained start came from: imported weights (``import.json``) or a jaxprune run
    (its schedule: epochs, training subset, LR schedule, and whether it finished)."""
    p = _pretrained_dir(path)
    if (p / "import.json").is_file():
        return {"kind": "imported", "dir": str(p), **json.loads((p / "import.json").read_text())}
    cfg = json.loads((p / "config.json").read_text())
    rec = {"kind": "run", "dir": str(p), "name": cfg.get("name"), "epochs": cfg.get("epochs"),
           "train_subset": cfg.get("train_subset", 0),
           "schedule": (cfg.get("optimizer") or {}).get("schedule")}
    if (p / "result.json").is_file():
        res = json.loads((p / "result.json").read_text())
        rec["accuracy"] = res.get("compact_accuracy")
    return rec


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
    from jaxprune.checkpoints import check_shapes

    check_shapes(restored["params"], state.params, what=f"pretrained params of {path!r}")
    check_shapes(restored["batch_stats"], state.batch_stats, what=f"pretrained batch stats of {path!r}")
    put = lambda t, like: jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), t, like)  # noqa: E731
    return state.replace(params=put(restored["params"], state.params),
                         batch_stats=put(restored["batch_stats"], state.batch_stats)), weights_from


def _record_start(s: Setup, state: train_step.TrainState, workdir: Path, weights_from: dict) -> dict:
    """``workdir/start.json``: test accuracy of the pretrained weights and of the same weights
    right after the method's ``init`` (PFEC: pruned, not yet retrained), and which checkpoint
    of the pretrained run they are (``weights_from``, see `load_trained`), written once."""
    path = workdir / "start.json"
    if path.is_file():
        return json.loads(path.read_text())
    ds = s.dataset
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    ev = lambda v: evaluation.evaluate(s.model, v, *_test_set(ds), s.config.eval_batch_size,  # noqa: E731
                                     preprocess=preprocess)["accuracy"]
    pruned = s.method.init(state, s.ctx)
    masks = binarize(pruned.masks)
    rec = {"pretrained_accuracy": ev(state.variables),
           "after_init_accuracy": ev(apply_masks(pruned.variables, masks, s.graph,
                                                 roles=final_roles(s.method))),
           "after_init_costs": costs(s.graph, masks), "dense_costs": costs(s.graph),
           "test_images": int(ds.num_test), "weights_from": weights_from}
    write_text_atomic(path, json.dumps(rec, indent=2))
    return rec


def _fit_phase(s: Setup, state: train_step.TrainState, method: Any, ctx: MethodContext,
               optimizer: optax.GradientTransformation, *, epochs: int, seed: int, ckpt_dir: Path,
               writer, augment, preprocess, progress: bool) -> tuple[train_step.TrainState, list[dict]]:
    """One `training.fit` phase of a run with its own Orbax checkpoints in ``ckpt_dir``."""
    from jaxprune.checkpoints import make_checkpoint_manager

    c, ds = s.config, s.dataset
    manager = make_checkpoint_manager(ckpt_dir, max_to_keep=c.keep_checkpoints, async_save=True)
    try:
        return training.fit(
            s.model, s.graph, method, ctx, state, optimizer,
            *_fit_sets(ds),
            epochs=epochs, batch_size=c.batch_size, seed=seed,
            augment=augment, preprocess=preprocess, checkpoint_manager=manager,
            metrics_writer=writer, progress=progress, eval_batch_size=c.eval_batch_size,
            config=c.to_dict(),
            steps_per_call=None if c.steps_per_call == -1 else c.steps_per_call)
    finally:
        manager.close()


def _as_finetune_epoch(record: dict, main_epochs: int) -> dict:
    """A fine-tuning epoch's record as logged: numbered after the main run's epochs."""
    return dict(record, epoch=record["epoch"] + main_epochs, phase="finetune")


def finetune(s: Setup, state: train_step.TrainState, workdir: Path, augment, preprocess, *,
             progress: bool = True) -> tuple[train_step.TrainState, list[dict]]:
    """``config.finetune_epochs`` epochs at the constant LR ``config.finetune_lr`` with the final
    hard masks fixed (`jaxprune.methods.FixedMasks`), from fresh optimizer moments; its own
    checkpoints (``workdir/checkpoints_finetune``) so an interrupted fine-tuning resumes too.
    Epochs are logged after the main run's (``epoch`` continues counting, ``phase='finetune'``)."""
    from jaxprune.methods import FixedMasks

    c = s.config
    o = c.optimizer
    optimizer = optim.make_optimizer(optax.constant_schedule(c.finetune_lr), momentum=o.momentum,
                                        nesterov=o.nesterov, weight_decay=o.weight_decay)
    state = state.replace(opt_state=optimizer.init(state.params))
    ctx = MethodContext(graph=s.graph, total_epochs=c.finetune_epochs,
                        steps_per_epoch=s.ctx.steps_per_epoch)
    relabel = functools.partial(_as_finetune_epoch, main_epochs=c.epochs)
    writer = _MetricsWriter(workdir, phase="finetune", relabel=relabel)
    state, history = _fit_phase(s, state, FixedMasks(), ctx, optimizer, epochs=c.finetune_epochs,
                                seed=c.seed + 1, ckpt_dir=workdir / "checkpoints_finetune",
                                writer=writer, augment=augment,
                                preprocess=preprocess, progress=progress)
    return state, [relabel(r) for r in history]


# config keys a resumed run may never change (the checkpoint's structure and meaning)...
RESUME_FIXED = ("model", "model_kwargs", "dataset", "image_size", "method", "mean", "std", "pretrained", "seed", "dtype",
                "train_subset", "test_subset", "steps_per_call", "compact_before_retraining")
# ... and keys that change the schedule: refused unless allowed, then recorded
RESUME_SCHEDULE = ("epochs", "batch_size", "optimizer", "finetune_epochs", "finetune_lr")


def check_workdir(workdir: Path) -> None:
    """Raises OSError naming ``workdir`` when it cannot be a run directory (a file, under a file,
    not writable), before anything is written."""
    p = workdir.absolute()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(20, "the run directory is an existing file, not a directory", str(workdir))
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(20, f"{parent} is a file, so the run directory cannot be created",
                                 str(workdir))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(13, f"{parent} is not writable", str(workdir))


def run_config(workdir: Path) -> tuple[dict, str] | None:
    """``(config, where)`` of the run in ``workdir``: the config recorded WITH its newest
    checkpoint (`jaxprune.checkpoints.recorded_config`: what the saved state was trained
    under, whatever happened to ``config.json`` since), else ``config.json`` (checkpoints
    written without a config, or none yet), else None."""
    from jaxprune.checkpoints import recorded_config

    rec = recorded_config(workdir / "checkpoints")
    if rec is not None:
        return rec
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} holds no JSON object; the run directory is damaged")
    return old, str(path)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _changed(old: dict, new: dict, keys: tuple[str, ...]) -> dict[str, list]:
    """``{dotted key: [old, new]}`` of the leaves under ``keys`` that differ."""
    out = {}
    for k in keys:
        a, b = _flat(old.get(k), f"{k}."), _flat(new.get(k), f"{k}.")
        for leaf in list(a) + [x for x in b if x not in a]:
            if json.dumps(a.get(leaf), sort_keys=True) != json.dumps(b.get(leaf), sort_keys=True):
                out[leaf] = [a.get(leaf), b.get(leaf)]
    return out


def check_resume(workdir: Path, config: ml_collections.ConfigDict, *,
                 allow_schedule_change: bool = False) -> dict:
    """Compares ``config`` with the run already in ``workdir`` (`run_config`: the config
    recorded with its newest checkpoint, else its ``config.json``), if any.

    A change of model, data, seed, method or anything else in `RESUME_FIXED` is refused
    (ValueError naming the first key with its old and new value); a change of the schedule
    (`RESUME_SCHEDULE`) too, unless ``allow_schedule_change``. Returns ``{key: [old, new]}``
    of the allowed changes (dotted keys)."""
    ref = run_config(workdir)
    if ref is None:
        return {}
    old = config_lib.with_defaults(ref[0])
    new = config_lib.with_defaults(config.to_dict())
    fixed = _changed(old, new, RESUME_FIXED)
    if fixed:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(fixed.items())[:3])
        raise ValueError(f"{workdir} holds a run with another {', '.join(fixed)} ({shown}; recorded "
                         f"in {ref[1]}); refusing to resume it: use another --workdir")
    sched = _changed(old, new, RESUME_SCHEDULE)
    if sched and not allow_schedule_change:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(sched.items())[:3])
        raise ValueError(f"{workdir} holds a run with another schedule ({shown}; recorded in "
                         f"{ref[1]}); "
                         "pass --allow-schedule-change to resume it with the new one (recorded in "
                         "config_changes.jsonl), or use another --workdir")
    return sched


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


def _undo_refused_start(workdir: Path, created: bool, before: dict[str, bytes | None]) -> None:
    """After a refusal raised once the run directory was written but before any checkpoint
    committed: a directory this call created is removed; an existing one gets its records back
    (``config.json``, ``config_changes.jsonl``), so the corrected command is not refused too."""
    import shutil

    committed = any(p.name.isdigit() or p.name == "preempt"
                    for d in ("checkpoints", "checkpoints_finetune") if (workdir / d).is_dir()
                    for p in (workdir / d).iterdir())
    if committed:
        return
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for name, data in before.items():
        if data is None:
            (workdir / name).unlink(missing_ok=True)
        else:
            (workdir / name).write_bytes(data)


def _run(config: ml_collections.ConfigDict, workdir: Path, lock: Any, t0: float, *,
         progress: bool, model: Any, data: Any, allow_schedule_change: bool) -> dict:
    """`run` once the run directory is locked."""
    changes = check_resume(workdir, config, allow_schedule_change=allow_schedule_change)
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
        _undo_refused_start(workdir, created, before)
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
    if config.pretrained:
        _record_start(s, state, workdir, weights_from)
    if config.compact_before_retraining:
        s, state = compact_for_retraining(s, state, workdir)
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    if isinstance(ds, StreamedDataset):  # the stream crops and flips on the host
        augment = lambda rng, images: preprocess(images)  # noqa: E731
    else:
        augment_flag = config.dataset in ("cifar10", "cifar100")
        augment = functools.partial(augment_lib.augment_batch, mean=ds.mean, std=ds.std,
                                    flip=augment_flag, pad=4 if augment_flag else 0,
                                    cutout_length=config.cutout)
    state, history = _fit_phase(s, state, s.method, s.ctx, s.optimizer, epochs=config.epochs,
                                seed=config.seed, ckpt_dir=workdir / "checkpoints",
                                writer=_MetricsWriter(workdir), augment=augment,
                                preprocess=preprocess, progress=progress)
    if config.finetune_epochs and config.method.name != "dense":
        state, tuned = finetune(s, state, workdir, augment, preprocess, progress=progress)
        history = history + tuned
    record = finish(s, state, workdir, preprocess, history=history)
    record["wall_time_s"] = round(time.time() - t0, 1)
    write_text_atomic(workdir / "result.json", json.dumps(record, indent=2))
    return record


def finish(s: Setup, state: train_step.TrainState, workdir: Path, preprocess, *,
           history: list | None = None, save: bool = True, which: str = "final",
           compact_dir: str = "compact") -> dict:
    """Final masks -> compaction -> accuracy check (compact == masked) -> saved compact model
    (``workdir/compact_dir``). The final masks must be hard (`check_hard_masks`)."""
    from jaxprune.checkpoints import save_compact
    from jaxprune.masks import check_hard_masks

    ds = s.dataset
    check_hard_masks(state.masks, what="the final masks")
    masks = binarize(state.masks)
    variables = state.variables
    roles = final_roles(s.method)
    masked_vars = apply_masks(variables, masks, s.graph, roles=roles)
    ev = lambda m, v: evaluation.evaluate(m, v, *_test_set(ds), s.config.eval_batch_size,  # noqa: E731
                                        preprocess=preprocess)
    masked = ev(s.model, masked_vars)
    # SFP's official final model keeps the BN constants of its pruned channels: carry them
    sample = jax.random.normal(jax.random.PRNGKey(0), (2,) + tuple(ds.image_shape), jnp.float32)
    res = compact(_for_compaction(s.model), variables, masks, s.graph,
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
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind} x{jax.device_count()}",
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
    if (_is_bundled(s.model) and s.config.model.startswith("resnet")
            and s.config.method.name in ("sfp", "asfp", "srfp", "asrfp", "ghfp")):
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
        from jaxprune.checkpoints import load

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
    from jaxprune.checkpoints import leaf_paths

    lines = [title + " (an exported program: per-variable shapes)", "",
             f"{'variable':40s} {'shape':>20s} {'size':>12s}"]
    for path, leaf in zip(leaf_paths(variables), jax.tree.leaves(variables)):
        lines.append(f"{'/'.join(path):40s} {str(tuple(np.shape(leaf))):>20s} {int(np.size(leaf)):>12d}")
    c = meta.get("compact") or {}
    lines += ["", f"total params                       {c.get('params', '?')}",
              f"total MACs, conv only (SFP)        {c.get('macs_conv', '?')}",
              f"total MACs, conv + fc (PFEC)       {c.get('macs_conv_fc', '?')}"]
    return "\n".join(lines)


def _restore_run(run_dir: Path):
    """Setup and the latest readable training state of a run directory: ``(setup, state,
    meta)`` (see `restore_run`)."""
    s, state, meta, _, _ = restore_run(run_dir)
    return s, state, meta


def restore_run(run_dir: Path):
    """``(setup, state, meta, step, newest)`` of a run directory: the newest training
    checkpoint that reads back completely (``step``; ``newest`` is the newest step on disk, so
    ``step < newest`` means it fell back past a damaged one), built with the config recorded
    with the checkpoints (`run_config`; ``config.json`` for checkpoints written without one).
    Read-only: a damaged step is reported and skipped, never moved."""
    from jaxprune.checkpoints import make_checkpoint_manager, restore_latest_good

    run_dir = Path(run_dir)
    ref = run_config(run_dir) if run_dir.is_dir() else None
    if ref is None:
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.json and no "
                                "checkpoint with a recorded config)")
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
        # checked before anything is built, and without creating the folder
        raise FileNotFoundError(f"{str(ckpt_dir)!r} holds no checkpoint")
    cfg = ml_collections.ConfigDict(config_lib.with_defaults(ref[0]))
    s = setup(cfg)
    x = jnp.zeros((1,) + s.dataset.image_shape, jnp.float32)
    state = train_step.create_train_state(s.model, s.graph, jax.random.PRNGKey(cfg.seed), x, s.optimizer)
    if cfg.compact_before_retraining:  # the checkpoints hold the compact model's state
        if not (run_dir / RETRAIN_MODEL).is_dir():
            raise FileNotFoundError(f"{str(run_dir / RETRAIN_MODEL)!r} is missing: this run "
                                    "retrains a compact model and its checkpoints need it")
        s, state = compact_for_retraining(s, state, run_dir)
    state = s.method.init(state, s.ctx)
    mgr = make_checkpoint_manager(run_dir / "checkpoints")
    newest = mgr.latest_step()
    if newest is None:
        mgr.close()
        raise FileNotFoundError(f"{str(run_dir / 'checkpoints')!r} holds no checkpoint")
    try:  # read-only: an unreadable step is reported and skipped, never moved
        state, meta, step = restore_latest_good(mgr, state, set_aside=False,
                                                warn=lambda m: print(f"warning: {m}", flush=True))
    finally:
        mgr.close()
    return s, state, meta, step, newest


CHECKPOINT_CHOICES = ("final", "best")


def compact_run(run_dir: str | os.PathLike, which: str = "final") -> dict:
    """Finalizes and compacts a checkpoint of a run (``jaxprune compact``): the final (latest)
    one, or with ``which='best'`` the one with the best test accuracy; a run with a fine-tuning
    phase is compacted from that phase's checkpoints. The record says which (``from_state``:
    ``which``, the Orbax ``checkpoint_step`` and ``newest_step``).

    Nothing of a later step is replaced by an older one: when the newest checkpoint is unreadable
    and ``final`` falls back to an older step, the results go beside the run's own, named by
    step (``compact-step<k>/``, ``result-step<k>.json``; the record's ``compact_dir`` and
    ``result_file`` say where), and ``compact/`` and ``result.json`` stay as they are. An
    unreadable best checkpoint is refused (ValueError naming it). The run directory is locked
    (`jaxprune.runlock`) while it is written."""
    from jaxprune.runlock import RunLock

    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint {which!r} is not allowed; expected one of {', '.join(CHECKPOINT_CHOICES)}")
    run_dir = Path(run_dir)
    with RunLock(run_dir):
        return _compact_locked(run_dir, which)


def _pick(directory: Path, state: Any, which: str) -> tuple[Any, dict, int, int]:
    """``(state, meta, step, newest)`` of the ``which`` checkpoint of ``directory``: ``best``
    exactly (an unreadable one is refused), ``final`` the newest readable one."""
    from jaxprune.checkpoints import (first_line, make_checkpoint_manager, restore_checkpoint,
                                      restore_latest_good)

    mgr = make_checkpoint_manager(directory)
    try:
        newest = mgr.latest_step()
        if which == "final":
            state, meta, step = restore_latest_good(
                mgr, state, set_aside=False, warn=lambda m: print(f"warning: {m}", flush=True))
            return state, meta, step, newest
        step = mgr.best_step()
        step = newest if step is None else step
        try:
            state, meta = restore_checkpoint(mgr, state, step=step)
        except Exception as e:  # noqa: BLE001 - truncated / garbage files
            raise ValueError(f"the best checkpoint, step {step} in {directory}, is unreadable "
                             f"({type(e).__name__}: {first_line(e)}); compact the final one "
                             "instead (--checkpoint final)") from None
        return state, meta, step, newest
    finally:
        mgr.close()


def _compact_locked(run_dir: Path, which: str) -> dict:
    s, state, meta, step, newest = restore_run(run_dir)
    ft_dir = run_dir / "checkpoints_finetune"
    has_ft = ft_dir.is_dir() and any(p.name.isdigit() for p in ft_dir.iterdir())
    if which == "best" and not has_ft:
        state, meta, step, newest = _pick(run_dir / "checkpoints", state, which)
    state = s.method.finalize(state, s.ctx)
    history = list(meta.get("history", []))
    tag = "step"
    if has_ft:
        state, ft_meta, step, newest = _pick(ft_dir, state, which)
        history += [_as_finetune_epoch(r, s.config.epochs) for r in ft_meta.get("history", [])]
        tag = "finetune-step"
    fell_back = which == "final" and step != newest
    compact_dir = f"compact-{tag}{step}" if fell_back else "compact"
    result_file = f"result-{tag}{step}.json" if fell_back else "result.json"
    preprocess = functools.partial(augment_lib.normalize, mean=s.dataset.mean, std=s.dataset.std)
    rec = finish(s, state, run_dir, preprocess, history=history, which=which, compact_dir=compact_dir)
    rec["from_state"].update(checkpoint_step=int(step), newest_step=int(newest))
    rec["compact_dir"], rec["result_file"] = compact_dir, result_file
    write_text_atomic(run_dir / result_file, json.dumps(rec, indent=2))
    return rec


def evaluate_path(path: str | os.PathLike, data_dir: str | None = None, test_subset: int = 0) -> dict:
    """Test accuracy of a saved compact model (or a run directory's ``compact/``) on the whole
    test set, or its first ``test_subset`` images; ``images`` in the result says how many."""
    import functools

    from jaxprune.checkpoints import check_weights, load

    p = Path(path)
    if (p / "compact").is_dir():
        p = p / "compact"
    model, variables, meta = load(p)
    check_weights(variables, what=f"the model in {str(p)!r}")  # NaN weights: no accuracy to report
    name = meta.get("dataset", "cifar10")
    if isinstance(test_subset, bool) or not isinstance(test_subset, int) or test_subset < 0:
        raise ValueError(f"--test-subset {test_subset!r}: expected a non-negative integer (0: all)")
    n = test_subset
    if name == "digits":
        ds = data_lib.load_digits_dataset(image_size=int(meta["input_shape"][0]))
    elif name == "imagenet2012":
        ds = load_imagenet(8, 100, image_size=int(meta["input_shape"][0]), data_dir=data_dir,
                           test_subset=n)
    else:
        ds = data_lib.load_cifar(name, data_dir)
    mean, std = meta.get("mean") or ds.mean, meta.get("std") or ds.std  # what the weights need
    preprocess = functools.partial(augment_lib.normalize, mean=tuple(mean), std=tuple(std))
    if isinstance(ds, StreamedDataset):
        res = evaluation.evaluate(model, variables, ds.test, None, 0, preprocess=preprocess)
        n = int(ds.num_test)
    else:
        n = min(n or ds.num_test, ds.num_test)
        res = evaluation.evaluate(model, variables, ds.x_test[:n], ds.y_test[:n], 500,
                                  preprocess=preprocess)
    return {"path": str(p), "dataset": name, "images": int(n),
            **{k: float(v) for k, v in res.items()}}


SENSITIVITY_CONVS = ("first", "second", "all")


def sensitivity_run(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                    out: str | os.PathLike, *, convs: str = "all", batch_size: int = 100,
                    progress: bool = True) -> Path:
    """PFEC's sensitivity analysis of a trained model (a run directory or a ``jaxprune import``
    directory): each numbered conv pruned alone (L1) at rates 0.1..0.9, test accuracy of each.

    ``convs``: 'first' (the first conv of every residual block: what PFEC prunes in a ResNet),
    'second' (the second convs) or 'all' (every prunable numbered conv). Evaluation uses
    `jaxprune.cut_eval.CutEvaluator` (the unchanged prefix of the network is computed once per
    layer); ``config.test_subset`` limits the test images. Writes ``sensitivity.csv`` (row by
    row: an interrupted analysis resumes where it stopped), ``sensitivity.json`` (provenance)
    and ``sensitivity.png`` (one panel per stage, as PFEC draws it).
    """
    import csv

    from jaxprune import cut_eval
    from jaxprune.methods import pfec

    if convs not in SENSITIVITY_CONVS:
        raise ValueError(f"convs={convs!r}: expected one of {', '.join(SENSITIVITY_CONVS)}")
    trained_cfg, variables, weights_from = load_trained(checkpoint)
    if trained_cfg.model != config.model:
        raise ValueError(f"config.model={config.model!r} but {str(checkpoint)!r} holds {trained_cfg.model!r}")
    config = ml_collections.ConfigDict(config.to_dict())
    if not tuple(config.mean) and trained_cfg.get("mean"):
        config.mean, config.std = tuple(trained_cfg.mean), tuple(trained_cfg.std)
    s = setup(config)
    ds = s.dataset
    preprocess = functools.partial(augment_lib.normalize, mean=ds.mean, std=ds.std)
    numbering = pfec.layer_numbers(s.graph)
    producers = s.graph.producer_to_group()
    wanted = {"first": ("conv1",), "second": ("conv2",), "all": None}[convs]
    layers = [n for n in sorted(numbering) if numbering[n] in producers
              and (wanted is None or numbering[n].split("/")[-1] in wanted)]
    if not layers:
        raise ValueError(f"convs={convs!r}: {config.model} has no such prunable conv")
    sample = jnp.zeros((1,) + ds.image_shape, jnp.float32)
    order = cut_eval.top_level_order(s.model, variables, sample)
    evaluator = cut_eval.CutEvaluator(s.model, variables, ds.x_test, ds.y_test, preprocess, batch_size)

    def prepare(group):
        members = [m.path for m in s.graph.groups[group].members] if group else []
        evaluator.set_cut(cut_eval.cut_for(members, order) if group else None)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rates = pfec.DEFAULT_RATES
    partial_path = out / "sensitivity.partial.csv"
    settings_path = out / "sensitivity.partial.json"
    # rows already written are reused only if they were measured the same way
    settings = {"checkpoint": str(Path(checkpoint).resolve()), "model": config.model, "convs": convs,
                "test_images": int(ds.num_test), "rates": list(rates), "batch_size": int(batch_size),
                "normalization": {"mean": list(ds.mean), "std": list(ds.std)}}
    done: dict[str, list[float]] = {}
    if partial_path.is_file():
        before = json.loads(settings_path.read_text()) if settings_path.is_file() else None
        if before != settings:
            changed = sorted(k for k in settings if before is None or before.get(k) != settings[k])
            raise ValueError(f"{partial_path} holds rows measured with other settings "
                             f"({', '.join(changed)}); use another --out or delete it")
        for row in csv.reader(partial_path.open()):
            done[row[1]] = [float(v) for v in row[2:]]
    else:
        settings_path.write_text(json.dumps(settings, indent=2))

    def on_row(label, group, accs):
        with partial_path.open("a", newline="") as f:
            csv.writer(f).writerow([label, group, *accs])

    provenance = {**settings, "checkpoint": str(checkpoint), "criterion": "l1",
                  "weights_from": weights_from}
    if (Path(checkpoint) / "import.json").is_file() or (Path(checkpoint) / "checkpoints").is_dir():
        provenance["baseline"] = baseline_provenance(checkpoint)
    t0 = time.time()
    table = pfec.sensitivity(evaluator.accuracy, variables, s.graph, layers, rates, prepare=prepare,
                             done=done, on_row=on_row, progress=progress)
    provenance["baseline_accuracy"] = table.baseline
    provenance["wall_time_s"] = round(time.time() - t0, 1)
    pfec.write_sensitivity_csv(table, str(out / "sensitivity.csv"))
    write_text_atomic(out / "sensitivity.json", json.dumps(provenance, indent=2))
    subset = "" if ds.num_test >= 10000 else f", first {ds.num_test} test images"
    which = {"first": "first conv of each block", "second": "second conv of each block",
             "all": "every conv"}[convs]
    pfec.plot_sensitivity(table, str(out / "sensitivity.png"),
                          title=f"{config.model} on {config.dataset}: {which} pruned alone (L1){subset}",
                          stage_ends=pfec.stage_ends_of(config.model))
    partial_path.unlink()
    settings_path.unlink()
    return out


def import_weights(name: str, source: str | os.PathLike, workdir: str | os.PathLike, *,
                   mean: tuple[float, ...] = (), std: tuple[float, ...] = (),
                   dataset: str = "cifar10") -> Path:
    """``jaxprune import``: PyTorch weights (`jaxprune.models.torch_import.from_torch`) -> a
    trained-model directory that ``pretrained=DIR``, ``jaxprune eval DIR`` and ``jaxprune
    sensitivity DIR`` read with no further input::

        DIR/config.json   model, data set and the input normalisation the weights need
        DIR/import.json   provenance: source file, its SHA-256, key count
        DIR/compact/      the dense model (Orbax, `jaxprune.load`)

    ``mean``/``std`` default to the data set's own constants. Checked before anything is written;
    written to a temporary sibling and renamed, so a failure leaves no directory behind. An
    existing non-empty ``workdir`` is refused.
    """
    import hashlib
    import shutil
    import uuid

    from jaxprune.checkpoints import check_weights, save_compact
    from jaxprune.models.torch_import import from_torch

    workdir = Path(workdir)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise FileExistsError(f"--workdir {str(workdir)!r} exists and is not an empty directory")
    if dataset not in data_lib.CIFAR_CONSTANTS:
        raise ValueError(f"--dataset {dataset!r}: imported CIFAR ResNets evaluate on one of "
                         f"{', '.join(data_lib.CIFAR_CONSTANTS)}")
    cfg = config_lib.base_config()
    cfg.name = f"import_{name}"
    cfg.model = str(name).lower()
    cfg.dataset = dataset
    cfg.mean, cfg.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    config_lib.validate(cfg)
    model, variables = from_torch(name, source)
    check_weights(variables, what=f"the weights imported from {str(source)!r}")
    channels = 3
    if cfg.mean and len(cfg.mean) != channels:
        raise ValueError(f"--mean {cfg.mean!r}: expected {channels} values, one per channel")
    src = Path(source)
    provenance = {"source": str(src.absolute()), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
                  "format": "pytorch state_dict (.npz)", "model": cfg.model,
                  "keys": len(np.load(src).files)}
    if not cfg.mean:
        consts = data_lib.CIFAR_CONSTANTS[dataset]
        cfg.mean, cfg.std = tuple(consts["mean"]), tuple(consts["std"])
    meta = {"method": "dense", "rate": 0.0, "dataset": dataset, "input_shape": [32, 32, channels],
            "mean": list(cfg.mean), "std": list(cfg.std), "imported_from": provenance["source"]}
    for stale in workdir.parent.glob(f".{workdir.name}.import-*"):  # left by a killed import
        shutil.rmtree(stale, ignore_errors=True)
    tmp = workdir.parent / f".{workdir.name}.import-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        (tmp / "import.json").write_text(json.dumps(provenance, indent=2))
        save_compact(tmp / "compact", model, variables, meta)
        if workdir.exists():
            workdir.rmdir()
        os.rename(tmp, workdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return workdir
