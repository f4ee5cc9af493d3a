"""jaxprune: structured filter pruning for Flax CNNs.

Submodules load lazily (``jaxprune.graph``, ``jaxprune.masks``, ...), so ``import jaxprune``
stays cheap; ``jaxprune.save_compact`` saves a compact model and ``jaxprune.load(path)``
restores it.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "artifact", "augment", "batching", "checkpoints", "compaction", "config", "criteria",
    "cut_eval", "data", "evaluation", "experiment", "flops", "graph", "imagenet", "masks",
    "methods", "models", "optim", "parallel", "pruner", "schedules", "selection", "train_step",
    "training", "validate",
)


def __getattr__(name):
    if name in ("load", "save_compact"):
        from jaxprune import artifact

        return getattr(artifact, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxprune.{name}")
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + ["load", "save_compact"])
