"""Training checkpoints: resumable, validated, with Orbax.

`make_checkpoint_manager`, `save_checkpoint`, `restore_checkpoint`: an
``orbax.checkpoint.CheckpointManager`` whose every step holds two items, ``state`` (the
`TrainState` pytree, ``StandardSave``) and ``meta`` (JSON: epoch, the epoch to resume at,
metrics, the run's history, config and method name). The Orbax step number is the number of
finished epochs. Orbax writes each step into a temporary directory and renames it into place
only once everything is on disk, so a process killed during a save leaves the previous step as
the latest one (the stale temporary directory is ignored, and removed when the next manager
opens the folder). A mid-epoch checkpoint of a preempted run lives in ``preempt/``
(`save_preempt`, `load_preempt`).

Every restore is validated against a target of the expected shapes BEFORE reading the arrays
(`jaxprune.tree_io.check_shapes`): a missing or unexpected leaf, or a leaf whose stored shape
differs from the target's, raises ValueError naming the leaf path and both shapes. Nothing is
ever padded or truncated. The compact-model file format is `jaxprune.artifact`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune import state_migration as migration
from jaxprune.files import naming_writes
from jaxprune.graph import leaf_paths
from jaxprune.tree_io import abstract_target, check_shapes, jsonable

STATE_ITEM = "state"
META_ITEM = "meta"


def quiet_late_async_errors() -> None:
    """Drops the reports of Orbax operations abandoned after a failure: when one TensorStore read
    or write of an Orbax restore or save fails (a damaged step, a full disk) or is interrupted
    (Ctrl-C), Orbax closes that operation's event loop while the others are still pending.
    TensorStore then reports each late completion (``RuntimeError: Event loop is closed``, with
    no object), and each pending Orbax coroutine, closed when it is garbage collected (possibly
    hours later, in a resumed run), raises a wrapper error of its ``GeneratorExit`` (``Exception
    ignored in: <coroutine object _read_array_index_and_device_put>`` with the whole TensorStore
    spec). Both come through ``sys.unraisablehook``; the failure itself was already raised to the
    caller. Every other unraisable error is reported as before. Installed once per process by the
    first `make_checkpoint_manager`, `restore_weights` or `load_preempt` call (not at import)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_late_async_errors", False):
        return
    asyncio_file = os.path.join("asyncio", "base_events.py")
    orbax_dir = f"{os.sep}orbax{os.sep}"

    def closed_loop(unraisable: Any) -> bool:
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return (unraisable.object is None and type(unraisable.exc_value) is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
                and tb.tb_frame.f_code.co_filename.endswith(asyncio_file))

    def abandoned_orbax_coroutine(unraisable: Any) -> bool:
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or orbax_dir not in code.co_filename:
            return False
        e, seen = unraisable.exc_value, set()
        while e is not None and id(e) not in seen:  # raised while it was being closed
            seen.add(id(e))
            if isinstance(e, GeneratorExit):
                return True
            e = e.__cause__ or e.__context__
        return False

    def hook(unraisable: Any) -> None:
        if not (closed_loop(unraisable) or abandoned_orbax_coroutine(unraisable)):
            previous(unraisable)

    hook.drops_late_async_errors = True
    sys.unraisablehook = hook



# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


class Retention(NamedTuple):
    """Which training checkpoints a run keeps: the ``max_to_keep`` latest steps AND the
    ``keep_best`` best by ``metrics[best_metric]`` (``best_mode`` 'max' or 'min')."""

    max_to_keep: int = 3
    keep_best: int = 1
    best_metric: str = "test_accuracy"
    best_mode: str = "max"

    def score(self, metrics: Mapping[str, Any] | None) -> float:
        """The ranking value of a step's metrics (the worst value when the metric is missing)."""
        value = metrics.get(self.best_metric) if metrics else None
        if value is None:
            return -math.inf if self.best_mode == "max" else math.inf
        return float(value)


def retained_steps(policy: Retention, metrics: Mapping[int, Mapping[str, Any] | None]) -> set[int]:
    """The steps of ``metrics`` (step -> its metrics, None when none were recorded) that
    ``policy`` keeps: the latest ``max_to_keep``, the best ``keep_best`` (ties: the earlier
    step ranks lower, as in Orbax's ``BestN`` and ``best_step``) and every step without metrics."""
    steps = sorted(metrics)
    ranked = sorted((s for s in steps if metrics[s] is not None),
                    key=lambda s: policy.score(metrics[s]), reverse=policy.best_mode == "min")
    best = ranked[-policy.keep_best:] if policy.keep_best else []
    return set(steps[-policy.max_to_keep:]) | set(best) | {s for s in steps if metrics[s] is None}


class RunCheckpointManager(ocp.CheckpointManager):
    """An Orbax ``CheckpointManager`` that knows its `Retention` policy, so that a resumed run
    can apply it again to what an interrupted one left (`apply_retention`), and that reports a
    failed write of a step (a full disk; it may surface from the background save at the next
    ``save``, ``wait_until_finished`` or ``close``) as `jaxprune.files.WriteFailed` naming the
    path, or this directory when the error names none. A failed step is never committed: the
    previous one stays the latest, and its temporary directory is removed on the next open."""

    def __init__(self, directory: Any, *, retention: Retention, **kwargs: Any):
        super().__init__(directory, **kwargs)
        self.retention = retention

    def save(self, *args: Any, **kwargs: Any) -> bool:
        with naming_writes(self.directory):
            return super().save(*args, **kwargs)

    def wait_until_finished(self) -> None:
        with naming_writes(self.directory):
            super().wait_until_finished()

    def apply_retention(self) -> list[int]:
        """Deletes the steps `retained_steps` does not keep and returns them. A kill between a
        save and Orbax's clean-up leaves a step too many, which no later save removes when the
        run has no epoch left; the writer of a run calls this once it has resumed (after a
        damaged step was set aside). The latest and the best step are always kept."""
        self.wait_until_finished()
        metrics = {s: self.metrics(s) for s in self.all_steps()}
        keep = retained_steps(self.retention, metrics)
        gone = [s for s in sorted(metrics) if s not in keep]
        for step in gone:
            self.delete(step)
        return gone


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int = 3,
                            keep_best: int = 1, best_metric: str = "test_accuracy",
                            best_mode: str = "max", async_save: bool = False
                            ) -> RunCheckpointManager:
    """An Orbax ``CheckpointManager`` for `save_checkpoint` / `restore_checkpoint`.

    Keeps the ``max_to_keep`` latest steps AND the ``keep_best`` best by ``metrics[best_metric]``
    (``best_mode`` 'max' or 'min'); ``manager.best_step()`` names the best one. (Orbax's own
    ``max_to_keep`` + ``best_fn`` would keep only the N best and could delete the latest, which
    resuming needs; hence the explicit preservation policy.) Stale temporary directories of an
    interrupted save are removed on creation; steps an interrupted clean-up left are removed by
    ``manager.apply_retention()`` (`RunCheckpointManager`). ``async_save`` lets training
    continue while the arrays are written (`fit` waits at the end).
    """
    quiet_late_async_errors()
    if max_to_keep < 1 or keep_best < 0:
        raise ValueError(f"max_to_keep must be >= 1 and keep_best >= 0, got {max_to_keep}, {keep_best}")
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    retention = Retention(max_to_keep, keep_best, best_metric, best_mode)

    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
        policies.append(ocp.checkpoint_managers.BestN(
            get_metric_fn=retention.score, reverse=best_mode == "min", n=keep_best))
    options = ocp.CheckpointManagerOptions(
        best_fn=retention.score,
        best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return RunCheckpointManager(
        Path(directory).absolute(),
        retention=retention,
        options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       META_ITEM: ocp.JsonCheckpointHandler()},
    )


def save_checkpoint(manager: ocp.CheckpointManager, state: Any, *, epoch: int,
                    metrics: Mapping[str, Any], history: Any = (),
                    config: Mapping[str, Any] | None = None, method: str | None = None) -> bool:
    """Saves ``state`` after epoch ``epoch`` (0-based) as Orbax step ``epoch + 1``.

    The meta item records ``epoch``, ``next_epoch`` (where a resumed run starts: the data
    position, as the batch order is a function of the epoch), ``step`` (optimizer steps),
    ``metrics``, ``history``, ``config`` and ``method``; ``metrics`` also drive the best-checkpoint
    bookkeeping. Returns whether Orbax saved.
    """
    meta = jsonable({
        "epoch": int(epoch),
        "next_epoch": int(epoch) + 1,
        "step": int(jax.device_get(state.step)) if hasattr(state, "step") else None,
        "metrics": dict(metrics),
        "history": list(history),
        "config": dict(config) if config is not None else None,
        "method": method,
    })
    numeric = {k: v for k, v in meta["metrics"].items() if isinstance(v, (int, float))}
    return manager.save(
        int(epoch) + 1,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                   META_ITEM: ocp.args.JsonSave(meta)}),
        metrics=numeric,
    )


def restore_checkpoint(manager: ocp.CheckpointManager, target: Any, *, step: int | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> tuple[Any, dict]:
    """Restores ``(state, meta)`` of ``step`` (default: the latest) into ``target``'s structure.

    ``target`` is a state (arrays or ``ShapeDtypeStruct``s) with the expected structure and
    shapes, e.g. the fresh state after the pruner's ``init`` (`jaxprune.train_step.prune_init`).
    A checkpoint of the older layout (``masks``/``hard``/``method_state`` fields) is converted
    (`jaxprune.state_migration`). Its leaves are checked against the
    stored metadata first (ValueError naming the leaf path and both shapes on any mismatch).
    With ``mesh`` the arrays come back replicated on it, else with the target leaves' shardings.
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {manager.directory}; "
                                f"available: {list(manager.all_steps())}")
    stored = manager.item_metadata(step)[STATE_ITEM]
    if stored is None or not jax.tree.leaves(getattr(stored, "tree", stored)):
        raise FileNotFoundError(f"checkpoint {manager.directory}/{step} has no array metadata "
                                f"({STATE_ITEM}/_METADATA is missing or empty)")
    tree = getattr(stored, "tree", stored)
    legacy = migration.is_legacy(tree, target)
    want = migration.legacy_target(tree, target) if legacy else target
    check_shapes(tree, want, what=f"checkpoint {manager.directory}/{step}")
    sharding = NamedSharding(mesh, P()) if mesh is not None else None
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_target(want, sharding)),
        META_ITEM: ocp.args.JsonRestore(),
    }))
    state, meta = restored[STATE_ITEM], dict(restored[META_ITEM])
    if legacy:
        state = migration.from_legacy(state, target, meta["next_epoch"], sharding)
    return state, meta


class BadWeightsError(ValueError):
    """Weights that must not be used: a non-finite value, a negative BatchNorm running variance
    or a non-float parameter (the message names the tensor)."""


def _weights_of(state: Any) -> dict:
    """The weights of a train state (params and batch statistics), or ``state`` itself."""
    if hasattr(state, "params"):
        return {"params": state.params, "batch_stats": getattr(state, "batch_stats", {})}
    return state


def check_weights(variables: Any, what: str = "weights") -> None:
    """Raises `BadWeightsError` naming the first tensor of ``variables`` (a variables dict, e.g.
    ``{'params': ..., 'batch_stats': ...}``) that is not floating point, holds a NaN or an inf,
    or, for a BatchNorm running variance (a ``batch_stats`` leaf named ``var``), a negative
    value. Checked where weights enter: restored, imported, pretrained, evaluated."""
    for path, leaf in zip(leaf_paths(variables), jax.tree.leaves(variables)):
        name = "/".join(path)
        arr = np.asarray(jax.device_get(leaf))
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise BadWeightsError(f"{what}: tensor {name} has dtype {arr.dtype}; weights must be "
                                  "floating point")
        arr = arr.astype(np.float32)
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise BadWeightsError(f"{what}: tensor {name} holds {bad} non-finite value(s) "
                                  f"(of {arr.size}); refusing to use these weights")
        if path and path[0] == "batch_stats" and path[-1] == "var" and np.any(arr < 0):
            raise BadWeightsError(f"{what}: tensor {name} (a BatchNorm running variance) holds "
                                  f"negative values (min {float(arr.min()):g}); variances are >= 0")


def read_step_meta(directory: str | os.PathLike, step: int) -> dict | None:
    """The meta item of checkpoint ``step`` in ``directory`` read as plain JSON (no arrays,
    no Orbax manager), or None when it is missing or unreadable."""
    path = Path(directory) / str(step) / META_ITEM / "metadata"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def recorded_config(directory: str | os.PathLike) -> tuple[dict, str] | None:
    """``(config, where)``: the config recorded with the newest checkpoint of ``directory`` that
    has one (the preempted one first, then the steps, newest first), or None (no checkpoint,
    or checkpoints written without a config)."""
    directory = Path(directory)
    pre = directory / PREEMPT_DIR / "meta.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            cfg = None
        if isinstance(cfg, dict):
            return cfg, str(pre)
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
        if directory.is_dir() else []
    for step in steps:
        meta = read_step_meta(directory, step)
        if meta is not None and isinstance(meta.get("config"), dict):
            return meta["config"], str(directory / str(step))
    return None


class CorruptCheckpointError(ValueError):
    """No readable checkpoint: every step failed to load (each is named with its error)."""


def first_line(e: BaseException, limit: int = 240) -> str:
    """The first line of ``e``'s message (its type name when empty), cut to ``limit`` characters:
    the one-line form of an error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def restore_latest_good(manager: ocp.CheckpointManager, target: Any, *,
                        mesh: jax.sharding.Mesh | None = None, warn: Any = None,
                        set_aside: bool = True) -> tuple[Any, dict, int]:
    """Restores the newest step that reads back completely: ``(state, meta, step)``.

    A step whose files are truncated, garbage or missing (any read error), or whose weights
    fail `check_weights` (non-finite, negative BN variance), is reported through
    ``warn`` (default: a Python warning) with the step, its directory and the error, and the
    next older step is tried; nothing is deleted. With ``set_aside`` an unreadable step is
    renamed to ``corrupt-<step>-<n>`` beside the steps (ignored by Orbax), so that the resumed
    run can save that step number again. A target that does not match the stored structure or
    shapes is not corruption: that ValueError is raised at once. Raises
    `CorruptCheckpointError` when no step is readable, FileNotFoundError when there is none.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")

    def read(step):
        state, meta = restore_checkpoint(manager, target, step=step, mesh=mesh)
        if not isinstance(meta, dict) or "next_epoch" not in meta:
            raise ValueError("its meta item has no 'next_epoch'")
        check_weights(_weights_of(state), what="its state")
        return state, meta

    step, (state, meta), bad = _newest_readable(
        steps, read, manager.directory, warn,
        then="resuming from step {step}" if set_aside else "reading step {step} instead")
    if set_aside:
        for b in bad:
            _set_aside(Path(str(manager.directory)), b)
        if bad:
            manager.reload()
    return state, meta, step


def _newest_readable(steps: list[int], read: Any, directory: Any, warn: Any,
                     then: str = "reading step {step} instead") -> tuple[int, Any, list[int]]:
    """``(step, read(step), unreadable steps)`` of the first of ``steps`` (newest first) that
    ``read`` reads: a step whose read raises (any error but a structure/shape mismatch, which is
    raised at once) is reported through ``warn`` (default: a Python warning) naming it and its
    error, and the next one is tried. `CorruptCheckpointError` naming every step when none
    reads."""
    import warnings

    problems = []
    for step in steps:
        try:
            out = read(step)
        except ValueError as e:
            if "does not match" in str(e):
                raise
            problems.append((step, e))
        except Exception as e:  # noqa: BLE001 - tensorstore / JSON / OS errors all mean unreadable
            problems.append((step, e))
        else:
            for bad, e in problems:
                msg = (f"checkpoint step {bad} in {directory} is unreadable "
                       f"({type(e).__name__}: {first_line(e)}); {then.format(step=step)}")
                (warn or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=4)))(msg)
            return step, out, [bad for bad, _ in problems]
    detail = "; ".join(f"step {st}: {type(e).__name__}: {first_line(e, 160)}" for st, e in problems)
    raise CorruptCheckpointError(f"no readable checkpoint in {directory} ({detail})")



def restore_weights(directory: str | os.PathLike, target: Mapping[str, Any], *,
                    warn: Any = None) -> tuple[dict, int]:
    """``(weights, step)``: only the ``target`` items of the train state (e.g. ``params`` and
    ``batch_stats``) of the newest readable training checkpoint in ``directory``; the optimizer
    state, masks and method state are not read, so no optimizer or method is needed.

    ``target`` holds arrays or ``ShapeDtypeStruct``s, e.g. ``jax.eval_shape`` of
    ``model.init``; the stored shapes are checked against it first (ValueError naming the leaf
    and both shapes). Read-only: an unreadable step, or one whose weights fail `check_weights`,
    is reported through ``warn`` and the next older one is read. Raises FileNotFoundError when
    ``directory`` holds no step, `CorruptCheckpointError` when none is readable."""
    quiet_late_async_errors()
    directory = Path(directory).absolute()
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True) \
        if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    target = dict(target)

    def read(step):
        path = directory / str(step) / STATE_ITEM
        ckptr = ocp.PyTreeCheckpointer()
        try:
            stored = ckptr.metadata(path)
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
            check_shapes({k: stored.get(k, {}) for k in target}, target,
                         what=f"checkpoint {directory}/{step}")
            abstract = abstract_target(target)
            weights = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True))
            check_weights(weights, what="its state")
            return dict(weights)
        finally:
            ckptr.close()

    step, weights, _ = _newest_readable(steps, read, directory, warn)
    return weights, step


PREEMPT_DIR = "preempt"


def save_preempt(directory: str | os.PathLike, state: Any, meta: Mapping[str, Any]) -> Path:
    """Saves a mid-epoch checkpoint (a preempted run) to ``directory/preempt`` atomically:
    the state (Orbax) and ``meta.json`` go to a temporary sibling that is renamed into place."""
    target = Path(directory).absolute() / PREEMPT_DIR
    tmp = target.parent / f".{PREEMPT_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "state", jax.device_get(state))
        ckptr.wait_until_finished()
        ckptr.close()
        (tmp / "meta.json").write_text(json.dumps(jsonable(dict(meta))))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_preempt(directory: str | os.PathLike, target: Any, *,
                 steps_per_epoch: int | None = None) -> tuple[Any, dict] | None:
    """``(state, meta)`` of ``directory/preempt`` restored into ``target``'s structure (shapes
    checked), or None when there is none (no ``preempt`` directory).

    The meta is checked against the state before it is trusted: ``resume_step`` must lie inside
    the epoch (``0 < resume_step < steps_per_epoch`` when given), equal the number of recorded
    per-step metrics, and, when epochs precede it, equal the optimizer steps taken since the
    last epoch's record; the weights must pass `check_weights`. Any failure (a damaged file, a
    missing ``meta.json`` or ``_METADATA``, an edited ``resume_step``) raises."""
    quiet_late_async_errors()
    path = Path(directory).absolute() / PREEMPT_DIR
    if not path.exists():
        return None
    meta = json.loads((path / "meta.json").read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{path / 'meta.json'} holds no JSON object")
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = ckptr.metadata(path / "state")
        stored = getattr(stored, "item_metadata", stored)  # older orbax: the tree itself
        if stored is None or not jax.tree.leaves(getattr(stored, "tree", stored)):
            raise FileNotFoundError(f"preempted checkpoint {path} has no array metadata "
                                    "(state/_METADATA is missing or empty)")
        tree = getattr(stored, "tree", stored)
        legacy = migration.is_legacy(tree, target)
        want = migration.legacy_target(tree, target) if legacy else target
        check_shapes(tree, want, what=f"preempted checkpoint {path}")
        state = ckptr.restore(path / "state", abstract_target(want))
    finally:
        ckptr.close()
    if legacy:
        if not isinstance(meta.get("epoch"), int):
            raise ValueError(f"{path / 'meta.json'} lacks 'epoch' or 'history'")
        state = migration.from_legacy(state, target, meta["epoch"])
    rs, per_step, history = meta.get("resume_step"), meta.get("step_metrics"), meta.get("history")
    if isinstance(rs, bool) or not isinstance(rs, int) or rs < 1 or (
            steps_per_epoch is not None and rs >= steps_per_epoch):
        raise ValueError(f"{path / 'meta.json'}: resume_step={rs!r} is not a step inside the epoch")
    if not isinstance(per_step, list) or len(per_step) != rs:
        raise ValueError(f"{path / 'meta.json'}: resume_step={rs} but "
                         f"{len(per_step) if isinstance(per_step, list) else 'no'} steps are recorded")
    if not isinstance(history, list) or not isinstance(meta.get("epoch"), int):
        raise ValueError(f"{path / 'meta.json'} lacks 'epoch' or 'history'")
    taken = int(jax.device_get(state.step)) if hasattr(state, "step") else None
    if history and taken is not None and isinstance(history[-1], dict) and "step" in history[-1] \
            and taken - int(history[-1]["step"]) != rs:
        raise ValueError(f"{path / 'meta.json'}: resume_step={rs} but the state took "
                         f"{taken - int(history[-1]['step'])} steps since epoch {len(history)}")
    check_weights(_weights_of(state), what=f"preempted checkpoint {path}")
    return state, meta


def set_aside_preempt(directory: str | os.PathLike) -> Path | None:
    """Renames a damaged ``directory/preempt`` to ``corrupt-preempt-<n>`` (nothing deleted);
    returns the new path."""
    directory = Path(directory).absolute()
    if not (directory / PREEMPT_DIR).exists():
        return None
    n = 0
    while (directory / f"corrupt-{PREEMPT_DIR}-{n}").exists():
        n += 1
    os.rename(directory / PREEMPT_DIR, directory / f"corrupt-{PREEMPT_DIR}-{n}")
    return directory / f"corrupt-{PREEMPT_DIR}-{n}"


def clear_preempt(directory: str | os.PathLike) -> None:
    """Removes ``directory/preempt`` (once the epoch it interrupted has a normal checkpoint)."""
    shutil.rmtree(Path(directory).absolute() / PREEMPT_DIR, ignore_errors=True)
    for stale in Path(directory).absolute().glob(f".{PREEMPT_DIR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _set_aside(directory: Path, step: int) -> None:
    src = directory / str(step)
    if not src.exists():
        return
    n = 0
    while (directory / f"corrupt-{step}-{n}").exists():
        n += 1
    os.rename(src, directory / f"corrupt-{step}-{n}")



__all__ = [
    "STATE_ITEM",
    "META_ITEM",
    "make_checkpoint_manager",
    "quiet_late_async_errors",
    "Retention",
    "retained_steps",
    "RunCheckpointManager",
    "save_checkpoint",
    "restore_checkpoint",
    "restore_latest_good",
    "restore_weights",
    "save_preempt",
    "load_preempt",
    "set_aside_preempt",
    "clear_preempt",
    "CorruptCheckpointError",
    "BadWeightsError",
    "check_weights",
    "first_line",
    "read_step_meta",
    "recorded_config",
]
