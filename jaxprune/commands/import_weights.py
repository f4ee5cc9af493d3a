"""``jaxprune import``: trained PyTorch weights as a trained-model directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxprune import config as config_lib
from jaxprune import data as data_lib


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

    from jaxprune.artifact import save_compact
    from jaxprune.checkpoints import check_weights
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
