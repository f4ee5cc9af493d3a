"""``jaxprune eval``: test accuracy of a saved compact model."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from jaxprune import augment as augment_lib
from jaxprune import data as data_lib
from jaxprune import evaluation, validate
from jaxprune.imagenet import StreamedDataset, load_imagenet


def evaluate_path(path: str | os.PathLike, data_dir: str | None = None, test_subset: int = 0) -> dict:
    """Test accuracy of a saved compact model (or a run directory's ``compact/``) on the whole
    test set, or its first ``test_subset`` images; ``images`` in the result says how many."""
    from jaxprune.artifact import load
    from jaxprune.checkpoints import check_weights

    p = Path(path)
    if (p / "compact").is_dir():
        p = p / "compact"
    model, variables, meta = load(p)
    check_weights(variables, what=f"the model in {str(p)!r}")  # NaN weights: no accuracy to report
    name = meta.get("dataset", "cifar10")
    n = validate.non_negative_int(test_subset, "--test-subset")
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
