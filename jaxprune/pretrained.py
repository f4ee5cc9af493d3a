"""Trained weights as the start of a run (``config.pretrained``): a run directory or a
``jaxprune import`` directory, its normalisation and its provenance."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxprune import config as config_lib
from jaxprune.factories import data_spec, make_model


def pretrained_dir(path: str | os.PathLike) -> Path:
    """The trained-model directory ``path`` names (a run directory, its ``checkpoints/``, or a
    ``jaxprune import`` directory); FileNotFoundError when it has no ``config.json``."""
    p = Path(path)
    if p.name == "checkpoints":
        p = p.parent
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"config.pretrained={str(path)!r} is not a run directory (no config.json); give a "
            "directory written by `jaxprune train` / `jaxprune import`")
    return p


def variables_target(config: ml_collections.ConfigDict) -> Any:
    """``ShapeDtypeStruct`` tree of the variables of ``config``'s model (``jax.eval_shape`` of
    ``model.init``: nothing is computed, no data is read)."""
    image_shape, num_classes = data_spec(config)
    model = make_model(config, num_classes)
    x = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(config.seed), x, train=False), x)


def weights_digest(variables: Any) -> str:
    """SHA-256 of a model's ``params`` and ``batch_stats``: each leaf's key path, dtype, shape and
    bytes, in key order. The identity of a pretrained start, whichever directory holds it."""
    tree = {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_trained(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """``(config, variables, weights_from)`` of a trained model directory: a run directory (the
    params and batch statistics of its newest readable training checkpoint, read against
    `variables_target` of the config recorded with it) or a directory written by ``jaxprune
    import`` (its dense ``compact/`` model). The weights are checked (`check_weights`).
    ``weights_from`` says which: ``{'checkpoint_step': k, 'newest_step': n}`` (``k < n``: it
    fell back past a damaged step) or ``{'compact': dir}``, with the weights' `weights_digest`
    under ``'sha256'``."""
    from jaxprune.artifact import load
    from jaxprune.checkpoints import check_weights, restore_weights
    from jaxprune.resume import run_config

    p = pretrained_dir(path)
    cfg = ml_collections.ConfigDict(config_lib.with_defaults(json.loads((p / "config.json").read_text())))
    ckpts = p / "checkpoints"
    if ckpts.is_dir() and any(c.name.isdigit() for c in ckpts.iterdir()):
        trained = ml_collections.ConfigDict(config_lib.with_defaults(run_config(p)[0]))
        if trained.compact_before_retraining:
            raise ValueError(f"{str(p)!r} retrained a pruned (compact) model; a pretrained start "
                             "needs the dense weights")
        target = variables_target(trained)
        target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
        variables, step = restore_weights(ckpts, target,
                                          warn=lambda m: print(f"warning: {m}", flush=True))
        newest = max(int(c.name) for c in ckpts.iterdir() if c.name.isdigit())
        return cfg, variables, {"checkpoint_step": int(step), "newest_step": newest,
                                "sha256": weights_digest(variables)}
    if (p / "compact").is_dir():
        model, variables, _ = load(p / "compact")
        if getattr(model, "keep_out", None):
            raise ValueError(f"{str(p)!r} holds a pruned (compact) model; a pretrained start needs "
                             "the dense weights")
        check_weights(variables, what=f"the trained model in {str(p / 'compact')!r}")
        return cfg, variables, {"compact": str(p / "compact"), "sha256": weights_digest(variables)}
    raise FileNotFoundError(f"{str(p)!r} holds neither a training checkpoint nor a compact model")


def with_pretrained_normalization(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with ``mean``/``std`` taken from ``config.pretrained``'s recorded config when
    unset (weights need the normalisation they were trained with); otherwise unchanged."""
    if tuple(config.mean) or not config.pretrained:
        return config
    cfg = json.loads((pretrained_dir(config.pretrained) / "config.json").read_text())
    if not cfg.get("mean"):
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.mean, config.std = tuple(cfg["mean"]), tuple(cfg["std"])
    return config


def baseline_provenance(path: str | os.PathLike) -> dict:
    """Where a pretrained start came from: imported weights (``import.json``) or a jaxprune run
    (its schedule: epochs, training subset, LR schedule, and whether it finished)."""
    p = pretrained_dir(path)
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
