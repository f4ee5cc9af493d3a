"""Imports of optional dependencies, with a one-line error naming the extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> what it installs (pyproject.toml's optional-dependencies).
EXTRAS = {"imagenet": "tensorflow-datasets, pillow", "plots": "matplotlib", "tensorboard": "tensorboardX"}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``; if it is not installed, an ``ImportError`` saying that
    ``purpose`` needs it and that ``pip install 'jaxprune[<extra>]'`` installs it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs {module.split('.')[0]} ({EXTRAS[extra]}), which is not installed: "
            f"pip install 'jaxprune[{extra}]'") from None
