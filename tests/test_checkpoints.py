"""Checkpoints: round trips, retention, strict shape validation, a process killed mid-save,
and the compact-model file format (`jaxprune.artifact`: save_compact / jaxprune.load)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jaxprune
from jaxprune import artifact as art
from jaxprune import checkpoints as ck
from jaxprune import optim, train_step

REPO = Path(__file__).resolve().parent.parent


class TauState(NamedTuple):
    """A pruning state with a method field (as HFP's threshold)."""

    masks: dict
    hard: dict
    count: jax.Array
    tau: jax.Array


class ExtraState(NamedTuple):
    masks: dict
    hard: dict
    count: jax.Array
    tau: jax.Array
    new: jax.Array


def small_state(value: float = 1.0, out: int = 4) -> train_step.TrainState:
    """A TrainState with every kind of leaf (nested params, optax NamedTuples, empty dicts)."""
    params = {"conv": {"kernel": jnp.full((3, 3, 2, out), value)},
              "fc": {"kernel": jnp.full((out, 3), value), "bias": jnp.zeros((3,))}}
    opt = optim.make_optimizer(0.1)
    return train_step.TrainState(
        step=jnp.asarray(int(value), jnp.int32), params=params, batch_stats={},
        opt_state=opt.init(params),
        prune=TauState(masks={"conv": jnp.ones((out,))},
                       hard={"conv": jnp.ones((out,)).at[0].set(0.0)},
                       count=jnp.asarray(int(value), jnp.int32), tau=jnp.asarray(value * 0.5)),
        rng=jax.random.PRNGKey(int(value)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- training

def test_save_restore_keeps_latest_and_best(tmp_path):
    mgr = ck.make_checkpoint_manager(tmp_path / "run", max_to_keep=2, keep_best=1)
    accs = [0.5, 0.9, 0.3, 0.2]
    for epoch, acc in enumerate(accs):
        ck.save_checkpoint(mgr, small_state(epoch + 1.0), epoch=epoch,
                           metrics={"test_accuracy": np.float32(acc), "train_loss": 1.0 / (epoch + 1)},
                           history=[{"epoch": e} for e in range(epoch + 1)],
                           config={"model": "resnet20", "rate": 0.3}, method="sfp")
    # the 2 latest (epochs 2, 3 -> steps 3, 4) and the best (epoch 1 -> step 2)
    assert list(mgr.all_steps()) == [2, 3, 4]
    assert mgr.latest_step() == 4 and mgr.best_step() == 2

    fresh = ck.make_checkpoint_manager(tmp_path / "run")  # as a new process would
    state, meta = ck.restore_checkpoint(fresh, small_state(0.0))
    assert_trees_equal(state, small_state(4.0))
    assert isinstance(state, train_step.TrainState)
    assert meta["epoch"] == 3 and meta["next_epoch"] == 4 and meta["step"] == 4
    assert meta["method"] == "sfp" and meta["config"] == {"model": "resnet20", "rate": 0.3}
    assert meta["metrics"]["test_accuracy"] == pytest.approx(0.2)
    assert len(meta["history"]) == 4
    best, _ = ck.restore_checkpoint(fresh, small_state(0.0), step=fresh.best_step())
    assert_trees_equal(best, small_state(2.0))
    with pytest.raises(FileNotFoundError, match="step 1"):
        ck.restore_checkpoint(fresh, small_state(0.0), step=1)


@struct.dataclass
class OldState:
    """The train state as older checkpoints hold it: ``masks``, ``hard``, ``method_state``."""

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: tuple
    masks: dict
    hard: dict
    method_state: dict
    rng: jax.Array


def as_old(state: train_step.TrainState) -> OldState:
    p = state.prune
    return OldState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                    opt_state=state.opt_state, masks=p.masks, hard=p.hard,
                    method_state={"tau": p.tau, "dropped": jnp.zeros((2,))}, rng=state.rng)


def test_checkpoints_of_the_older_layout_are_converted_at_restore(tmp_path):
    """An epoch checkpoint and a preempted one written in the older layout restore into
    today's state: masks, hard and the method state's fields land in the pruning state
    (entries it has no field for are dropped), the count is the epochs done (the epoch
    checkpoint's ``next_epoch``, the preempted epoch's index)."""
    want = small_state(1.0)
    mgr = ck.make_checkpoint_manager(tmp_path / "run")
    ck.save_checkpoint(mgr, as_old(want), epoch=4, metrics={})
    mgr.wait_until_finished()
    got, meta = ck.restore_checkpoint(mgr, small_state(0.0))
    assert meta["next_epoch"] == 5 and type(got.prune) is TauState
    assert int(got.prune.count) == 5 and float(got.prune.tau) == 0.5
    assert_trees_equal(got.replace(prune=got.prune._replace(count=want.prune.count)), want)
    ck.save_preempt(tmp_path / "pre", as_old(want),
                    {"epoch": 3, "resume_step": 2, "history": [], "step_metrics": [{}, {}]})
    got, meta = ck.load_preempt(tmp_path / "pre", small_state(0.0), steps_per_epoch=5)
    assert int(got.prune.count) == 3 and meta["resume_step"] == 2
    assert_trees_equal(got.replace(prune=got.prune._replace(count=want.prune.count)), want)


@pytest.mark.parametrize("policy, metrics, kept", [
    # the 2 latest (4, 5), the best (2) and a step without metrics (1)
    (ck.Retention(2, 1), {1: None, 2: {"test_accuracy": 0.9}, 3: {"test_accuracy": 0.4},
                          4: {"test_accuracy": 0.6}, 5: {"test_accuracy": 0.5}}, {1, 2, 4, 5}),
    # ties: the later step is the better one (as Orbax's best_step); a missing metric is worst
    (ck.Retention(1, 1), {1: {"test_accuracy": 0.7}, 2: {"test_accuracy": 0.7}, 3: {}}, {2, 3}),
    # 'min' mode on another metric; keep_best=0 keeps only the latest
    (ck.Retention(1, 2, "loss", "min"), {1: {"loss": 0.3}, 2: {"loss": 0.1}, 3: {"loss": 0.2},
                                         4: {"loss": 0.9}}, {2, 3, 4}),
    (ck.Retention(1, 0), {1: {"test_accuracy": 0.9}, 2: {"test_accuracy": 0.1}}, {2}),
])
def test_retained_steps_by_hand(policy, metrics, kept):
    assert ck.retained_steps(policy, metrics) == kept


def test_retention_is_reapplied_to_the_steps_an_interrupted_clean_up_left(tmp_path):
    """Orbax deletes old steps after a save commits; a kill in between leaves them. Applying
    the policy again leaves what Orbax leaves when nothing interrupts it."""
    accs = [0.5, 0.9, 0.3, 0.2, 0.4]
    left = ck.make_checkpoint_manager(tmp_path / "killed", max_to_keep=10, keep_best=0)
    clean = ck.make_checkpoint_manager(tmp_path / "clean", max_to_keep=2, keep_best=1)
    for epoch, acc in enumerate(accs):
        for mgr in (left, clean):
            ck.save_checkpoint(mgr, small_state(epoch + 1.0), epoch=epoch,
                               metrics={"test_accuracy": acc})
    left.close()
    resumed = ck.make_checkpoint_manager(tmp_path / "killed", max_to_keep=2, keep_best=1)
    assert list(resumed.all_steps()) == [1, 2, 3, 4, 5]  # opening alone deletes nothing
    assert resumed.apply_retention() == [1, 3]
    assert list(resumed.all_steps()) == list(clean.all_steps()) == [2, 4, 5]
    assert resumed.best_step() == 2 and resumed.latest_step() == 5
    assert sorted(p.name for p in (tmp_path / "killed").iterdir() if p.name.isdigit()) == ["2", "4", "5"]
    assert resumed.apply_retention() == []
    resumed.close()
    clean.close()


def test_restore_rejects_shape_mismatch_naming_the_leaf(tmp_path):
    mgr = ck.make_checkpoint_manager(tmp_path / "run")
    ck.save_checkpoint(mgr, small_state(1.0, out=4), epoch=0, metrics={})
    with pytest.raises(ValueError, match=r"'params/conv/kernel' has shape \(3, 3, 2, 4\) on disk "
                                         r"but the target expects \(3, 3, 2, 5\)"):
        ck.restore_checkpoint(mgr, small_state(0.0, out=5))
    zero = small_state(0.0)
    extra = zero.replace(prune=ExtraState(*zero.prune, new=jnp.zeros(())))
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*prune/new"):
        ck.restore_checkpoint(mgr, extra)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.restore_checkpoint(ck.make_checkpoint_manager(tmp_path / "empty"), small_state())


_KILL_SCRIPT = textwrap.dedent(r"""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import orbax.checkpoint as ocp
    from tests.test_checkpoints import small_state
    from jaxprune import checkpoints as ck

    directory, marker = Path(sys.argv[2]), Path(sys.argv[3])
    mgr = ck.make_checkpoint_manager(directory)
    ck.save_checkpoint(mgr, small_state(1.0), epoch=0, metrics={"test_accuracy": 0.1})

    original = ocp.JsonCheckpointHandler._save_fn
    async def stalled(self, x, d):  # write the JSON, then hang before Orbax can finalise
        await original(self, x, d)
        marker.write_text("saving")
        time.sleep(600)
    ocp.JsonCheckpointHandler._save_fn = stalled
    ck.save_checkpoint(mgr, small_state(2.0), epoch=1, metrics={"test_accuracy": 0.2})
    print("save returned: the stall did not happen")
""")


def test_process_killed_during_save_leaves_previous_checkpoint(tmp_path):
    directory, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(REPO), str(directory), str(marker)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"subprocess ended before the stalled save:\n{out[-2000:]}\n{err[-4000:]}")
            if time.time() > deadline:
                pytest.fail("the subprocess never reached the second save")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in directory.iterdir() if p.name not in ("1",)]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers  # killed mid-save

    mgr = ck.make_checkpoint_manager(directory)  # cleans the stale temporary directory
    assert list(mgr.all_steps()) == [1] and mgr.latest_step() == 1
    state, meta = ck.restore_checkpoint(mgr, small_state(0.0))
    assert_trees_equal(state, small_state(1.0))
    assert meta["next_epoch"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
    ck.save_checkpoint(mgr, small_state(2.0), epoch=1, metrics={})  # and the run can go on
    assert mgr.latest_step() == 2


# ----------------------------------------------------------------------------- compact models

@pytest.fixture(scope="module")
def compact_resnet():
    from jaxprune.compaction import compact
    from jaxprune.graph import trace_linen
    from jaxprune.models import get_model

    model = get_model("resnet20", num_classes=10)
    x = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 3), jnp.float32)
    # random values of the right shapes (no init compile); BN variances positive. Non-trivial
    # BN statistics make a mix-up of BN leaves show in the outputs.
    shapes = jax.eval_shape(lambda k, a: model.init(k, a, train=False), jax.random.PRNGKey(0), x[:1])
    rs = np.random.RandomState(1)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray((np.abs(rs.randn(*s.shape)) + 0.5 if p[-1].key == "var"
                                  else 0.3 * rs.randn(*s.shape)).astype(np.float32)), shapes)
    graph = trace_linen(model, variables, x)
    masks = {}
    for name, group in graph.groups.items():
        keep = (rs.rand(group.size) > 0.4).astype(np.float32)
        keep[rs.randint(group.size)] = 1.0
        masks[name] = jnp.asarray(keep)
    result = compact(model, variables, masks, graph)
    return result, x


def _apply(model, variables, x):
    return jax.jit(lambda m, v, a: m.apply(v, a), static_argnums=0)(model, variables, x)


def test_save_compact_load_round_trip(tmp_path, compact_resnet):
    from jaxprune.models import model_config

    result, x = compact_resnet
    meta = {"method": "sfp", "macs": np.int64(123456), "params": {"with_fc": 1000, "conv_only": 900},
            "keep_out": {k: list(v) for k, v in result.keep_out.items()}}
    path = art.save_compact(tmp_path / "model", result.model, result.variables, meta, input_shape=(8, 8, 3))
    model, variables, got_meta = jaxprune.load(path)
    assert model == result.model and model_config(model) == model_config(result.model)
    assert got_meta == {**json.loads(json.dumps({**meta, "macs": 123456})), "input_shape": [8, 8, 3]}
    assert_trees_equal(variables, jax.device_get(result.variables))
    np.testing.assert_array_equal(np.asarray(_apply(model, variables, x)),
                                  np.asarray(_apply(result.model, result.variables, x)))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary leftovers


def test_save_compact_refuses_overwrite_and_is_atomic(tmp_path, compact_resnet, monkeypatch):
    result, _ = compact_resnet
    path = tmp_path / "model"
    art.save_compact(path, result.model, result.variables, {"version": "old"}, input_shape=(8, 8, 3))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        art.save_compact(path, result.model, result.variables, {}, input_shape=(8, 8, 3))

    real_rename = os.rename
    failed = []

    def failing_rename(src, dst):
        # the move of the finished temporary directory into place fails (once per save)
        if Path(src).name.startswith(".") and ".tmp-" in Path(src).name and Path(dst).parent == tmp_path \
                and not Path(dst).name.startswith(".") and src not in failed:
            failed.append(src)
            raise OSError("disk full (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        art.save_compact(path, result.model, result.variables, {"version": "new"},
                        input_shape=(8, 8, 3), overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        art.save_compact(tmp_path / "other", result.model, result.variables, {}, input_shape=(8, 8, 3))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing half-written
    assert jaxprune.load(path)[2]["version"] == "old"  # the old model is intact

    art.save_compact(path, result.model, result.variables, {"version": "new"}, input_shape=(8, 8, 3),
                    overwrite=True)
    assert jaxprune.load(path)[2]["version"] == "new"
    # variables that do not fit the model are refused before anything is written
    bad = jax.tree.map(lambda a: a, jax.device_get(result.variables))
    bad["params"]["fc"]["bias"] = np.zeros(11, np.float32)
    with pytest.raises(ValueError, match=r"'params/fc/bias' has shape \(11,\)"):
        art.save_compact(tmp_path / "bad", result.model, bad, {}, input_shape=(8, 8, 3))
    assert not (tmp_path / "bad").exists()


def test_load_validates_path_and_shapes(tmp_path, compact_resnet):
    result, _ = compact_resnet
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        jaxprune.load(tmp_path / "nowhere")
    path = art.save_compact(tmp_path / "model", result.model, result.variables, {}, input_shape=(8, 8, 3))
    # tamper with the stored config: the stem now claims one filter fewer than was saved
    doc_file = path / "model" / "metadata"
    doc = json.loads(doc_file.read_text())
    stem = doc["model"]["keep_out"].get("stem", list(range(16)))
    doc["model"]["keep_out"]["stem"] = stem[:-1]
    doc_file.write_text(json.dumps(doc))
    with pytest.raises(art.CorruptArtifactError, match=rf"{doc_file} does not match its checksum"):
        jaxprune.load(path)
    # the same edit with its checksums recorded again: the shapes are still checked
    sums = {f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in path.rglob("*") if f.is_file() and f.name != "CHECKSUMS.json"}
    (path / "CHECKSUMS.json").write_text(json.dumps({"sha256": sums}))
    with pytest.raises(ValueError, match=rf"'params/stem/kernel' has shape \(3, 3, 3, {len(stem)}\) "
                                         rf"on disk but the target expects \(3, 3, 3, {len(stem) - 1}\)"):
        jaxprune.load(path)
