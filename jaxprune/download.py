"""Fetch CIFAR-10/100 from the official archives and write the offline layout `jaxprune.data`
reads (``jaxprune data cifar10``): no TensorFlow, no torchvision, only the standard library and
numpy.

Steps (:func:`prepare_cifar`): download the ``*-python.tar.gz`` archive over HTTP(S) into
``<data dir>/downloads/`` (a ``.part`` file that a rerun resumes with an HTTP ``Range`` request),
check its published MD5, read the pickled batches out of the tar, and write ``<data dir>/<name>/``
(``train_0.npz ..``, ``test.npz``, ``classes.txt``, ``SHA256SUMS``, ``README.md``) into a
temporary folder that is renamed into place only when complete.

The server is :data:`DEFAULT_BASE_URL` unless ``base_url`` or ``$JAXPRUNE_CIFAR_URL`` names
another (a mirror, or a local server in tests); the data dir is :func:`default_data_dir` unless
given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxprune.data import ENV_DATA_DIR, OFFICIAL_ARCHIVES, cache_root, classes_problem, shard_files, write_npz_shards

__all__ = [
    "CIFAR_ARCHIVES",
    "DEFAULT_BASE_URL",
    "ENV_CIFAR_URL",
    "CifarArchive",
    "DownloadError",
    "default_data_dir",
    "download_file",
    "read_cifar_archive",
    "prepare_cifar",
]

#: Where the official archives are published.
DEFAULT_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
#: Environment variable overriding :data:`DEFAULT_BASE_URL` (a mirror, or a local test server).
ENV_CIFAR_URL = "JAXPRUNE_CIFAR_URL"

_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class CifarArchive:
    """One official python-pickle archive: its file name, published MD5, the folder inside the
    tar, the batch files of each split, and the pickle keys of the labels and class names."""

    filename: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    num_classes: int


CIFAR_ARCHIVES = {
    "cifar10": CifarArchive(
        filename=OFFICIAL_ARCHIVES["cifar10"], md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py", train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch", meta="batches.meta", label_key="labels", names_key="label_names",
        num_classes=10),
    "cifar100": CifarArchive(
        filename=OFFICIAL_ARCHIVES["cifar100"], md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python", train=("train",), test="test", meta="meta",
        label_key="fine_labels", names_key="fine_label_names", num_classes=100),
}


class DownloadError(OSError):
    """A download that did not complete or did not verify (one-line message)."""


class _ConnectionLost(DownloadError):
    """The connection ended early; the bytes so far are in the ``.part`` file (resumable)."""


def default_data_dir() -> Path:
    """``$JAXPRUNE_DATA_DIR`` if set, else the per-user cache ``$XDG_CACHE_HOME/jaxprune``
    (``~/.cache/jaxprune``): where ``jaxprune data`` writes and `jaxprune.data.load_cifar` looks."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else cache_root()


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _progress_bar(total: int | None, initial: int, desc: str, show: bool | None):
    """A tqdm bar on a terminal (``show=None``: only if stderr is a tty), else None."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def _fetch_into(url: str, part: Path, timeout: float, progress: bool | None) -> None:
    """Append the rest of ``url`` to ``part`` (a ``Range`` request when ``part`` has bytes).
    Raises `DownloadError` when the connection ends before the announced length."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "jaxprune"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the .part already holds the whole file
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: cannot connect ({reason})") from None
    with resp:
        if offset and resp.status != 206:  # the server ignored Range: start over
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = _progress_bar(total, offset, Path(url).name, progress)
        got = offset
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, ValueError, http.client.HTTPException) as e:  # reset, timeout..
                        raise _ConnectionLost(f"{url}: connection lost after {got:,} bytes "
                                              f"({type(e).__name__})") from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and got < total:
        raise _ConnectionLost(f"{url}: connection lost after {got:,} of {total:,} bytes")


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with HTTP ``Range`` after a
    lost connection (up to ``retries`` times here; a later call resumes the same ``.part``).

    With ``md5`` the finished file must hash to it: on a mismatch the ``.part`` is deleted and a
    `DownloadError` says so. ``dest`` appears only complete (and verified). ``progress``: a tqdm
    bar (None: only when stderr is a terminal). Returns ``dest``."""
    dest = Path(dest)
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if dest.is_file() and (md5 is None or _md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, timeout, progress)
            break
        except DownloadError as e:
            if attempt == retries or not isinstance(e, _ConnectionLost):
                have = part.stat().st_size if part.exists() else 0
                hint = f"; {have:,} bytes kept in {part}, run again to resume" if have else ""
                raise DownloadError(f"{e}{hint}") from None
    if md5 is not None:
        got = _md5(part)
        if got != md5.lower():
            part.unlink()
            raise DownloadError(
                f"{url}: MD5 {got} does not match the published {md5}; the download was deleted, "
                f"run again (or check the server / mirror)")
    os.replace(part, dest)
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts, lists, strings, numpy arrays) and nothing else: an
    archive cannot run code through ``pickle`` here."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):  # numpy 1 pickles on numpy 2
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _load_batch(tar: tarfile.TarFile, member: str) -> dict[str, Any]:
    try:
        f = tar.extractfile(member)
    except KeyError:
        raise ValueError(f"{tar.name}: no {member} inside; not an official CIFAR python archive") from None
    raw = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def read_cifar_archive(path: str | os.PathLike, name: str):
    """``(x_train, y_train, x_test, y_test, class_names)`` from the official python archive
    ``path`` of ``name`` (``cifar10``/``cifar100``): images ``uint8 [N, 32, 32, 3]`` (NHWC) and
    ``uint8`` labels in the batches' order (CIFAR-100: the fine labels)."""
    spec = _spec(name)
    with tarfile.open(path, "r:gz") as tar:
        def split(members):
            xs, ys = [], []
            for m in members:
                b = _load_batch(tar, f"{spec.folder}/{m}")
                x = np.asarray(b["data"], np.uint8)
                if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                    raise ValueError(f"{path}: {m} data has shape {x.shape}, expected [N, 3072]")
                xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(b[spec.label_key], np.int64))
            return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

        x_train, y_train = split(spec.train)
        x_test, y_test = split([spec.test])
        names = _load_batch(tar, f"{spec.folder}/{spec.meta}")[spec.names_key]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    for y in (y_train, y_test):
        if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
            raise ValueError(f"{path}: labels outside 0..{spec.num_classes - 1}")
    if len(names) != spec.num_classes:
        raise ValueError(f"{path}: {len(names)} class names, expected {spec.num_classes}")
    return x_train, y_train.astype(np.uint8), x_test, y_test.astype(np.uint8), names


def _spec(name: str) -> CifarArchive:
    if name not in CIFAR_ARCHIVES:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(CIFAR_ARCHIVES)}")
    return CIFAR_ARCHIVES[name]


def _readme(name: str, source: str, md5: str, n_train: int, n_test: int, shards: int) -> str:
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    return (
        f"# {title}, offline copy\n\n"
        f"Written by `jaxprune data {name}` from `{source}` (MD5 {md5}): {n_train:,} training and "
        f"{n_test:,} test images, 32x32 RGB, lossless, in the order of the official batches.\n\n"
        f"| file | contents |\n|---|---|\n"
        f"| `train_0.npz` .. `train_{shards - 1}.npz` | 10,000 training images each, in order |\n"
        f"| `test.npz` | the test images |\n"
        f"| `classes.txt` | the class names, index = label |\n"
        f"| `SHA256SUMS` | checksums of the .npz files |\n\n"
        f"Each .npz (numpy `savez_compressed`) holds `x`: uint8 array (N, 32, 32, 3), NHWC, and "
        f"`y`: uint8 array (N,) of labels.\n"
    )


def prepare_cifar(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    archive: str | os.PathLike | None = None,
    base_url: str | None = None,
    md5: str | None = None,
    force: bool = False,
    keep_archive: bool = False,
    retries: int = 3,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Make ``<data_dir>/<name>/`` (the layout `jaxprune.data.load_cifar` reads) from the
    official archive: downloaded from ``base_url`` (else ``$JAXPRUNE_CIFAR_URL``, else
    :data:`DEFAULT_BASE_URL`), or read from ``archive`` (a copy you already have).

    ``data_dir`` defaults to :func:`default_data_dir`. The archive must have the published MD5
    (``md5`` overrides it). An existing complete copy is kept unless ``force``. The folder is
    written beside its final place and renamed in only when complete, so a failure leaves no
    half-written data set. The downloaded archive is deleted afterwards unless ``keep_archive``.
    Returns the data set folder."""
    spec = _spec(name)
    md5 = (md5 or spec.md5).lower()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    target = root / name
    if not force and shard_files(target) and classes_problem(target, spec.num_classes) is None:
        log(f"{name} is already in {target} (--force writes it again)")
        return target
    root.mkdir(parents=True, exist_ok=True)
    downloaded = None
    if archive is not None:
        src = Path(archive).expanduser()
        if not src.is_file():
            raise FileNotFoundError(f"archive {src} does not exist")
        got = _md5(src)
        if got != md5:
            raise ValueError(f"{src}: MD5 {got} is not the published {md5} of {spec.filename}")
        source = str(src)
    else:
        base = base_url or os.environ.get(ENV_CIFAR_URL) or DEFAULT_BASE_URL
        source = base.rstrip("/") + "/" + spec.filename
        log(f"downloading {source}")
        src = downloaded = download_file(source, root / "downloads" / spec.filename, md5,
                                         retries=retries, progress=progress)
    log(f"converting {src.name} into {target}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        x_tr, y_tr, x_te, y_te, names = read_cifar_archive(src, name)
        write_npz_shards(tmp, x_tr, y_tr, x_te, y_te, shard_size=10_000, class_names=names)
        shards = len(list(tmp.glob("train_*.npz")))
        (tmp / "README.md").write_text(_readme(name, source, md5, len(x_tr), len(x_te), shards))
        tmp.chmod(0o755)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=root))
            os.replace(target, old / name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if downloaded is not None and not keep_archive:
        downloaded.unlink()
        try:
            downloaded.parent.rmdir()
        except OSError:
            pass
    log(f"{name}: {len(x_tr):,} train / {len(x_te):,} test images in {target}")
    return target
