"""The resume policy of a run directory: whether it can be one (`check_workdir`), which
config a run there was trained under (`run_config`), which changes a resumed run may make
(`check_resume`), and how a refused start is undone (`undo_refused_start`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import ml_collections

from jaxprune import config as config_lib


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


def started_from(workdir: Path) -> str | None:
    """The digest of the trained weights the run in ``workdir`` started from, as its
    ``start.json`` records it (`jaxprune.pretrained.weights_digest`); None when it records none
    (no pretrained start, or a run recorded before digests were)."""
    start = Path(workdir) / "start.json"
    if not start.is_file():
        return None
    return json.loads(start.read_text()).get("weights_from", {}).get("sha256")


def check_resume(workdir: Path, config: ml_collections.ConfigDict, *,
                 allow_schedule_change: bool = False,
                 weights_digest_of: Callable[[str], str] | None = None) -> dict:
    """Compares ``config`` with the run already in ``workdir`` (`run_config`: the config
    recorded with its newest checkpoint, else its ``config.json``), if any.

    A change of model, data, seed, method or anything else in `RESUME_FIXED` is refused
    (ValueError naming the first key with its old and new value), except a ``pretrained``
    directory whose weights have the digest the run started from (`started_from`), given
    ``weights_digest_of(path)``: the run moved, say trained on a GPU machine and finished on
    another. A change of the schedule (`RESUME_SCHEDULE`) is refused unless
    ``allow_schedule_change``. Returns ``{key: [old, new]}`` of the allowed changes (dotted
    keys)."""
    ref = run_config(workdir)
    if ref is None:
        return {}
    old = config_lib.with_defaults(ref[0])
    new = config_lib.with_defaults(config.to_dict())
    fixed = _changed(old, new, RESUME_FIXED)
    moved, why = {}, ""
    if "pretrained" in fixed and old.get("pretrained") and new.get("pretrained") and weights_digest_of:
        recorded = started_from(workdir)
        if recorded is None:
            why = "; its start.json records no digest of the weights to compare"
        elif weights_digest_of(new["pretrained"]) == recorded:  # the same weights, moved
            moved = {"pretrained": fixed.pop("pretrained")}
        else:
            why = f"; {new['pretrained']!r} holds other weights than the run started from"
    if fixed:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(fixed.items())[:3])
        raise ValueError(f"{workdir} holds a run with another {', '.join(fixed)} ({shown}; recorded "
                         f"in {ref[1]}{why}); refusing to resume it: use another --workdir")
    sched = _changed(old, new, RESUME_SCHEDULE)
    if sched and not allow_schedule_change:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in list(sched.items())[:3])
        raise ValueError(f"{workdir} holds a run with another schedule ({shown}; recorded in "
                         f"{ref[1]}); "
                         "pass --allow-schedule-change to resume it with the new one (recorded in "
                         "config_changes.jsonl), or use another --workdir")
    return {**moved, **sched}


def undo_refused_start(workdir: Path, created: bool, before: dict[str, bytes | None]) -> None:
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
