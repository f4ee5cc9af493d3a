"""What the pruning methods share besides the `jaxprune.pruner.Pruner` API."""

from __future__ import annotations

from typing import Any


def final_roles(method: Any) -> tuple[str, ...] | None:
    """Member roles the method's final model zeroes in its pruned channels: ``None`` (every
    slice, the default) or, for SFP's official final model, ``('out',)`` (only the filters, so
    the BN constants stay and compaction carries them: ``compact(..., keep_constants=True)``)."""
    return getattr(method, "final_roles", None)
