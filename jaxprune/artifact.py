"""The compact-model file format: `save_compact` writes, `load` reads back.

A compact model is one directory with the variables of a physically smaller model (Orbax
``StandardSave``), a JSON document holding ``model_config(model)``, the input shape and the
caller's metadata, and ``CHECKSUMS.json`` (the SHA-256 of every other file, verified by
`load`). `load` rebuilds the model from the JSON alone; the stored arrays are checked
against the shapes the model expects before they are read. A damaged or malformed directory
raises `CorruptArtifactError` naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.export  # noqa: F401  (jax < 0.8 does not import the submodule by itself)
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.checkpoints import first_line
from jaxprune.graph import leaf_paths
from jaxprune.models.common import CARRY
from jaxprune.tree_io import abstract_target, check_shapes, jsonable

COMPACT_FORMAT = "jaxprune.compact"
COMPACT_VERSION = 3  # 2: the 'carry' collection (constants of removed channels); 3: CHECKSUMS.json
CHECKSUMS = "CHECKSUMS.json"  # SHA-256 of every other file of a compact model (version >= 3)


class CorruptArtifactError(ValueError):
    """A saved compact model that is damaged or malformed: a file that does not match its
    checksum, is missing, or cannot be read. The message names the file."""


def _file_digests(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``root`` except ``CHECKSUMS``."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        with open(f, "rb") as fh:
            out[f.relative_to(root).as_posix()] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def verify_checksums(path: str | os.PathLike) -> None:
    """Raises `CorruptArtifactError` naming the first file of the compact model at ``path``
    that is missing or does not match the SHA-256 recorded in its ``CHECKSUMS.json``."""
    path = Path(path)
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())["sha256"]
    except FileNotFoundError:
        raise CorruptArtifactError(f"compact model {path}: {CHECKSUMS} is missing") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifactError(f"compact model {path}: {path / CHECKSUMS} is unreadable "
                                   f"({type(e).__name__})") from None
    actual = _file_digests(path)
    for rel, digest in recorded.items():
        if rel not in actual:
            raise CorruptArtifactError(f"compact model {path}: {path / rel} is missing")
        if actual[rel] != digest:
            raise CorruptArtifactError(f"compact model {path}: {path / rel} does not match its "
                                       "checksum (damaged or edited)")


_VARIABLES_ITEM = "variables"
_MODEL_ITEM = "model"


def abstract_variables(model: Any, input_shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
    """``ShapeDtypeStruct`` tree of ``model.init``'s variables for per-example ``input_shape``."""
    import inspect

    kwargs = {"train": False} if "train" in inspect.signature(model.__call__).parameters else {}
    x = jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in input_shape), dtype)
    return jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.PRNGKey(0), x)


def _compact_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
        _VARIABLES_ITEM: ocp.StandardCheckpointHandler(),
        _MODEL_ITEM: ocp.JsonCheckpointHandler(),
    }))


# model class of a saved `ProgramModel`: its jax.export artifact
EXPORTED_CLASS = "jax.export"


def save_compact(path: str | os.PathLike, model: Any, variables: Any, meta: Mapping[str, Any],
                 *, input_shape: tuple[int, ...] | None = None, overwrite: bool = False,
                 batch_size: int = 1) -> Path:
    """Saves a compact model (``compaction.compact``'s model and variables) to directory ``path``.

    The JSON document holds ``model_config(model)`` (class, keep_out, keep_in, fields), the
    per-example ``input_shape`` (HWC; taken from ``meta['input_shape']`` when not given) and
    ``meta`` (method, MACs and params in both conventions, keep indices, ... anything
    JSON-safe). The variables are checked against the shapes the model expects before anything
    is written. Atomic: everything is written to a temporary sibling directory that is renamed
    to ``path`` at the end, so a failure leaves nothing half-written; an existing ``path``
    raises FileExistsError unless ``overwrite``. Single-process (call it from one process).
    Returns the absolute path.

    A `jaxprune.compaction.ProgramModel` (a compacted model of the user's own) is saved
    as its ``jax.export`` artifact at ``batch_size`` (serialized into the JSON document), so
    that `load` restores it without the model's Python code (as an ``ExportedModel``).
    """
    from jaxprune.compaction import ProgramModel
    from jaxprune.models import model_config

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if input_shape is None:
        input_shape = meta.get("input_shape")
    if input_shape is None:
        raise ValueError("save_compact needs input_shape= (per-example HWC shape, e.g. (32, 32, 3)) "
                         "or meta['input_shape']")
    input_shape = tuple(int(d) for d in input_shape)
    if isinstance(model, ProgramModel):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        import base64

        x = jax.ShapeDtypeStruct((batch_size,) + input_shape, jnp.float32)
        check_shapes(variables, model.program((x,), {}).small_specs, what="variables")
        exported = model.export(variables, x)
        cfg = {"class": EXPORTED_CLASS, "batch_size": batch_size,
               "exported": base64.b64encode(exported.serialize()).decode("ascii")}
    else:
        cfg = model_config(model)
    variables = jax.device_get(dict(variables))
    carry = variables.get(CARRY, {})
    if not isinstance(model, ProgramModel):
        check_shapes({k: v for k, v in variables.items() if k != CARRY},
                     abstract_variables(model, input_shape), what="variables")
    doc = {
        "format": COMPACT_FORMAT,
        "version": COMPACT_VERSION,
        "model": cfg,
        "input_shape": list(input_shape),
        "meta": jsonable(dict(meta)),
        # shapes of the carried constants (compact(..., keep_constants=True)); not from init
        "carry": {"/".join(p): list(np.shape(v)) for p, v in zip(leaf_paths(carry), jax.tree.leaves(carry))},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in list(path.parent.glob(f".{path.name}.tmp-*")) + list(path.parent.glob(f".{path.name}.old-*")):
        # left by an interrupted save (a kill between write and rename); never the live model
        if stale.name.startswith(f".{path.name}.old-") and not path.exists():
            os.rename(stale, path)  # the kill came between the two renames: restore the model
        else:
            shutil.rmtree(stale, ignore_errors=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        ckptr = _compact_checkpointer()
        ckptr.save(tmp, args=ocp.args.Composite(**{
            _VARIABLES_ITEM: ocp.args.StandardSave(variables),
            _MODEL_ITEM: ocp.args.JsonSave(doc),
        }))
        ckptr.close()
        (tmp / CHECKSUMS).write_text(json.dumps({"sha256": _file_digests(tmp)}, indent=1))
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """Loads a `save_compact` directory: ``(model, variables, meta)`` (``model`` is an
    ``ExportedModel`` for a saved `~jaxprune.compaction.ProgramModel`).

    The model is rebuilt from the stored config (``jaxprune.models.model_from_config``), the
    expected variable shapes come from ``jax.eval_shape(model.init, ...)`` and the stored arrays
    are checked against them (ValueError naming the leaf and both shapes) before they are read.
    """
    from jaxprune.models import model_from_config

    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no compact model at {path}")
    if not (path / _MODEL_ITEM).is_dir() or not (path / _VARIABLES_ITEM).is_dir():
        raise FileNotFoundError(f"{path} is not a jaxprune compact model (no '{_MODEL_ITEM}' and "
                                f"'{_VARIABLES_ITEM}' items)")
    if (path / CHECKSUMS).is_file():
        verify_checksums(path)
    ckptr = _compact_checkpointer()
    try:
        doc = ckptr.restore(path, args=ocp.args.Composite(
            **{_MODEL_ITEM: ocp.args.JsonRestore()}))[_MODEL_ITEM]
    except Exception as e:  # noqa: BLE001 - garbage or truncated JSON
        raise CorruptArtifactError(f"compact model {path}: its '{_MODEL_ITEM}' document is unreadable "
                         f"({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise CorruptArtifactError(f"compact model {path}: its '{_MODEL_ITEM}' document holds no model config")
    if doc.get("format") != COMPACT_FORMAT:
        raise CorruptArtifactError(f"{path} has format {doc.get('format')!r}, expected {COMPACT_FORMAT!r}")
    if int(doc.get("version", -1)) > COMPACT_VERSION:
        raise ValueError(f"{path} has format version {doc.get('version')}; this jaxprune reads "
                         f"up to {COMPACT_VERSION}")
    if int(doc.get("version", -1)) >= 3 and not (path / CHECKSUMS).is_file():
        raise CorruptArtifactError(f"compact model {path}: {CHECKSUMS} is missing")
    if doc["model"].get("class") == EXPORTED_CLASS:
        import base64

        from jaxprune.compaction import ExportedModel

        model = ExportedModel(jax.export.deserialize(base64.b64decode(doc["model"]["exported"])),
                              int(doc["model"]["batch_size"]))
        target = model.variable_specs()
    else:
        model = model_from_config(doc["model"])
        target = abstract_variables(model, tuple(doc["input_shape"]))
    if doc.get("carry"):
        from flax.traverse_util import unflatten_dict

        target = {**target, CARRY: unflatten_dict({tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(v), jnp.float32)
                                                   for k, v in doc["carry"].items()})}
    try:
        stored = ckptr.metadata(path).item_metadata[_VARIABLES_ITEM]
    except Exception as e:  # noqa: BLE001
        raise CorruptArtifactError(f"compact model {path}: the metadata of its variables is unreadable "
                         f"({type(e).__name__}: {first_line(e)})") from None
    if stored is None or not jax.tree.leaves(getattr(stored, "tree", stored)):
        raise CorruptArtifactError(f"compact model {path}: its variables have no array metadata "
                         f"({_VARIABLES_ITEM}/_METADATA is missing or empty)")
    check_shapes(getattr(stored, "tree", stored), target, what=f"compact model {path}")
    try:
        variables = ckptr.restore(path, args=ocp.args.Composite(**{
            _VARIABLES_ITEM: ocp.args.StandardRestore(abstract_target(target))}))[_VARIABLES_ITEM]
    except Exception as e:  # noqa: BLE001 - truncated / garbage array files
        raise CorruptArtifactError(f"compact model {path}: its variables are unreadable "
                         f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        ckptr.close()
    meta = dict(doc.get("meta", {}))
    meta.setdefault("input_shape", list(doc["input_shape"]))
    return model, variables, meta


__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_VERSION",
    "CHECKSUMS",
    "CorruptArtifactError",
    "verify_checksums",
    "abstract_variables",
    "save_compact",
    "load",
]
