"""Streamed data through the training loop (`jaxprune.imagenet`): deterministic streams that
resume mid-epoch, streamed evaluation with top-5 equal to the in-memory one, `fit` on a stream
resumed bitwise after a stop, and an ImageNet-format run end to end on generated TFDS data."""

from __future__ import annotations

import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import untimed

from jaxprune import data, evaluation, imagenet, optim, parallel, train_step
from jaxprune import training as tr
from tests.test_training import PREPROCESS, ToyPrune, _batch, tiny  # noqa: F401


def _source(n: int, seed: int, classes: int = 3) -> list[dict]:
    """``n`` random 8x8 uint8 images with labels in ``0..classes-1``."""
    x, _ = _batch(n, seed)
    y = np.random.default_rng(seed).integers(0, classes, n)
    return [{"image": x[i], "label": int(y[i])} for i in range(n)]


def _train_stream(n=48, batch=16, seed=5):
    return imagenet.imagenet_pipeline("train", batch, image_size=8, source=_source(n, 1), seed=seed,
                                      backend="threads", num_workers=2)


def test_a_stream_resumes_at_any_batch_and_changes_with_the_epoch():
    s = _train_stream()
    assert len(s) == 3 and s.num_examples == 48
    e1 = list(s.for_epoch(1))
    tail = list(s.for_epoch(1).iter_from(2))
    assert len(tail) == 1
    for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(tail[0][key], e1[2][key])
    e0 = list(s.for_epoch(0))
    assert not np.array_equal(e0[0]["image"], e1[0]["image"])  # another order and augmentation
    assert list(s.iter_from(3)) == []
    with pytest.raises(ValueError, match="start=4"):
        s.iter_from(4)


class TenClasses(nn.Module):
    """conv(8) -> relu -> GAP -> fc(10): enough classes for top-5 to mean something."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        return nn.Dense(10, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_streamed_evaluation_equals_in_memory_evaluation_and_counts_top5():
    """37 images of 8x8 (resize and crop are the identity at 8/8), batches of 16: the last one
    padded (mask 0). Top-1, top-5 and loss equal the in-memory evaluation; top-5 equals a numpy
    count on the logits."""
    model = TenClasses()
    src = _source(37, 4, classes=10)
    x = np.stack([e["image"] for e in src])
    y = np.asarray([e["label"] for e in src], np.int32)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    stream = imagenet.imagenet_pipeline("validation", 16, image_size=8, resize_size=8, train=False,
                                        source=src, backend="threads")
    assert len(stream) == 3
    got = evaluation.evaluate(model, variables, stream, None, 0, preprocess=PREPROCESS)
    ref = evaluation.evaluate(model, variables, x, y, 16, preprocess=PREPROCESS)
    assert got["accuracy"] == ref["accuracy"] and got["top5"] == ref["top5"]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6)
    logits = np.asarray(model.apply(variables, PREPROCESS(jnp.asarray(x))))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert ref["top5"] == float(np.mean([y[i] in top5[i] for i in range(37)]))
    assert ref["accuracy"] == float(np.mean(logits.argmax(1) == y))
    assert 0 < ref["accuracy"] < ref["top5"] < 1  # the two counts really differ here


def _stream_fit(tiny, manager=None, stop_after=None, monkeypatch=None):
    model, graph = tiny
    stream = _train_stream()
    pruner = ToyPrune().pruner(graph, 2, len(stream))
    opt = optim.make_optimizer(optim.step_schedule(len(stream), base_lr=0.1, boundaries=(1,), factor=0.5))
    mesh = parallel.make_mesh(jax.devices()[:1])
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11),
                                          np.zeros((1, 8, 8, 3), np.uint8), opt)
    if stop_after is not None:  # a SIGTERM delivered after step `stop_after`
        real, calls = train_step.make_train_step, []

        def signalling(*a, **k):
            step = real(*a, **k)

            def wrapped(*args):
                out = step(*args)
                calls.append(1)
                if len(calls) == stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out

            wrapped.mesh, wrapped.jitted = step.mesh, step.jitted
            return wrapped

        monkeypatch.setattr(train_step, "make_train_step", signalling)
    test = imagenet.imagenet_pipeline("validation", 16, image_size=8, resize_size=8, train=False,
                                      source=_source(20, 9), backend="threads")
    augment = lambda rng, images: PREPROCESS(images)  # noqa: E731  (the stream augments)
    return tr.fit(model, graph, pruner, fresh, opt, stream, test, tr.FitOptions(
        epochs=2, batch_size=16, seed=3, augment=augment, preprocess=PREPROCESS, progress=False,
        mesh=mesh, checkpoint_manager=manager))


def test_fit_on_a_stream_resumes_mid_epoch_exactly(tiny, tmp_path, monkeypatch):
    """A stop after step 4 (epoch 2, step 1) saves the preemption checkpoint with the data
    position; the rerun reads only the remaining batches and ends with the bits of the
    uninterrupted run. Every step runs under the host-to-device transfer guard (batches are
    placed explicitly)."""
    from jaxprune.checkpoints import make_checkpoint_manager

    ref, ref_hist = _stream_fit(tiny)
    assert [h["epoch"] for h in ref_hist] == [0, 1] and "test_top5" in ref_hist[0]
    manager = make_checkpoint_manager(tmp_path / "ck", max_to_keep=2, async_save=True)
    try:
        with pytest.raises(tr.Preempted, match="epoch 2, step 1"):
            _stream_fit(tiny, manager, stop_after=4, monkeypatch=monkeypatch)
        monkeypatch.undo()
        meta = json.loads((tmp_path / "ck" / "preempt" / "meta.json").read_text())
        assert (meta["epoch"], meta["resume_step"]) == (1, 1)  # the data position
        reads = []
        real_iter = imagenet.ImagenetStream.iter_from

        def counting(self, start):
            reads.append((self.epoch, start))
            return real_iter(self, start)

        monkeypatch.setattr(imagenet.ImagenetStream, "iter_from", counting)
        state, hist = _stream_fit(tiny, manager)
    finally:
        manager.close()
    assert (1, 1) in reads and (1, 0) not in reads  # the resumed epoch skips what it trained on
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert untimed(hist) == untimed(ref_hist)


def test_fit_refuses_a_stream_of_another_batch_size(tiny):
    model, graph = tiny
    with pytest.raises(ValueError, match="batches of 16, but fit was asked for batch_size=8"):
        tr.fit(model, graph, ToyPrune().pruner(graph, 1, 3), None, None, _train_stream(),
               None, tr.FitOptions(epochs=1, batch_size=8))


@pytest.fixture(scope="module")
def synthetic_imagenet(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets")
    root = tmp_path_factory.mktemp("synthetic_imagenet")
    return imagenet.write_synthetic_imagenet(root, num_train=32, num_validation=16)


def test_write_synthetic_imagenet_is_read_as_imagenet2012(synthetic_imagenet):
    ds = imagenet.load_imagenet(8, 8, image_size=32, data_dir=synthetic_imagenet)
    assert (ds.num_train, ds.num_test, ds.num_classes, ds.image_shape) == (32, 16, 1000, (32, 32, 3))
    labels = np.concatenate([b["label"] for b in ds.test])
    assert sorted(labels.tolist()) == sorted([i % 4 for i in range(16)])
    b = next(iter(ds.train))
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    # written once: a second call reuses the copy
    stamp = os.path.getmtime(next(synthetic_imagenet.glob("imagenet2012/*/dataset_info.json")))
    imagenet.write_synthetic_imagenet(synthetic_imagenet)
    assert os.path.getmtime(next(synthetic_imagenet.glob("imagenet2012/*/dataset_info.json"))) == stamp


def test_an_imagenet_run_streams_end_to_end(synthetic_imagenet, tmp_path):
    """`experiment.run` on imagenet2012 (generated TFDS copy): streamed training with SFP's
    re-selection, streamed evaluation (top-1 and top-5), compaction, record."""
    from jaxprune import config as config_lib
    from jaxprune.commands.evaluate import evaluate_path
    from jaxprune.experiment import run

    c = config_lib.base_config()
    c.update(name="stream", model="resnet20", dataset="imagenet2012", data_dir=str(synthetic_imagenet),
             image_size=32, epochs=2, batch_size=8, eval_batch_size=8, keep_checkpoints=1)
    c.optimizer.schedule = "cosine"
    c.optimizer.base_lr = 0.05
    c.method.name, c.method.rate = "sfp", 0.5
    res = run(c, tmp_path / "run", progress=False)
    assert res["compact_accuracy"] == res["masked_accuracy"] and res["compact_top5"] == res["masked_top5"]
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [4, 8] and all("test_top5" in h for h in hist)
    assert res["macs_reduction_conv"] > 0.4
    assert res["dataset"] == "imagenet2012" and res["normalization"]["mean"] == list(data.IMAGENET_MEAN)
    ev = evaluate_path(tmp_path / "run", data_dir=str(synthetic_imagenet))  # `jaxprune eval`
    assert (ev["accuracy"], ev["top5"]) == (res["compact_accuracy"], res["compact_top5"])
