"""Data sources: CIFAR-10/100 and digits as in-memory uint8 arrays (`Dataset`), found offline or
through TFDS, with the TFDS discovery the ImageNet stream (`jaxprune.imagenet`) shares.

The CIFAR recipe (docs/methods.md, section 2) is random horizontal flip + 4-pixel zero pad +
random 32x32 crop, then per-channel normalisation; evaluation normalises only. Images stay
``uint8`` on the host; `jaxprune.augment` turns a batch into normalised ``float32`` on the
device, and `jaxprune.batching` gives the batch orders.

Where the data comes from (details in :func:`load_cifar` / `jaxprune.imagenet.imagenet_pipeline`):

* CIFAR-10/100: an offline copy in the ``.npz`` shard layout (:func:`write_npz_shards`), made
  by ``jaxprune data cifar10`` (`jaxprune.download`: the official archive, no TensorFlow) and found
  through the ``data_dir`` argument, the ``JAXPRUNE_DATA_DIR`` environment variable or the user
  cache ``~/.cache/jaxprune/<name>``; in a source checkout of this repository also its data
  folder ``../shared/data/<name>`` beside the checkout; else TFDS (a prepared copy, or
  ``download=True``, when tensorflow-datasets is installed).
* ImageNet: TFDS ``imagenet2012`` prepared as ``array_record`` (in ``data_dir``,
  ``$JAXPRUNE_DATA_DIR`` or TFDS's data dir), read through ``tfds.data_source`` and streamed with
  grain when it is installed, else a thread pool; the standard ResNet preprocessing is done with
  PIL/numpy, so neither TensorFlow nor ``tf.data`` is needed.
* Digits (:func:`load_digits_dataset`): scikit-learn's bundled 8x8 digits, for offline runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

# The file names of the data sets' official archives (`jaxprune.download` fetches and converts them)
OFFICIAL_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ENV_DATA_DIR",
    "Dataset",
    "load_cifar",
    "write_npz_shards",
    "load_digits_dataset",
]

# Normalisation constants of the official SFP/FPGM scripts, in 0..1 units.
CIFAR10_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255.0 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255.0 for v in (68.2, 65.4, 70.4))
# torchvision's ImageNet constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Environment variable naming a data folder: it holds ``cifar10/`` / ``cifar100/`` with the offline
#: shards (or the shards themselves), and may be a TFDS data dir (``imagenet2012/``, ``cifar10/``..).
ENV_DATA_DIR = "JAXPRUNE_DATA_DIR"

CIFAR_CONSTANTS = {
    "cifar10": dict(num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
}

_REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An in-memory image classification data set.

    ``x_*`` are ``uint8 [N, H, W, C]`` (NHWC), ``y_*`` are ``int32 [N]``; ``mean``/``std`` are the
    per-channel normalisation constants in 0..1 units (what :func:`normalize` and
    :func:`augment_batch` take).  The arrays are made read-only.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self):
        for field in ("x_train", "y_train", "x_test", "y_test"):
            a = np.asarray(getattr(self, field))
            want = np.uint8 if field.startswith("x") else np.int32
            # A view, so freezing it never freezes the caller's array.
            a = a.astype(want) if a.dtype != want else a.view()
            a.flags.writeable = False
            object.__setattr__(self, field, a)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or x.shape[0] != y.shape[0] or y.ndim != 1:
                raise ValueError(f"{split}: expected x [N,H,W,C] and y [N], got {x.shape}, {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{split}: labels outside 0..{self.num_classes - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train/test image shapes differ: {self.x_train.shape} vs {self.x_test.shape}")
        c = self.x_train.shape[-1]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} channels, got {len(self.mean)}/{len(self.std)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def shard_files(folder: Path) -> list[Path] | None:
    """``train_0..train_{k-1}.npz`` (contiguous) if ``folder`` holds the offline layout."""
    if not (folder / "test.npz").is_file():
        return None
    found = {}
    for p in folder.glob("train_*.npz"):
        m = re.fullmatch(r"train_(\d+)\.npz", p.name)
        if m:
            found[int(m.group(1))] = p
    if not found or sorted(found) != list(range(len(found))):
        return None
    return [found[i] for i in range(len(found))]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/jaxprune`` (default ``~/.cache/jaxprune``): the per-user offline copy."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxprune"


def _checkout_data_root() -> Path | None:
    """``../shared/data`` beside the repository when jaxprune runs from a source checkout (a
    ``pyproject.toml`` next to the package): the data folder of this repository's own experiments
    and tests. None for an installed package."""
    if not (_REPO_ROOT / "pyproject.toml").is_file():
        return None
    return (_REPO_ROOT / ".." / "shared" / "data").resolve()


def _default_offline_roots() -> list[Path]:
    """Folders whose ``<name>/`` subfolder may hold the offline shards when neither ``data_dir``
    nor ``$JAXPRUNE_DATA_DIR`` has them, in search order: the user cache (:func:`cache_root`,
    where ``jaxprune data`` writes by default), then, in a source checkout only,
    :func:`_checkout_data_root`."""
    roots = [cache_root().resolve()]
    checkout = _checkout_data_root()
    if checkout is not None and checkout not in roots:
        roots.append(checkout)
    return roots


def cifar_available(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether `load_cifar` would find ``name`` without downloading (a cheap look, no read)."""
    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_DATA_DIR):
        roots.append(Path(os.environ[ENV_DATA_DIR]))
    roots += _default_offline_roots()
    for r in roots:
        if shard_files(r / name) or (data_dir and shard_files(r)):
            return True
    tfds_dirs = [os.environ.get("TFDS_DATA_DIR", ""), os.environ.get(ENV_DATA_DIR, ""),
                 str(Path.home() / "tensorflow_datasets")]
    return any(d and (Path(d) / name).is_dir() for d in tfds_dirs)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_sha256sums(folder: Path) -> dict[str, str]:
    """``{file name: hex digest}`` from ``folder/SHA256SUMS`` (``sha256sum`` format); ``{}`` if absent."""
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        return {}
    sums = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            sums[parts[-1].lstrip("*")] = parts[0].lower()
    return sums


def _verify_checksums(folder: Path, files: Sequence[Path]) -> None:
    sums = _read_sha256sums(folder)
    for f in files:
        want = sums.get(f.name)
        if want is None:
            continue
        got = _sha256(f)
        if got != want:
            raise ValueError(
                f"checksum mismatch for {f}: SHA256SUMS says {want}, the file hashes to {got}; "
                f"the copy is corrupt or incomplete -- copy it again (or pass verify=False)"
            )


def classes_problem(folder: Path, num_classes: int) -> str | None:
    """Why ``folder`` is not this data set according to its ``classes.txt`` (None: no objection).

    Guards against ``JAXPRUNE_DATA_DIR`` pointing straight at a CIFAR-10 folder while CIFAR-100
    is requested: both have the same file layout, only the class list tells them apart."""
    classes = folder / "classes.txt"
    if not classes.is_file():
        return None
    n = sum(1 for line in classes.read_text().splitlines() if line.strip())
    return None if n == num_classes else f"{folder} (classes.txt lists {n} classes, not {num_classes})"


def _load_npz_layout(folder: Path, files: list[Path], verify: bool):
    if verify:
        _verify_checksums(folder, [*files, folder / "test.npz"])
    xs, ys = [], []
    for f in files:
        with np.load(f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    with np.load(folder / "test.npz") as z:
        x_test, y_test = z["x"], z["y"]
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test


def write_npz_shards(
    folder: str | os.PathLike,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    shard_size: int = 10_000,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the offline layout :func:`load_cifar` reads: ``train_0.npz ..``, ``test.npz``
    (``savez_compressed`` with ``x`` uint8 NHWC, ``y`` uint8 labels), ``SHA256SUMS`` and, with
    ``class_names``, ``classes.txt``.  Use it to carry a TFDS-loaded copy to an offline machine:
    ``d = load_cifar('cifar100', download=True); write_npz_shards(dst / 'cifar100', d.x_train, ...)``.
    Returns the folder."""
    folder = Path(folder)
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("train_*.npz"):  # a longer earlier copy would add its extra shards
        stale.unlink()
    for y in (y_train, y_test):
        if np.asarray(y).size and (np.min(y) < 0 or np.max(y) > 255):
            raise ValueError("labels must lie in 0..255 to be stored as uint8")
    written = []

    def save(fname, x, y):
        np.savez_compressed(folder / fname, x=np.asarray(x, np.uint8), y=np.asarray(y, np.uint8))
        written.append(folder / fname)

    n = len(x_train)
    for k, start in enumerate(range(0, max(n, 1), shard_size)):
        save(f"train_{k}.npz", x_train[start : start + shard_size], y_train[start : start + shard_size])
    save("test.npz", x_test, y_test)
    (folder / "SHA256SUMS").write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in written))
    if class_names is not None:
        (folder / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))
    return folder


def tfds_module():
    """The ``tensorflow_datasets`` module, or None where it cannot be imported."""
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except Exception:  # optional: pip install 'jaxprune[imagenet]'
        return None
    return tfds


def _have_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401, PLC0415
    except Exception:
        return False
    return True


def tfds_where(data_dir) -> str:
    """Where TFDS reads from, for messages: ``data_dir`` or the default location."""
    if data_dir is not None:
        return str(data_dir)
    return "the TFDS default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"


def _load_cifar_tfds(name: str, data_dir: str | os.PathLike | None, download: bool):
    """Read CIFAR from TFDS. Returns ``(arrays, None)`` or ``(None, reason)``; never raises.

    Without TensorFlow only an ``array_record`` copy can be read (``tfds.data_source``), and TFDS
    cannot *prepare* CIFAR at all (its CIFAR builder reads the archive with ``tf.io.gfile``)."""
    tfds = tfds_module()
    if tfds is None:
        return None, "TFDS: tensorflow-datasets is not installed (pip install 'jaxprune[imagenet]')"
    where = tfds_where(data_dir)
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
        has_tf = _have_tensorflow()
        if not builder.is_prepared():
            if not download:
                return None, f"TFDS {name!r} is not prepared in {where} (download=False)"
            if not has_tf:
                return None, (
                    f"TFDS {name!r} is not prepared in {where}, and preparing it needs TensorFlow "
                    f"(pip install tensorflow-cpu), which is not installed"
                )
            builder.download_and_prepare()
        out = []
        for split in ("train", "test"):
            if has_tf:
                d = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
                out += [np.asarray(d["image"]), np.asarray(d["label"])]
            else:
                src = builder.as_data_source(split=split)
                items = src.__getitems__(range(len(src))) if hasattr(src, "__getitems__") else list(src)
                out += [np.stack([np.asarray(e["image"]) for e in items]),
                        np.asarray([int(e["label"]) for e in items])]
        return tuple(out), None
    except Exception as e:  # TFDS raises many types (DatasetNotFoundError, NotImplementedError..)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"TFDS {name!r} in {where} failed: {type(e).__name__}: {msg}"


def load_cifar(
    name: str = "cifar10",
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    download: bool = False,
) -> Dataset:
    """Load CIFAR-10 or CIFAR-100 into memory as a :class:`Dataset` (uint8 NHWC images).

    Where the data is looked for, in order (the first hit wins):

    1. ``data_dir`` if given: the offline shard layout in ``data_dir/<name>/`` or in ``data_dir``
       itself, else a TFDS data dir (``tfds.builder(name, data_dir=data_dir)``).  An explicit
       ``data_dir`` is authoritative: nothing else is tried.
    2. ``$JAXPRUNE_DATA_DIR`` (:data:`ENV_DATA_DIR`): the shards in ``<dir>/<name>/`` or in
       ``<dir>`` itself.
    3. The user cache ``~/.cache/jaxprune/<name>`` (``$XDG_CACHE_HOME/jaxprune/<name>``), where
       ``jaxprune data <name>`` writes by default; then, only when jaxprune runs from a source
       checkout of this repository, ``../shared/data/<name>`` beside the checkout.
    4. TFDS: a prepared copy in ``$JAXPRUNE_DATA_DIR`` or TFDS's default data dir
       (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), when tensorflow-datasets is installed.
       With ``download=True`` TFDS downloads and prepares it (needs internet, and TensorFlow to
       prepare); ``jaxprune data <name>`` is the simpler way (`jaxprune.download`).

    The offline layout (see :func:`write_npz_shards`) is ``train_0.npz .. train_{k-1}.npz`` +
    ``test.npz``, each with ``x`` ``uint8 [N,32,32,3]`` and ``y`` labels, optionally
    ``classes.txt`` (one class name a line; a folder whose list has the wrong length is skipped)
    and ``SHA256SUMS``, which ``verify=True`` checks (``ValueError`` on mismatch).

    Raises ``FileNotFoundError`` listing every place looked at, and the command that fetches the
    data (``jaxprune data <name>``), when it is found nowhere.
    """
    if name not in CIFAR_CONSTANTS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(CIFAR_CONSTANTS)}")
    meta = CIFAR_CONSTANTS[name]
    looked: list[str] = []

    def try_folder(root: Path, direct: bool = True):
        for d in [root / name, root] if direct else [root / name]:
            files = shard_files(d)
            if files is None:
                looked.append(f"{d} (no train_0.npz .. + test.npz)")
                continue
            problem = classes_problem(d, meta["num_classes"])
            if problem is not None:
                looked.append(problem)
                continue
            arrays = _load_npz_layout(d, files, verify)
            n_seen = len(np.unique(arrays[1]))
            if n_seen != meta["num_classes"]:
                raise ValueError(
                    f"{d} holds {n_seen} distinct training labels, but {name} has "
                    f"{meta['num_classes']} classes: is this folder the right data set?"
                )
            return arrays
        return None

    arrays = None
    env = os.environ.get(ENV_DATA_DIR)
    if data_dir is not None:
        arrays = try_folder(Path(data_dir).expanduser())
        tfds_dirs: list[Path | None] = [Path(data_dir).expanduser()]
    else:
        if env:
            arrays = try_folder(Path(env).expanduser())
        else:
            looked.append(f"${ENV_DATA_DIR} (not set)")
        if arrays is None:
            for root in _default_offline_roots():
                arrays = try_folder(root, direct=False)
                if arrays is not None:
                    break
        tfds_dirs = ([Path(env).expanduser()] if env else []) + [None]
    if arrays is None:
        # Prepared copies first, anywhere; only then download (into the first candidate dir).
        for d in tfds_dirs:
            arrays, reason = _load_cifar_tfds(name, d, download=False)
            if arrays is not None:
                break
            looked.append(reason)
        if arrays is None and download:
            arrays, reason = _load_cifar_tfds(name, tfds_dirs[0], download=True)
            if arrays is None:
                looked.append(reason)
    if arrays is None:
        where = "\n  - ".join(looked)
        target = Path(data_dir).expanduser() if data_dir is not None else None
        fetch = f"jaxprune data {name}" + (f" --dir {target}" if target is not None else "")
        raise FileNotFoundError(
            f"{name} data not found; run `{fetch}` to download it (or `{fetch} --from "
            f"{OFFICIAL_ARCHIVES[name]}` to convert an archive you have). Looked in:\n"
            f"  - {where}\n"
            f"Other ways to provide it:\n"
            f"  * pass data_dir=<folder> (CLI: --data_dir) holding {name}/train_0.npz .. "
            f"train_4.npz + test.npz, or those files directly;\n"
            f"  * set the environment variable {ENV_DATA_DIR}=<folder>, same layout;\n"
            f"  * put the files in {cache_root() / name}/;\n"
            f"  * or let TFDS fetch it: load_cifar({name!r}, download=True) on a machine with "
            f"internet access, tensorflow-datasets and TensorFlow installed; write_npz_shards() "
            f"then makes the offline layout for machines without them."
        )
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        x_train=np.asarray(x_train, np.uint8),
        y_train=np.asarray(y_train).astype(np.int32),
        x_test=np.asarray(x_test, np.uint8),
        y_test=np.asarray(y_test).astype(np.int32),
        num_classes=meta["num_classes"],
        mean=meta["mean"],
        std=meta["std"],
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Digits (offline quickstart)
# --------------------------------------------------------------------------------------------


def load_digits_dataset(
    image_size: int = 16, test_fraction: float = 0.2, seed: int = 0, channels: int = 3
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download) as a Dataset of
    small RGB-like images, for the offline quickstart.

    Pixel values 0..16 are rescaled to 0..255 ``uint8``; ``image_size`` must be a multiple of 8
    (8 keeps the images, 16 upsamples 2x by pixel repetition); the grey value is repeated over
    ``channels`` (3: the CIFAR models take the images as they are).  The split is stratified and
    deterministic in ``seed``; mean/std (equal for every channel) are those of the training images.
    ``x_*``: ``uint8 [N, image_size, image_size, channels]``, ``y_*``: ``int32`` in ``0..9``.
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    if image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    f = image_size // 8
    if f > 1:
        x = x.repeat(f, axis=1).repeat(f, axis=2)
    x = np.repeat(x[..., None], channels, axis=-1)
    y = d.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
    )
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    xt = x[idx_train, ..., 0].astype(np.float64) / 255.0
    return Dataset(
        x_train=x[idx_train],
        y_train=y[idx_train],
        x_test=x[idx_test],
        y_test=y[idx_test],
        num_classes=10,
        mean=(float(xt.mean()),) * channels,
        std=(float(xt.std()),) * channels,
        name="digits",
    )
