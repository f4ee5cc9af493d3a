"""Imports of optional dependencies, with a one-line error naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> what it installs (pyproject.toml's optional-dependencies).
EXTRAS = {"imagenet": "tensorflow-datasets, pillow", "plots": "matplotlib", "tensorboard": "tensorboardX"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; if it is not installed, a `MissingExtraError` saying
    that ``purpose`` needs it and that ``pip install 'jaxprune[<extra>]'`` installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs {module.split('.')[0]} ({EXTRAS[extra]}), which is not installed: "
            f"pip install 'jaxprune[{extra}]'") from None
