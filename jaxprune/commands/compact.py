"""``jaxprune compact``: finalize and compact a checkpoint of a run directory."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxprune import augment as augment_lib
from jaxprune import config as config_lib
from jaxprune import train_step, validate
from jaxprune.experiment import (RETRAIN_MODEL, Setup, finetune_start, finish, retraining_setup,
                                 setup)
from jaxprune.files import write_text_atomic
from jaxprune.metrics_log import as_finetune_epoch
from jaxprune.resume import run_config


def restore_run(run_dir: str | os.PathLike
                ) -> tuple[Setup, train_step.TrainState, dict, int, int]:
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
        from jaxprune.artifact import load

        model, variables, meta = load(run_dir / RETRAIN_MODEL)
        # already after the dense pruner's init: the restore's structure target
        s, state = retraining_setup(s, model, variables, (meta["dense"], meta["compact"]))
    else:
        state = train_step.prune_init(s.pruner, state)  # the restore's structure target
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

    validate.one_of(which, CHECKPOINT_CHOICES, "checkpoint")
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
    state = train_step.prune_finalize(s.pruner, state)
    history = list(meta.get("history", []))
    tag = "step"
    if has_ft:
        state, ft_meta, step, newest = _pick(ft_dir, finetune_start(s, state)[1], which)
        history += [as_finetune_epoch(r, s.config.epochs) for r in ft_meta.get("history", [])]
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
