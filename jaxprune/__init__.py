"""jaxprune: structured filter pruning for Flax CNNs.

Submodules load lazily (``jaxprune.graph``, ``jaxprune.masks``, ...), so ``import jaxprune``
stays cheap; ``jaxprune.load(path)`` restores a saved compact model.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "augment", "batching", "checkpoints", "compaction", "config", "criteria", "cut_eval", "data",
    "evaluation", "experiment", "flops", "graph", "imagenet", "masks", "methods", "models",
    "optim", "parallel", "pruner", "schedules", "selection", "train_step", "training",
)


def __getattr__(name):
    if name == "load":
        from jaxprune.checkpoints import load

        return load
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxprune.{name}")
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + ["load"])
