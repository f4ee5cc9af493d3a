"""Streamed ImageNet: the TFDS ``imagenet2012`` source (``array_record``, no TensorFlow), the
standard ResNet preprocessing (PIL/numpy), batch streams that `jaxprune.training.fit` trains on
and `jaxprune.evaluation.evaluate` evaluates (top-1 and top-5), and a generated TFDS-format
ImageNet for smoke runs.

A stream (`ImagenetStream`) is deterministic: batch ``k`` of epoch ``e`` is a pure function of
the source, ``(seed, e)`` and ``k``, so a run resumed mid-epoch (`fit`'s preemption checkpoint
records the step) reads exactly the batches it would have read. The protocol `fit` relies on:
``len(stream)`` batches per epoch, ``stream.num_examples``, ``stream.for_epoch(e)`` and
``stream.iter_from(k)`` (dicts ``image`` uint8 ``[B, S, S, 3]``, ``label`` int32 ``[B]``,
``mask`` float32 ``[B]``, 0 for the padding of an evaluation stream's last batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import importlib
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxprune._optional import require

from jaxprune.batching import epoch_batches, eval_batches
from jaxprune.data import ENV_DATA_DIR, IMAGENET_MEAN, IMAGENET_STD, tfds_module, tfds_where

def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of an Inception-style random crop.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in ``ratio``; after
    ``attempts`` misses, the largest central crop whose aspect ratio lies in ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_pil_rgb(image):
    Image = require("PIL.Image", "imagenet", "ImageNet preprocessing")

    if isinstance(image, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(image)))
        img.load()
    elif isinstance(image, Image.Image):
        img = image
    else:
        a = np.asarray(image)
        if a.dtype != np.uint8:
            raise ValueError(f"expected uint8 image, got {a.dtype}")
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        elif a.ndim == 3 and a.shape[-1] == 4:
            a = a[..., :3]
        img = Image.fromarray(a)
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_imagenet_train(image, rng: np.random.Generator, image_size: int = 224) -> np.ndarray:
    """Random-resized-crop (area 0.08..1, aspect 3/4..4/3) to ``image_size``, bilinear, then a
    random horizontal flip. ``image``: uint8 HWC array, encoded bytes or PIL image. -> uint8 HWC."""
    Image = require("PIL.Image", "imagenet", "ImageNet preprocessing")

    img = _to_pil_rgb(image)
    top, left, h, w = random_resized_crop_box(rng, img.height, img.width)
    out = img.resize(
        (image_size, image_size), resample=Image.BILINEAR, box=(left, top, left + w, top + h)
    )
    a = np.asarray(out, np.uint8)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


def preprocess_imagenet_eval(image, image_size: int = 224, resize_size: int = 256) -> np.ndarray:
    """Resize the shorter side to ``resize_size`` (bilinear), center crop ``image_size``."""
    Image = require("PIL.Image", "imagenet", "ImageNet preprocessing")

    if resize_size < image_size:
        raise ValueError(f"resize_size {resize_size} < image_size {image_size}")
    img = _to_pil_rgb(image)
    w, h = img.width, img.height
    if h <= w:
        nh, nw = resize_size, int(resize_size * w / h)
    else:
        nw, nh = resize_size, int(resize_size * h / w)
    a = np.asarray(img.resize((nw, nh), resample=Image.BILINEAR), np.uint8)
    top = int(round((nh - image_size) / 2.0))
    left = int(round((nw - image_size) / 2.0))
    return np.ascontiguousarray(a[top : top + image_size, left : left + image_size])


def _imagenet_not_found(name: str, split: str, looked: Sequence[str]) -> FileNotFoundError:
    where = "\n  - ".join(looked)
    return FileNotFoundError(
        f"{name} split {split!r} not found (`jaxprune data {name}` prints how to prepare it). "
        f"Looked in:\n  - {where}\n"
        f"Prepare it once in the array_record format (TFDS cannot download ImageNet; reading the "
        f"prepared copy needs no TensorFlow, preparing it does):\n"
        f"  1. pip install 'jaxprune[imagenet]' tensorflow-cpu\n"
        f"  2. put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/\n"
        f"  3. run `tfds build {name} --data_dir=<data_dir> --file_format=array_record`\n"
        f"then pass data_dir=<data_dir> (CLI: --data_dir), or set {ENV_DATA_DIR}=<data_dir> or "
        f"TFDS_DATA_DIR=<data_dir>, or pass source=<sequence of {{'image', 'label'}} dicts>."
    )


def _open_tfds_source(name: str, split: str, data_dir) -> Sequence[Mapping[str, Any]]:
    """The random-access TFDS source of ``name``/``split``: in ``data_dir`` if given, else in
    ``$JAXPRUNE_DATA_DIR`` and then TFDS's default data dir (first prepared copy wins)."""
    tfds = tfds_module()
    if tfds is None:
        raise _imagenet_not_found(name, split, [
            "tensorflow-datasets is not installed (pip install 'jaxprune[imagenet]')"])
    if data_dir is not None:
        candidates = [os.fspath(Path(data_dir).expanduser())]
    else:
        env = os.environ.get(ENV_DATA_DIR)
        candidates = ([os.fspath(Path(env).expanduser())] if env else []) + [None]
    looked = []
    for dd in candidates:
        where = tfds_where(dd)
        try:
            builder = tfds.builder(name, data_dir=dd)
        except Exception as e:
            looked.append(f"{where}: {type(e).__name__}: {e}")
            continue
        if not builder.is_prepared():
            looked.append(f"{where}: no prepared {name} in {builder.data_dir}")
            continue
        base_split = split.split("[")[0]  # "train[:1%]" slices the "train" split
        if base_split not in builder.info.splits:
            raise ValueError(f"{name} has no split {base_split!r}; it has {sorted(builder.info.splits)}")
        try:  # keep the JPEG bytes: decoding happens in the worker threads, with the crop
            return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        except Exception:
            pass
        try:
            return builder.as_data_source(split=split)
        except Exception as e:  # e.g. prepared as TFRECORD: no random access without TF
            looked.append(
                f"{where}: cannot open {builder.data_dir} for random access ({type(e).__name__}: "
                f"{e}); it must be prepared with --file_format=array_record"
            )
    raise _imagenet_not_found(name, split, looked)


def _grain_module():
    """Grain's dataset API (``grain`` >= 0.2.6 exposes it at top level, older ``grain.python``)."""
    for mod in ("grain", "grain.python"):
        try:
            g = importlib.import_module(mod)
        except Exception:
            continue
        if hasattr(g, "MapDataset") and hasattr(g, "ReadOptions"):
            return g
    return None


class ImagenetStream:
    """Iterable of preprocessed batches (see :func:`imagenet_pipeline`); ``len()`` = batches.

    Batch ``k`` is a pure function of the source, ``(seed, epoch)`` and ``k`` (order from
    :func:`epoch_batches`/:func:`eval_batches`, per-example randomness from
    ``(seed, epoch, index)``), so both backends -- grain's ``MapDataset`` (a batch per thread) and
    the plain thread pool (the examples of a batch across threads) -- yield the same batches.
    """

    def __init__(
        self,
        source: Sequence[Mapping[str, Any]],
        batch_size: int,
        *,
        train: bool,
        image_size: int,
        resize_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        drop_last: bool,
        num_workers: int,
        backend: str = "threads",
    ):
        if backend not in ("grain", "threads"):
            raise ValueError(f"backend must be 'grain' or 'threads', got {backend!r}")
        if backend == "grain" and _grain_module() is None:
            raise ValueError("backend='grain' needs grain installed (pip install grain)")
        if batch_size <= 0 or image_size <= 0:
            raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
        self.source = source
        self.batch_size = int(batch_size)
        self.train = train
        self.image_size = int(image_size)
        self.resize_size = int(resize_size)
        self.seed, self.epoch = int(seed), int(epoch)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_workers = max(1, int(num_workers))
        self.backend = backend
        self.num_examples = len(source)
        if shuffle:
            batches = epoch_batches(self.num_examples, self.batch_size, self.seed, self.epoch, drop_last)
            self._batches = [(np.asarray(b), np.ones(len(b), np.float32)) for b in batches]
        else:
            # An incomplete last batch is padded with example 0 at weight 0 (eval_batches).
            idx, w = eval_batches(self.num_examples, self.batch_size)
            if drop_last:
                keep = int(np.sum(w.min(axis=1) > 0))
                idx, w = idx[:keep], w[:keep]
            self._batches = list(zip(idx, w))

    def __len__(self) -> int:
        return len(self._batches)

    def for_epoch(self, epoch: int) -> "ImagenetStream":
        """The same stream for epoch ``epoch`` (its order and augmentation)."""
        return ImagenetStream(self.source, self.batch_size, train=self.train,
                              image_size=self.image_size, resize_size=self.resize_size,
                              seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                              drop_last=self.drop_last, num_workers=self.num_workers,
                              backend=self.backend)

    def iter_from(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches from batch ``start`` on (a resumed epoch skips the ones it trained on
        without reading them)."""
        if not 0 <= start <= len(self._batches):
            raise ValueError(f"start={start}: this stream has {len(self._batches)} batches")
        if start == len(self._batches):
            return iter(())
        return self._iter_grain(start) if self.backend == "grain" else self._iter_threads(start)

    def _read(self, idx: np.ndarray):
        ids = [int(i) for i in idx]
        getitems = getattr(self.source, "__getitems__", None)
        if getitems is not None:
            return list(getitems(ids))
        return [self.source[i] for i in ids]

    def _process(self, item: Mapping[str, Any], index: int) -> np.ndarray:
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            return preprocess_imagenet_train(item["image"], rng, self.image_size)
        return preprocess_imagenet_eval(item["image"], self.image_size, self.resize_size)

    @staticmethod
    def _labels(items) -> np.ndarray:
        return np.asarray([int(e["label"]) for e in items], np.int32)

    def load_batch(self, k: int) -> dict[str, np.ndarray]:
        """Batch ``k`` of this epoch, computed in the calling thread."""
        idx, mask = self._batches[k]
        items = self._read(idx)
        images = np.stack([self._process(e, int(i)) for e, i in zip(items, idx)])
        return {"image": images, "label": self._labels(items), "mask": mask}

    def _submit(self, pool, idx):
        items = self._read(idx)
        futs = [pool.submit(self._process, e, int(i)) for e, i in zip(items, idx)]
        return futs, self._labels(items)

    def _iter_threads(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending = self._submit(pool, self._batches[start][0])
            for k in range(start, len(self._batches)):
                futs, labels = pending
                if k + 1 < len(self._batches):  # prefetch the next batch while this one finishes
                    pending = self._submit(pool, self._batches[k + 1][0])
                images = np.stack([f.result() for f in futs])
                yield {"image": images, "label": labels, "mask": self._batches[k][1]}

    def _iter_grain(self, start: int) -> Iterator[dict[str, np.ndarray]]:
        g = _grain_module()
        ds = g.MapDataset.range(start, len(self._batches)).map(self.load_batch)
        opts = g.ReadOptions(num_threads=self.num_workers, prefetch_buffer_size=2 * self.num_workers)
        yield from ds.to_iter_dataset(opts)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iter_from(0)


def imagenet_pipeline(
    split: str,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    train: bool = True,
    *,
    seed: int = 0,
    epoch: int = 0,
    resize_size: int | None = None,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    num_workers: int | None = None,
    backend: str | None = None,
    dataset_name: str = "imagenet2012",
    source: Sequence[Mapping[str, Any]] | None = None,
) -> ImagenetStream:
    """Stream ImageNet batches with the standard ResNet preprocessing, without TensorFlow.

    Reads ``tfds.data_source(dataset_name)`` (the ``array_record`` format) from ``data_dir``
    (default: ``$JAXPRUNE_DATA_DIR``, then TFDS's data dir), or any ``source`` sequence of
    ``{'image', 'label'}`` dicts (image: uint8 HWC array, encoded JPEG/PNG bytes or PIL image).
    ``train=True``: random resized crop to ``image_size`` (area 0.08..1, aspect 3/4..4/3) + random
    flip, shuffled with :func:`epoch_batches` ``(seed, epoch)``, incomplete tail dropped;
    per-example randomness is seeded by ``(seed, epoch, index)`` so it does not depend on thread
    timing.  ``train=False``: resize the shorter side to ``resize_size`` (default
    ``image_size * 256 / 224``), center crop, sequential order, last batch padded (mask 0) like
    :func:`eval_batches`.  ``backend``: ``'grain'`` or ``'threads'`` (default: grain when it is
    installed); both give identical batches.

    Returns an iterable (``len()`` = number of batches) of dicts ``image`` uint8
    ``[B, S, S, 3]``, ``label`` int32 ``[B]``, ``mask`` float32 ``[B]``; normalise on device with
    ``normalize(batch['image'], IMAGENET_MEAN, IMAGENET_STD)``.  Raises ``FileNotFoundError`` with
    preparation instructions when the data set is not prepared.
    """
    if source is None:
        source = _open_tfds_source(dataset_name, split, data_dir)
    if resize_size is None:
        resize_size = int(round(image_size * 256 / 224))
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    if num_workers is None:
        num_workers = min(16, os.cpu_count() or 1)
    if backend is None:
        backend = "grain" if _grain_module() is not None else "threads"
    return ImagenetStream(
        source,
        batch_size,
        train=train,
        image_size=image_size,
        resize_size=resize_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        backend=backend,
    )


# --------------------------------------------------------------------------------------------
# A streamed data set for the experiments
# --------------------------------------------------------------------------------------------


class _Subset(Sequence):
    """The first ``n`` examples of a random-access source (smoke runs)."""

    def __init__(self, source: Sequence, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.source[i % self.n]

    def __getitems__(self, ids):
        getitems = getattr(self.source, "__getitems__", None)
        return list(getitems(ids)) if getitems else [self.source[i] for i in ids]


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
    """A classification data set streamed from storage: the ``train`` stream (epoch 0; `fit`
    moves it to each epoch with ``for_epoch``) and the ``test`` stream, with the per-channel
    normalisation constants (0..1 units) the model needs. Built by `load_imagenet`."""

    train: ImagenetStream
    test: ImagenetStream
    num_classes: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = "imagenet2012"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.train.image_size, self.train.image_size, 3)

    @property
    def num_train(self) -> int:
        return self.train.num_examples

    @property
    def num_test(self) -> int:
        return self.test.num_examples


def _num_classes(source: Sequence, default: int) -> int:
    info = getattr(source, "dataset_info", None)
    try:
        return int(info.features["label"].num_classes)
    except Exception:
        return default


def load_imagenet(batch_size: int, eval_batch_size: int, *, image_size: int = 224, seed: int = 0,
                  data_dir: str | os.PathLike | None = None, train_subset: int = 0,
                  test_subset: int = 0, name: str = "imagenet2012",
                  num_workers: int | None = None) -> StreamedDataset:
    """ImageNet as a `StreamedDataset`: TFDS ``name`` splits ``train`` and ``validation``
    (found as `imagenet_pipeline` finds them), the ResNet train preprocessing shuffled by
    ``(seed, epoch)``, the eval preprocessing in order with the last batch padded;
    ``train_subset``/``test_subset`` > 0 keep only the first examples (smoke runs)."""
    train_src = _open_tfds_source(name, "train", data_dir)
    test_src = _open_tfds_source(name, "validation", data_dir)
    classes = _num_classes(train_src, 1000)
    if train_subset:
        train_src = _Subset(train_src, train_subset)
    if test_subset:
        test_src = _Subset(test_src, test_subset)
    common = dict(image_size=image_size, num_workers=num_workers)
    return StreamedDataset(
        train=imagenet_pipeline("train", batch_size, train=True, seed=seed, source=train_src, **common),
        test=imagenet_pipeline("validation", eval_batch_size, train=False, source=test_src, **common),
        num_classes=classes, name=name)


def write_synthetic_imagenet(data_dir: str | os.PathLike, num_train: int = 64,
                             num_validation: int = 32, *, num_classes: int = 1000,
                             classes_used: int = 4, seed: int = 0) -> Path:
    """Writes a tiny ``imagenet2012`` in the TFDS ``array_record`` layout under ``data_dir``
    (what ``tfds build imagenet2012 --file_format=array_record`` would leave there) and returns
    ``data_dir``: JPEGs of assorted sizes (40..120 px), labels cycling over the first
    ``classes_used`` of ``num_classes`` classes, each class its own mean colour plus noise (so a
    model can learn something). Preparing needs no TensorFlow. An existing copy is reused."""
    import tensorflow_datasets as tfds  # noqa: PLC0415
    Image = require("PIL.Image", "imagenet", "ImageNet preprocessing")

    data_dir = Path(data_dir)
    name = "imagenet2012"
    try:
        version = str(tfds.builder_cls(name).VERSION)
    except Exception:
        version = "5.1.0"
    if (data_dir / name / version / "dataset_info.json").is_file():
        return data_dir
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, (classes_used, 3))

    def examples(split: str, n: int):
        for i in range(n):
            label = i % classes_used
            h, w = (int(v) for v in rng.integers(40, 121, 2))
            img = np.clip(colours[label] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            yield f"{split}_{i}", {"image": buf.getvalue(), "label": label,
                                   "file_name": f"{split}_{i:05d}.JPEG"}

    splits = {"train": num_train, "validation": num_validation}

    class SyntheticImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        url_infos = None  # nothing to download (and no checksums file to look up)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {s: examples(s, n) for s, n in splits.items()}

        def _generate_examples(self, split):  # pragma: no cover - _split_generators yields
            raise NotImplementedError

    SyntheticImagenet.name = name
    SyntheticImagenet(data_dir=os.fspath(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


__all__ = [
    "random_resized_crop_box",
    "preprocess_imagenet_train",
    "preprocess_imagenet_eval",
    "ImagenetStream",
    "imagenet_pipeline",
    "StreamedDataset",
    "load_imagenet",
    "write_synthetic_imagenet",
]
