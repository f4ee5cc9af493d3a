"""Bad runs never poison a run directory: divergence stops training before anything is saved
from the non-finite state, refused commands leave the directory byte for byte unchanged, unusable
work directories are named in one line, and the API refuses inputs that would be silently wrong."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config_source, untimed
from jaxprune import augment, cli, evaluation, optim, train_step, training
from jaxprune.compaction import compact
from jaxprune.graph import trace_linen
from jaxprune.pruner import MaskState, zero_count
from jaxprune.masks import apply_masks, init_masks
from jaxprune.models import get_model

TINY = tiny_config_source(epochs=1, train_subset=128)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.py"
    p.write_text(TINY)
    return p


def snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` with the SHA-256 of its bytes (directories as ``'dir'``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained_run(tiny_config, tmp_path_factory):
    work = tmp_path_factory.mktemp("runs") / "good"
    assert cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress"]) == 0
    return work


def test_divergence_stops_with_a_clear_error_and_writes_nothing_from_it(tiny_config, tmp_path, capsys):
    work = tmp_path / "nan"
    rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress",
                   "--config.optimizer.base_lr=1e6", "--config.epochs=2"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DIVERGED, err
    import re

    m = re.search(r"training diverged: .* epoch (\d+) \(optimizer step \d+\)", err)
    assert m and err.count("\n") == 1, err
    bad_epoch = int(m.group(1))
    assert not (work / "compact").exists() and not (work / "result.json").exists()
    ckpts = work / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []
    # Orbax step k holds the state after epoch k: only the epochs before the diverged one
    assert all(k < bad_epoch for k in steps), (steps, bad_epoch)
    metrics = (work / "metrics.jsonl").read_text().splitlines() if (work / "metrics.jsonl").exists() else []
    assert len(metrics) == len(steps)


def test_check_finite_names_the_quantity():
    state = train_step.TrainState(step=jnp.int32(7), params={"w": jnp.array([1.0, jnp.nan])},
                                batch_stats={}, opt_state=(), prune=MaskState({}, {}, zero_count()),
                                rng=jax.random.PRNGKey(0))
    with pytest.raises(training.DivergenceError, match=r"params .* after epoch 3 \(optimizer step 7\)"):
        training.check_finite(state, {"loss": 0.5}, epoch=2)
    ok = state.replace(params={"w": jnp.ones(2)})
    with pytest.raises(training.DivergenceError, match="loss of epoch 1 is inf"):
        training.check_finite(ok, {"loss": float("inf")}, epoch=0)
    training.check_finite(ok, {"loss": 0.5}, epoch=0)


@pytest.mark.parametrize("override, named", [
    ("--config.model=resnet32", "model"),
    ("--config.method.name=dense", "method"),
    ("--config.epochs=3", "--allow-schedule-change"),
    ("--config.optimizer.base_lr=0.5", "optimizer"),
])
def test_a_refused_command_leaves_the_run_directory_unchanged(tiny_config, trained_run, capsys,
                                                             override, named):
    before = snapshot(trained_run)
    rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(trained_run), "--no-progress",
                   override])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and named in err and err.count("\n") == 1, err
    assert snapshot(trained_run) == before


def test_an_allowed_schedule_change_is_recorded(tiny_config, trained_run, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(trained_run, work)
    assert cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress",
                     "--config.epochs=2", "--allow-schedule-change"]) == 0
    (line,) = (work / "config_changes.jsonl").read_text().splitlines()
    assert json.loads(line)["changes"]["epochs"] == [1, 2]
    assert json.loads((work / "config.json").read_text())["epochs"] == 2
    assert json.loads((work / "result.json").read_text())["from_state"]["epochs_done"] == 2


def test_unusable_workdirs_are_named_in_one_line(tiny_config, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    for work in (f, f / "under"):
        rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == cli.EXIT_USAGE and str(work) in err and err.count("\n") == 1, err
    assert f.read_text() == "x"


def test_non_finite_config_values_are_refused(tiny_config, tmp_path, capsys):
    rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(tmp_path / "w"),
                   "--config.optimizer.base_lr=1e999"])
    assert rc == cli.EXIT_USAGE and "optimizer.base_lr=inf" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- API boundaries


@pytest.fixture(scope="module")
def r20():
    model = get_model("resnet20")
    x = jnp.zeros((1, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
    return model, variables, trace_linen(model, variables, x)


def test_apply_masks_refuses_a_tree_of_another_model_or_prefix(r20):
    model, variables, graph = r20
    masks = init_masks(graph)
    with pytest.raises(ValueError, match="prefix=\\('params',\\)"):
        apply_masks(variables["params"], masks, graph)  # the prefix forgotten
    r32 = get_model("resnet32")
    v32 = jax.eval_shape(lambda: r32.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    with pytest.raises(ValueError, match="not variables the graph was traced with"):
        apply_masks(v32, masks, graph)
    wide = jax.tree.map(lambda a: a, variables)
    wide["params"]["fc"]["bias"] = jnp.ones((11,))
    with pytest.raises(ValueError, match=r"fc/bias has shape \(11,\) .* \(10,\)"):
        apply_masks(wide, masks, graph)
    apply_masks(variables["params"], masks, graph, prefix=("params",))  # the right way works


def test_compact_refuses_an_empty_group(r20):
    model, variables, graph = r20
    masks = init_masks(graph)
    name = next(iter(masks))
    masks[name] = jnp.zeros_like(masks[name])
    with pytest.raises(ValueError, match=f"group '{name}' keeps no channel"):
        compact(model, variables, masks, graph)


def test_bad_evaluation_batch_and_model_arguments():
    model = get_model("resnet20")
    with pytest.raises(ValueError, match="batch size -5"):
        evaluation.evaluate(model, {}, np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32), -5)
    with pytest.raises(ValueError, match="num_classes=0"):
        get_model("resnet20", num_classes=0)


@pytest.mark.parametrize("requested, n, devices, want", [
    (500, 10000, 8, 496), (500, 10000, 1, 500), (500, 10, 8, 16), (3, 10000, 8, 8), (1000, 70, 1, 70)])
def test_eval_batch_is_a_device_multiple_bounded_by_the_request(requested, n, devices, want):
    assert evaluation.eval_batch_size(requested, n, devices) == want


# ----------------------------------------------------------------------------- checkpoints


def _tiny_fit(tmp_path, epochs, ckpt_dir, writer=None, max_to_keep=5):
    from jaxprune import data as data_lib
    from jaxprune.checkpoints import make_checkpoint_manager
    from jaxprune.methods import get_method

    ds = data_lib.load_digits_dataset(image_size=8)
    model = get_model("resnet20")
    x = jnp.zeros((1, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    graph = trace_linen(model, variables, x)
    opt = optim.make_optimizer(0.05)
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), x, opt)
    pruner = get_method("sfp", rate=0.3).pruner(graph, epochs, 2)
    mgr = make_checkpoint_manager(ckpt_dir, max_to_keep=max_to_keep)
    try:
        return training.fit(model, graph, pruner, state, opt,
                            (ds.x_train[:128], ds.y_train[:128]), None, training.FitOptions(
            epochs=epochs, batch_size=64,
            augment=functools.partial(augment.augment_batch, mean=ds.mean, std=ds.std, pad=0,
                                      flip=False),
            checkpoint_manager=mgr, progress=False, metrics_writer=writer))
    finally:
        mgr.close()


@pytest.fixture(scope="module")
def two_epoch_checkpoints(tmp_path_factory):
    ckpts = tmp_path_factory.mktemp("two") / "ck"
    _tiny_fit(None, 2, ckpts)
    return ckpts


@pytest.mark.parametrize("damage", ["truncate_array", "garbage_meta", "drop_meta"])
def test_resume_falls_back_past_a_corrupt_step_and_sets_it_aside(tmp_path, capfd, damage,
                                                                two_epoch_checkpoints, unraisables):
    import shutil

    ckpts = tmp_path / "ck"
    shutil.copytree(two_epoch_checkpoints, ckpts)
    step2 = ckpts / "2"
    if damage == "truncate_array":
        files = [p for p in (step2 / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
        for p in files:
            p.write_bytes(p.read_bytes()[:10])
    elif damage == "garbage_meta":
        for p in (step2 / "meta").rglob("*"):
            if p.is_file():
                p.write_text("{not json")
    else:
        shutil.rmtree(step2 / "meta")
    _, hist3 = _tiny_fit(tmp_path, 3, ckpts)
    out, err = capfd.readouterr()
    assert_quiet(err)
    import gc

    gc.collect()
    assert unraisables == []
    assert "checkpoint step 2" in out and "unreadable" in out and "resuming from step 1" in out
    assert [h["epoch"] for h in hist3] == [0, 1, 2]  # epoch 1 redone from step 1
    assert (ckpts / "corrupt-2-0").is_dir(), "the damaged step is kept, set aside"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [1, 2, 3]


def test_metrics_are_rebuilt_from_the_checkpoint_on_resume(tmp_path):
    from jaxprune.metrics_log import MetricsWriter

    writer = MetricsWriter(tmp_path)
    _tiny_fit(tmp_path, 2, tmp_path / "ck", writer)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + '{"epoch": 1, "tor')  # a lost + torn line
    _tiny_fit(tmp_path, 3, tmp_path / "ck", MetricsWriter(tmp_path))
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_a_stale_temporary_compact_dir_is_cleaned_up(tmp_path):
    from jaxprune.artifact import load, save_compact

    model = get_model("resnet20")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    stale = tmp_path / ".compact.tmp-deadbeef"
    (stale / "variables.orbax-checkpoint-tmp-1").mkdir(parents=True)
    save_compact(tmp_path / "compact", model, variables, {"input_shape": [8, 8, 3]})
    assert not stale.exists()
    load(tmp_path / "compact")


# ----------------------------------------------------------------------------- preemption

# 16 steps per epoch, one per call (the fast program on CPU): a stop lands between steps
PREEMPT_CFG = tiny_config_source(epochs=3, train_subset=1024, steps_per_call=1)


def _final_state(work: Path):
    from jaxprune.commands.compact import restore_run

    _, state, meta, _, _ = restore_run(work)
    return state, meta


@pytest.mark.parametrize("signal_after, message", [
    (24, "stopped by SIGTERM at epoch 2, step 8; a checkpoint of epoch 2, step 8 was saved"),
    (16, "stopped by SIGTERM at the end of epoch 1; its checkpoint was saved"),
])
def test_sigterm_stops_saves_and_the_rerun_resumes_exactly(tmp_path, monkeypatch, capfd,
                                                           signal_after, message):
    """A SIGTERM delivered to the process after step ``signal_after`` (16 per epoch): inside
    epoch 2, or in the last step of epoch 1. A repeated SIGTERM while the checkpoint is
    written is ignored; the rerun ends bitwise where an uninterrupted run ends."""
    import os
    import signal

    from jaxprune import checkpoints

    cfg = tmp_path / "p.py"
    cfg.write_text(PREEMPT_CFG)
    ref, work = tmp_path / "ref", tmp_path / "pre"
    args = lambda w: ["train", "--config", str(cfg), "--workdir", str(w), "--no-progress"]  # noqa: E731
    assert cli.main(args(ref)) == 0
    real_chunk, real_save = train_step.make_train_chunk, checkpoints.save_preempt
    calls = []

    def signalling(*a, **k):
        fn = real_chunk(*a, **k)

        def chunk(*xs):
            out = fn(*xs)
            calls.append(fn.steps)
            if len(calls) == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        chunk.steps, chunk.with_steps = fn.steps, fn.with_steps
        return chunk

    def repeated(*a, **k):  # as by `pkill` twice: the second one lands while it saves
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*a, **k)

    monkeypatch.setattr(train_step, "make_train_chunk", signalling)
    monkeypatch.setattr(checkpoints, "save_preempt", repeated)
    capfd.readouterr()
    assert cli.main(args(work)) == cli.EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert_quiet(err)
    assert calls == [1] * signal_after
    assert not (work / "result.json").exists()
    assert (work / "checkpoints" / "preempt").exists() == (signal_after % 16 != 0)
    monkeypatch.undo()
    assert cli.main(args(work)) == 0
    a, ma = _final_state(ref)
    b, mb = _final_state(work)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert untimed(ma["history"]) == untimed(mb["history"])
    assert not (work / "checkpoints" / "preempt").exists()


def test_compact_states_which_checkpoint_it_used(tiny_config, tmp_path, capsys):
    work = tmp_path / "two"
    assert cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress",
                     "--config.epochs=2", "--config.keep_checkpoints=2"]) == 0
    hist = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((work / "result.json").read_text())["from_state"]
    assert final["which"] == "final" and final["optimizer_step"] == hist[-1]["step"]
    assert cli.main(["compact", str(work), "--checkpoint", "best"]) == 0
    best = json.loads((work / "result.json").read_text())["from_state"]
    top = max(h["test_accuracy"] for h in hist)
    assert best["which"] == "best"
    assert best["optimizer_step"] in [h["step"] for h in hist if h["test_accuracy"] == top]
    assert "compacted the best checkpoint" in capsys.readouterr().out


def test_retention_is_reapplied_by_the_next_save_after_a_kill(tmp_path):
    """A kill between a save and Orbax's clean-up leaves one step too many; the resumed run's
    next save removes it."""
    from jaxprune import checkpoints as ck

    from test_checkpoints import small_state

    loose = ck.make_checkpoint_manager(tmp_path, max_to_keep=10, keep_best=0)
    for e in range(3):
        ck.save_checkpoint(loose, small_state(e + 1.0), epoch=e, metrics={"test_accuracy": 0.1})
    loose.close()
    mgr = ck.make_checkpoint_manager(tmp_path, max_to_keep=2, keep_best=0)
    ck.save_checkpoint(mgr, small_state(4.0), epoch=3, metrics={"test_accuracy": 0.1})
    assert list(mgr.all_steps()) == [3, 4]
    mgr.close()


def test_retention_is_reapplied_on_resume_when_no_save_follows(tmp_path, two_epoch_checkpoints):
    """A kill after the last epoch's step committed, before Orbax's clean-up: the resumed run
    has no epoch left to save, so the resume itself applies the policy (here: the latest step
    only, no metrics to rank); the run's result and the kept step are unchanged."""
    import shutil

    from jaxprune.checkpoints import read_step_meta

    ckpts = tmp_path / "ck"
    shutil.copytree(two_epoch_checkpoints, ckpts)  # saved under max_to_keep=5: steps 1 and 2
    before = snapshot(ckpts / "2")
    _, history = _tiny_fit(tmp_path, 2, ckpts, max_to_keep=1)
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"]
    assert snapshot(ckpts / "2") == before
    assert history == read_step_meta(two_epoch_checkpoints, 2)["history"]


# ----------------------------------------------------------------------------- a full disk

# what a failure path must never print: tracebacks, Orbax's error log lines, asyncio noise
NOISE = ("Traceback", "ERROR:absl", "Event loop is closed", "was never awaited", "Task was destroyed")


def assert_quiet(err: str) -> None:
    assert not [n for n in NOISE if n in err], err


@pytest.fixture
def unraisables():
    """The unraisable errors (``Exception ignored in ...``) that would reach the console during
    the test, after jaxprune's filter (`quiet_late_async_errors`); pytest would turn them into
    warnings instead. Collected garbage included."""
    import gc
    import sys

    from jaxprune.checkpoints import quiet_late_async_errors

    seen: list[str] = []
    before = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(f"{type(u.exc_value).__name__}: {u.exc_value}"[:300])
    quiet_late_async_errors()
    try:
        yield seen
    finally:
        gc.collect()
        sys.unraisablehook = before


@pytest.fixture(scope="module")
def disk_ref(tmp_path_factory):
    """A clean 2-epoch run to compare the runs that hit a full disk with."""
    root = tmp_path_factory.mktemp("disk")
    cfg = root / "d.py"
    cfg.write_text(tiny_config_source(epochs=2, train_subset=128))
    ref = root / "ref"
    assert cli.main(["train", "--config", str(cfg), "--workdir", str(ref), "--no-progress"]) == 0
    return cfg, ref


def _fill_the_disk_in_epoch_2(monkeypatch, where: str) -> None:
    """The disk fills while epoch 2's records are written: in Orbax's background write of its
    checkpoint (an OSError naming no path, as ``write`` raises it), or in the middle of its
    ``metrics.jsonl`` line (the part before stays on disk)."""
    import errno
    import os

    if where == "checkpoint":
        from orbax.checkpoint import JsonCheckpointHandler

        real = JsonCheckpointHandler._save_fn

        async def full(self, item, directory):
            if isinstance(item, dict) and item.get("epoch") == 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return await real(self, item, directory)

        monkeypatch.setattr(JsonCheckpointHandler, "_save_fn", full)
    else:
        from jaxprune import files
        from test_files import _FullDisk

        lines = []

        def full(path, mode):
            lines.append(path)
            return _FullDisk(path, mode, room=10 if len(lines) == 2 else 1 << 30)

        monkeypatch.setattr(files, "open", full, raising=False)


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_a_full_disk_mid_run_is_one_line_keeps_what_was_good_and_the_rerun_resumes_exactly(
        disk_ref, tmp_path, monkeypatch, capfd, where, unraisables):
    cfg, ref = disk_ref
    work = tmp_path / "full"
    args = ["train", "--config", str(cfg), "--workdir", str(work), "--no-progress"]
    _fill_the_disk_in_epoch_2(monkeypatch, where)
    capfd.readouterr()
    assert cli.main(args) == cli.EXIT_WRITE_FAILED
    err = capfd.readouterr().err
    monkeypatch.undo()
    named = work.absolute() / ("checkpoints" if where == "checkpoint" else "metrics.jsonl")
    assert err.count("\n") == 1, err
    assert f"jaxprune train: error: cannot write {named}: No space left on device (errno 28)" in err
    assert_quiet(err)
    # what was good is intact: the config, epoch 1's record, the last committed checkpoint
    assert json.loads((work / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    ref_lines = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert untimed([json.loads((work / "metrics.jsonl").read_text().splitlines()[0])]) == \
        untimed(ref_lines[:1])
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == (1 if where == "checkpoint" else 2), steps
    assert not (work / "result.json").exists() and not (work / "compact").exists()
    # the rerun resumes where it stopped and ends bit for bit where the clean run ends
    assert cli.main(args) == 0
    assert_quiet(capfd.readouterr().err)
    a, ma = _final_state(ref)
    b, mb = _final_state(work)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert untimed(ma["history"]) == untimed(mb["history"])
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert untimed(lines) == untimed(ref_lines)
    rec_a, rec_b = (json.loads((w / "result.json").read_text()) for w in (ref, work))
    assert {k: v for k, v in rec_a.items() if k != "wall_time_s"} == \
        {k: v for k, v in rec_b.items() if k != "wall_time_s"}
    assert not [p.name for p in (work / "checkpoints").iterdir() if "tmp" in p.name]
    import gc

    gc.collect()
    assert unraisables == []


def test_a_full_disk_while_tensorboard_writes_names_its_directory(tmp_path, monkeypatch):
    import errno
    import os

    from jaxprune.files import WriteFailed
    from jaxprune.metrics_log import MetricsWriter

    writer = MetricsWriter(tmp_path)

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.tb, "flush", full)
    with pytest.raises(WriteFailed) as info:
        writer({"epoch": 0, "train_loss": 1.0})
    assert info.value.filename == str(tmp_path / "tb") and info.value.errno == errno.ENOSPC


def test_late_completions_of_an_abandoned_orbax_operation_are_dropped_and_nothing_else(monkeypatch):
    """What Orbax leaves when one TensorStore read or write of a save or restore fails (a damaged
    step, a full disk, Ctrl-C): it closes the event loop while another TensorStore future is
    still pending, whose completion then cannot be delivered (an unraisable RuntimeError), and
    its pending coroutines raise when they are collected (an unraisable wrapper of GeneratorExit)."""
    import asyncio
    import gc
    import sys

    import tensorstore as ts

    from jaxprune.checkpoints import quiet_late_async_errors

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
    quiet_late_async_errors()
    quiet_late_async_errors()  # installed once
    promise, pending = ts.Promise.new()

    async def one_write_fails():
        async def other_write():
            return await pending

        async def failing_write():
            raise OSError(28, "No space left on device")

        await asyncio.gather(other_write(), failing_write())

    loop = asyncio.new_event_loop()
    with pytest.raises(OSError):
        loop.run_until_complete(one_write_fails())
    loop.close()
    promise.set_result(1)  # the other write completes after its loop is gone
    gc.collect()
    assert seen == []

    class Broken:
        def __del__(self):
            raise RuntimeError("Event loop is closed")  # the same words from elsewhere: shown

    Broken()
    gc.collect()
    assert seen == ["RuntimeError('Event loop is closed')"]

    # a pending Orbax read, closed when collected, wraps its GeneratorExit as Orbax's does
    source = (
        "class Pending:\n"
        "    def __await__(self):\n"
        "        yield\n"
        "async def read_array_index():\n"
        "    try:\n"
        "        await Pending()\n"
        "    except BaseException as e:\n"
        "        raise Exception('Encountered error while reading array index') from e\n")
    for where in ("/site-packages/orbax/checkpoint/_src/serialization/serialization.py",
                  "/site-packages/elsewhere/serialization.py"):
        namespace: dict = {}
        exec(compile(source, where, "exec"), namespace)
        pending_read = namespace["read_array_index"]()
        pending_read.send(None)  # suspended at its await, as in a gather that another read failed
        del pending_read
        gc.collect()
    assert seen[1:] == ["Exception('Encountered error while reading array index')"]  # elsewhere's


def test_the_cli_drops_orbax_log_lines_only(caplog):
    """Orbax logs the failure of a background save (with its traceback) and raises it to the
    command, which reports it in one line: its log lines are dropped, others are kept."""
    import logging

    cli._quiet_absl()
    fake_orbax = compile("import logging\nlogging.getLogger('absl').error('from orbax')",
                         "/site-packages/orbax/checkpoint/fake.py", "exec")
    with caplog.at_level(logging.ERROR):
        exec(fake_orbax, {})
        logging.getLogger("absl").error("from elsewhere")
    assert "from elsewhere" in caplog.text and "from orbax" not in caplog.text


def test_a_ctrl_c_while_the_cli_starts_is_one_line(monkeypatch, capsys, tmp_path):
    import builtins

    real = builtins.__import__

    def interrupted(name, *a, **k):  # the imports of a fresh process take seconds
        if name == "jaxprune.files":
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    rc = cli.main(["compact", str(tmp_path)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == cli.EXIT_INTERRUPTED and err.count("\n") == 1 and "while starting" in err, err


@pytest.mark.slow
def test_random_sigkills_then_resume_reproduce_the_uninterrupted_run(tmp_path):
    """The long kill sweep: SIGKILL at random times (startup, mid-epoch, inside saves), resume
    until done, compare with the uninterrupted run bit for bit."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "k.py"
    cfg.write_text(tiny_config_source(epochs=4, train_subset=1024, steps_per_call=4))
    cmd = [sys.executable, "-m", "jaxprune.cli", "train", "--config", str(cfg), "--no-progress",
           "--default-xla-flags"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref, work = tmp_path / "ref", tmp_path / "killed"
    t0 = time.time()
    assert subprocess.run(cmd + ["--workdir", str(ref)], env=env, capture_output=True).returncode == 0
    full = time.time() - t0
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(cmd + ["--workdir", str(work)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.0) * full)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if (work / "result.json").is_file():
            break
    done = subprocess.run(cmd + ["--workdir", str(work)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills >= 3
    a, ma = _final_state(ref)
    b, mb = _final_state(work)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    epochs = [json.loads(x)["epoch"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_weights_digest_names_the_weights_not_their_container():
    from jaxprune.pretrained import weights_digest

    a = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2, np.float32)},
         "batch_stats": {"bn": {"mean": np.zeros(3, np.float32)}}, "other": {"x": np.ones(1)}}
    # key order, array kind and collections other than params / batch stats do not matter
    b = {"batch_stats": {"bn": {"mean": jnp.zeros(3)}},
         "params": {"b": jnp.ones(2), "conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}}}
    assert weights_digest(a) == weights_digest(b)
    for changed in (lambda t: t["params"]["conv"]["kernel"].__setitem__((1, 2), 5.5),  # a value
                    lambda t: t["params"].__setitem__("b", np.ones(2, np.float16)),  # a dtype
                    lambda t: t["params"]["conv"].__setitem__("kernel", np.arange(6.0, dtype=np.float32)
                                                              .reshape(3, 2))):  # a shape
        c = jax.tree.map(np.array, b)
        changed(c)
        assert weights_digest(c) != weights_digest(b)


def test_a_run_resumes_with_its_pretrained_weights_in_another_directory(tiny_config, trained_run, tmp_path,
                                                                        capsys):
    """A run moved between machines finds its pretrained start under another path: resumed when
    the directory holds the same weights (by digest, recorded in start.json), refused otherwise,
    and the directory then left as it was."""
    import shutil

    from jaxprune import artifact
    from jaxprune.pretrained import load_trained, weights_digest

    work = tmp_path / "pruned"

    def prune(pretrained):
        return cli.main(["prune", str(pretrained), "--config", str(tiny_config), "--workdir", str(work),
                         "--no-progress"])

    from jaxprune.resume import started_from

    assert started_from(work) is None  # no run there yet
    assert prune(trained_run) == 0
    _, variables, _ = load_trained(trained_run)
    assert started_from(work) == weights_digest(variables)  # as start.json records it
    assert started_from(trained_run) is None  # trained from scratch

    moved = tmp_path / "elsewhere" / "good"
    shutil.copytree(trained_run, moved)
    assert prune(moved) == 0
    [rec] = [json.loads(x) for x in (work / "config_changes.jsonl").read_text().splitlines()]
    assert rec["changes"] == {"pretrained": [str(trained_run), str(moved)]}
    assert json.loads((work / "config.json").read_text())["pretrained"] == str(moved)

    other = tmp_path / "other"  # same model, other weights
    other.mkdir()
    shutil.copy(trained_run / "config.json", other / "config.json")
    model = get_model("resnet20", num_classes=10)
    artifact.save_compact(other / "compact", model, model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3))),
                          {"input_shape": [8, 8, 3], "dataset": "digits"})
    before = snapshot(work)
    capsys.readouterr()
    assert prune(other) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another pretrained" in err, err
    assert f"{str(other)!r} holds other weights than the run started from" in err, err
    assert snapshot(work) == before
