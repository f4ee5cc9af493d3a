"""Faults that would leak into a run's records: each test builds its own damage (a truncated
step, a deleted or edited config.json, a second writer, NaN weights, soft or NaN masks...) and
checks the one line on stderr, the exit code, and that nothing good on disk changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config_source
from jaxprune import artifact as art
from jaxprune import checkpoints as ck
from jaxprune import cli, optim, selection
from jaxprune.masks import check_hard_masks
from jaxprune.runlock import RunDirLocked, RunLock
from test_faults import _tiny_fit, snapshot, unraisables  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.py"
    p.write_text(tiny_config_source(epochs=2, train_subset=128, keep_checkpoints=2))
    return p


@pytest.fixture(scope="module")
def run2(cfg_file, tmp_path_factory):
    """A finished 2-epoch run with both epoch checkpoints (steps 1 and 2)."""
    work = tmp_path_factory.mktemp("runs") / "run2"
    assert cli.main(["train", "--config", str(cfg_file), "--workdir", str(work), "--no-progress"]) == 0
    return work


def _copy(run: Path, tmp_path: Path) -> Path:
    work = tmp_path / "run"
    shutil.copytree(run, work)
    return work


def _train(cfg_file, work, *extra) -> list[str]:
    return ["train", "--config", str(cfg_file), "--workdir", str(work), "--no-progress", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _truncate_largest(folder: Path) -> None:
    p = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncate_array_data(folder: Path) -> None:
    """Halves every array data file (OCDBT's ``d/`` files) under ``folder``: whichever arrays a
    reader asks for (``restore_weights`` reads only params and BN statistics, which need not be in
    the largest file), the read fails."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {folder}"
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _hashes(root: Path, names: tuple[str, ...]) -> dict:
    out = {}
    for n in names:
        p = root / n
        out[n] = snapshot(p) if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------- 1. no data loss


def test_compact_falling_back_never_overwrites_the_later_steps_results(run2, tmp_path, capsys):
    work = _copy(run2, tmp_path)
    _truncate_largest(work / "checkpoints" / "2" / "state")
    before = _hashes(work, ("compact", "result.json"))
    capsys.readouterr()
    assert cli.main(["compact", str(work)]) == 0
    err = _one_line(capsys)
    assert "step 2" in err and "compacted step 1 into compact-step1/ and result-step1.json" in err
    assert _hashes(work, ("compact", "result.json")) == before  # the final step's results kept
    rec = json.loads((work / "result-step1.json").read_text())
    assert rec["from_state"]["checkpoint_step"] == 1 and rec["from_state"]["newest_step"] == 2
    art.load(work / "compact-step1")
    assert (work / "checkpoints" / "2").is_dir()  # read-only: the damaged step is not moved


def test_compact_of_a_directory_without_checkpoints_creates_nothing(run2, tmp_path, capsys):
    work = _copy(run2, tmp_path)
    shutil.rmtree(work / "checkpoints")
    before = snapshot(work)
    capsys.readouterr()
    assert cli.main(["compact", str(work)]) == cli.EXIT_USAGE
    assert "holds no checkpoint" in _one_line(capsys)
    assert snapshot(work) == before and not (work / "checkpoints").exists()


def test_an_unreadable_best_checkpoint_is_refused_in_one_line(run2, tmp_path, capsys):
    work = _copy(run2, tmp_path)
    mgr = ck.make_checkpoint_manager(work / "checkpoints", max_to_keep=2)
    best = mgr.best_step()
    mgr.close()
    _truncate_largest(work / "checkpoints" / str(best) / "state")
    before = snapshot(work)
    capsys.readouterr()
    assert cli.main(["compact", str(work), "--checkpoint", "best"]) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert f"best checkpoint, step {best}" in err and "unreadable" in err
    assert snapshot(work) == before


def test_a_start_or_sensitivity_from_a_damaged_run_records_the_step_it_used(run2, cfg_file,
                                                                            tmp_path, capsys,
                                                                            unraisables):
    from jaxprune.experiment import load_trained as ck_load_trained

    src = _copy(run2, tmp_path)
    _truncate_array_data(src / "checkpoints" / "2" / "state")
    """Both read the weights with `load_trained` (a healthy run's ``weights_from`` in
    sensitivity.json: `test_cli.py::test_train_compact_eval_info_on_tiny_config`)."""
    used = {"checkpoint_step": 1, "newest_step": 2}
    work = tmp_path / "pruned"
    capsys.readouterr()
    assert cli.main(["prune", str(src), "--config", str(cfg_file), "--workdir", str(work),
                     "--no-progress", "--config.epochs=1"]) == 0
    assert "checkpoint step 2" in capsys.readouterr().out
    _, variables, weights_from = ck_load_trained(src)
    from jaxprune.pretrained import weights_digest

    used["sha256"] = weights_digest(variables)  # the weights of step 1, which it fell back to
    assert weights_from == used
    assert json.loads((work / "start.json").read_text())["weights_from"] == used
    assert (src / "checkpoints" / "2").is_dir()  # read-only: the damaged step is not moved
    import gc

    gc.collect()  # Orbax's reads abandoned after the damaged one print nothing when collected
    assert unraisables == []


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(run2, cfg_file, tmp_path, capsys):
    work = _copy(run2, tmp_path)
    before = snapshot(work)
    with RunLock(work):  # a trainer holding the run directory
        capsys.readouterr()
        for argv in (_train(cfg_file, work), ["compact", str(work)]):
            assert cli.main(argv) == cli.EXIT_USAGE
            err = _one_line(capsys)
            assert "in use by another jaxprune process" in err and str(work) in err
    assert snapshot(work) == before  # no lock file, nothing written
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxprune.runlock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(work)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked):
            RunLock(work).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(work) as lock:  # released by the OS with the killed process
        assert lock.held


# ----------------------------------------------------------------------------- 2. records


@pytest.mark.parametrize("damage, override, named", [
    ("delete", "--config.seed=1", "seed: 0 there, 1 now"),
    ("delete", "--config.method.rate=0.3", "method.rate: 0.4 there, 0.3 now"),
    ("edit", "--config.method.rate=0.3", "method.rate: 0.4 there, 0.3 now"),
    ("edit", "--config.optimizer.base_lr=0.5", "optimizer.base_lr"),
    ("keep", "--config.test_subset=64", "test_subset: 128 there, 64 now"),
    ("keep", "--config.steps_per_call=2", "steps_per_call: -1 there, 2 now"),
])
def test_the_checkpoint_config_is_the_resume_reference(run2, cfg_file, tmp_path, capsys,
                                                        damage, override, named):
    """config.json deleted, or edited to agree with the new command: the config recorded with
    the checkpoint still refuses the change, naming the key and both values."""
    work = _copy(run2, tmp_path)
    cfg = json.loads((work / "config.json").read_text())
    if damage == "delete":
        (work / "config.json").unlink()
    elif damage == "edit":
        cfg["method"]["rate"], cfg["optimizer"]["base_lr"] = 0.3, 0.5
        (work / "config.json").write_text(json.dumps(cfg))
    before = snapshot(work)
    capsys.readouterr()
    assert cli.main(_train(cfg_file, work, override)) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert named in err and "checkpoints/2" in err, err
    assert snapshot(work) == before


def _drop_recorded_config(work: Path) -> None:
    """Checkpoints as written before the config was the resume reference: meta without it."""
    for meta in (work / "checkpoints").glob("*/meta/metadata"):
        doc = json.loads(meta.read_text())
        doc["config"] = None
        meta.write_text(json.dumps(doc))


def test_checkpoints_without_a_recorded_config_resume_with_config_json(run2, cfg_file, tmp_path,
                                                                        capsys):
    work = _copy(run2, tmp_path)
    _drop_recorded_config(work)
    assert ck.recorded_config(work / "checkpoints") is None
    capsys.readouterr()
    assert cli.main(_train(cfg_file, work, "--config.seed=1")) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert "seed: 0 there, 1 now" in err and "recorded in " + str(work / "config.json") in err
    # the same command resumes (everything is trained: it finalizes from step 2)
    assert cli.main(_train(cfg_file, work)) == 0
    rec = json.loads((work / "result.json").read_text())
    assert rec["from_state"]["epochs_done"] == 2


def test_a_prune_run_with_old_checkpoints_resumes_under_config_json(run2, cfg_file, tmp_path, capsys):
    """``jaxprune prune`` from a trained run, checkpoints without a recorded config (as written
    before the config became the resume reference): resumed with a longer schedule, refused
    with another seed, both judged against config.json."""
    work = tmp_path / "pruned"
    prune = ["prune", str(run2), "--config", str(cfg_file), "--workdir", str(work), "--no-progress",
             "--config.epochs=1"]
    assert cli.main(prune) == 0
    _drop_recorded_config(work)
    capsys.readouterr()
    assert cli.main(prune[:-1] + ["--config.epochs=2", "--config.seed=5"]) == cli.EXIT_USAGE
    assert "seed: 0 there, 5 now; recorded in " + str(work / "config.json") in _one_line(capsys)
    assert cli.main(prune[:-1] + ["--config.epochs=2", "--allow-schedule-change"]) == 0
    (line,) = (work / "config_changes.jsonl").read_text().splitlines()
    assert json.loads(line)["changes"] == {"epochs": [1, 2]}
    assert json.loads((work / "result.json").read_text())["from_state"]["epochs_done"] == 2


def test_resume_falls_back_past_a_step_without_array_metadata(tmp_path, capsys):
    ckpts = tmp_path / "ck"
    _tiny_fit(tmp_path, 2, ckpts)
    (ckpts / "2" / "state" / "_METADATA").unlink()
    capsys.readouterr()
    _, hist = _tiny_fit(tmp_path, 3, ckpts)
    out = capsys.readouterr().out
    assert "checkpoint step 2" in out and "no array metadata" in out and "resuming from step 1" in out
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert (ckpts / "corrupt-2-0").is_dir()


@pytest.mark.parametrize("damage", ["garbage_meta", "no_state_metadata"])
def test_a_damaged_preempted_checkpoint_falls_back_to_the_epoch_checkpoint(tmp_path, capsys, damage):
    ckpts = tmp_path / "ck"
    _, hist = _tiny_fit(tmp_path, 2, ckpts)
    mgr = ck.make_checkpoint_manager(ckpts, max_to_keep=5)
    target = jax.tree.map(np.asarray, ck.restore_checkpoint(mgr, _restore_target(), step=2)[0])
    mgr.close()
    ck.save_preempt(ckpts, target, {"epoch": 2, "resume_step": 1, "history": hist,
                                    "step_metrics": [{"loss": 1.0}]})
    if damage == "garbage_meta":
        (ckpts / "preempt" / "meta.json").write_text("{not json")
    else:
        (ckpts / "preempt" / "state" / "_METADATA").unlink()
    capsys.readouterr()
    _, hist3 = _tiny_fit(tmp_path, 3, ckpts)
    out = capsys.readouterr().out
    assert "preempted checkpoint" in out and "unreadable" in out and "corrupt-preempt-0" in out
    assert [h["epoch"] for h in hist3] == [0, 1, 2]
    assert (ckpts / "corrupt-preempt-0").is_dir() and not (ckpts / "preempt").exists()


def _restore_target():
    """The train-state structure `_tiny_fit` saves (after the method's init)."""
    from jaxprune import train_step
    from jaxprune.graph import trace_linen
    from jaxprune.methods import get_method
    from jaxprune.models import get_model

    model = get_model("resnet20")
    x = jnp.zeros((1, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    graph = trace_linen(model, variables, x)
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), x,
                                          optim.make_optimizer(0.05))
    return train_step.prune_init(get_method("sfp", rate=0.3).pruner(graph, 3, 2), state)


def test_an_edited_resume_step_is_refused_not_skipped(tmp_path):
    from test_checkpoints import small_state

    state = small_state(11.0)  # optimizer step 11
    meta = {"epoch": 1, "resume_step": 3, "history": [{"epoch": 0, "step": 8}],
            "step_metrics": [{"loss": 1.0}] * 3}
    ck.save_preempt(tmp_path, state, meta)
    restored, got = ck.load_preempt(tmp_path, small_state(), steps_per_epoch=8)
    assert got["resume_step"] == 3 and int(restored.step) == 11
    for edit, named in (({"resume_step": 5}, "resume_step=5 but 3 steps are recorded"),
                        ({"resume_step": 5, "step_metrics": [{"loss": 1.0}] * 5},
                         "resume_step=5 but the state took 3 steps"),
                        ({"resume_step": 9, "step_metrics": [{"loss": 1.0}] * 9},
                         "resume_step=9 is not a step inside the epoch")):
        doc = dict(meta, **edit)
        (tmp_path / "preempt" / "meta.json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=named):
            ck.load_preempt(tmp_path, small_state(), steps_per_epoch=8)


# ----------------------------------------------------------------------------- 3. weights


def test_check_weights_names_the_tensor():
    good = {"params": {"conv": {"kernel": np.ones((2, 2))}},
            "batch_stats": {"bn": {"mean": np.zeros(2), "var": np.ones(2)}}}
    ck.check_weights(good)
    nan = jax.tree.map(np.copy, good)
    nan["params"]["conv"]["kernel"][1, 0] = np.nan
    with pytest.raises(ck.BadWeightsError,
                       match=r"params/conv/kernel holds 1 non-finite value\(s\) \(of 4\)"):
        ck.check_weights(nan)
    neg = jax.tree.map(np.copy, good)
    neg["batch_stats"]["bn"]["var"][0] = -0.5
    with pytest.raises(ck.BadWeightsError, match=r"batch_stats/bn/var .* negative values \(min -0.5\)"):
        ck.check_weights(neg)
    ints = jax.tree.map(np.copy, good)
    ints["params"]["conv"]["kernel"] = np.ones((2, 2), np.int32)
    with pytest.raises(ck.BadWeightsError, match="params/conv/kernel has dtype int32"):
        ck.check_weights(ints)


def test_a_restored_step_with_nan_weights_is_skipped_like_a_damaged_one(tmp_path):
    from test_checkpoints import small_state

    mgr = ck.make_checkpoint_manager(tmp_path, max_to_keep=5)
    ck.save_checkpoint(mgr, small_state(1.0), epoch=0, metrics={"test_accuracy": 0.1})
    bad = small_state(2.0)
    kernel = bad.params["conv"]["kernel"].at[0, 0, 0, 1].set(jnp.nan)
    bad = bad.replace(params={**bad.params, "conv": {"kernel": kernel}})
    ck.save_checkpoint(mgr, bad, epoch=1, metrics={"test_accuracy": 0.1})
    warned = []
    state, _, step = ck.restore_latest_good(mgr, small_state(), warn=warned.append)
    mgr.close()
    assert step == 1 and float(state.params["conv"]["kernel"][0, 0, 0, 0]) == 1.0
    assert "step 2" in warned[0] and "params/conv/kernel holds 1 non-finite value" in warned[0]


def _import_npz(tmp_path, edit) -> Path:
    from test_import import torch_state_dict

    sd = torch_state_dict(20)
    edit(sd)
    path = tmp_path / "sd.npz"
    np.savez(path, **sd)
    return path


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.__setitem__("bn1.running_var", -np.abs(sd["bn1.running_var"])),
     "'bn1.running_var' (a BatchNorm running variance) holds negative values"),
    (lambda sd: sd.__setitem__("conv1.weight", sd["conv1.weight"].astype(np.int64)),
     "'conv1.weight' has dtype int64"),
    (lambda sd: sd["linear.bias"].__setitem__(0, np.inf), "'linear.bias' holds non-finite"),
])
def test_import_refuses_bad_weights_naming_the_tensor(tmp_path, capsys, edit, named):
    src = _import_npz(tmp_path, edit)
    capsys.readouterr()
    rc = cli.main(["import", "resnet20", str(src), "--workdir", str(tmp_path / "imp")])
    assert rc == cli.EXIT_USAGE and named in _one_line(capsys)
    assert not (tmp_path / "imp").exists()


def test_import_clears_the_temporary_of_a_killed_import(tmp_path):
    src = _import_npz(tmp_path, lambda sd: None)
    stale = tmp_path / ".imp.import-deadbeef"  # what a SIGKILLed import leaves
    (stale / "compact").mkdir(parents=True)
    assert cli.main(["import", "resnet20", str(src), "--workdir", str(tmp_path / "imp")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imp", "sd.npz"]


def test_import_names_a_truncated_npz(tmp_path, capsys):
    src = _import_npz(tmp_path, lambda sd: None)
    src.write_bytes(src.read_bytes()[:1000])
    capsys.readouterr()
    rc = cli.main(["import", "resnet20", str(src), "--workdir", str(tmp_path / "imp")])
    err = _one_line(capsys)
    assert rc == cli.EXIT_USAGE and str(src) in err and "not a readable .npz" in err
    assert not (tmp_path / "imp").exists()


@pytest.fixture(scope="module")
def nan_model_dir(run2, tmp_path_factory):
    """A trained-model directory (config.json + a dense compact model) whose stem kernel holds
    a NaN."""
    from jaxprune.models import get_model

    d = tmp_path_factory.mktemp("nan") / "trained"
    d.mkdir()
    shutil.copy(run2 / "config.json", d / "config.json")
    model = get_model("resnet20", num_classes=10)
    variables = jax.tree.map(np.array, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    variables["params"]["stem"]["kernel"][0, 0, 0, 0] = np.nan
    art.save_compact(d / "compact", model, variables,
                     {"input_shape": [8, 8, 3], "dataset": "digits", "test_subset": 64})
    return d


def test_eval_refuses_nan_weights_with_exit_3(nan_model_dir, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(nan_model_dir)]) == cli.EXIT_DIVERGED
    err = _one_line(capsys)
    assert "params/stem/kernel holds 1 non-finite value" in err and "compact" in err


def test_nan_pretrained_weights_are_refused_before_training(nan_model_dir, cfg_file, tmp_path, capsys):
    work = tmp_path / "pre"
    capsys.readouterr()
    rc = cli.main(_train(cfg_file, work, f"--config.pretrained={nan_model_dir}"))
    err = _one_line(capsys)
    assert rc == cli.EXIT_USAGE and "params/stem/kernel holds 1 non-finite value" in err
    assert not work.exists()


def test_hard_masks_must_be_binary_and_finite():
    check_hard_masks({"a": jnp.array([1.0, 0.0, 1.0]), "b": np.ones(2)})
    for value, shown in ((0.5, "0.5"), (2.0, "2.0"), (np.nan, "nan"), (-1.0, "-1.0")):
        with pytest.raises(ValueError, match=rf"group 'b' channel 1 has mask value {shown} "
                                             r"\(1 non-binary value\(s\)\)"):
            check_hard_masks({"a": jnp.ones(3), "b": jnp.array([1.0, value, 0.0])})


def test_nan_scores_rank_lowest_so_they_are_pruned_first():
    from jaxprune.selection import ranks

    s = jnp.array([0.5, jnp.nan, 3.0, 2.0])
    np.testing.assert_array_equal(selection.prune_by_count({"g": s}, {"g": 1})["g"], [1, 0, 1, 1])
    np.testing.assert_array_equal(selection.prune_by_count({"g": s}, {"g": 2})["g"], [0, 0, 1, 1])
    np.testing.assert_array_equal(ranks(s), [1, 0, 3, 2])
    glob = selection.prune_by_global_threshold({"g": s, "h": jnp.array([1.0, 4.0])}, 0.2,
                                               normalize=False)
    np.testing.assert_array_equal(glob["g"], [1, 0, 1, 1])
    np.testing.assert_array_equal(glob["h"], [1, 1])


@pytest.mark.parametrize("call, named", [
    (lambda: optim.make_optimizer(float("nan")), "learning_rate must be a finite number"),
    (lambda: optim.make_optimizer(float("inf")), "learning_rate must be a finite number"),
    (lambda: optim.make_optimizer(-0.1), "learning_rate must be a finite number >= 0, got -0.1"),
    (lambda: optim.make_optimizer(0.1, weight_decay=float("nan")), "weight_decay"),
    (lambda: optim.make_optimizer(0.1, momentum=float("nan")), "momentum"),
    (lambda: optim.constant_schedule(float("nan")), "learning_rate"),
    (lambda: optim.step_schedule(10, base_lr=float("inf")), "base_lr"),
    (lambda: optim.sfp_cifar_schedule(10, warmup_lr=float("nan")), "warmup_lr"),
    (lambda: optim.step_schedule(10, factor=float("nan")), "factor"),
])
def test_non_finite_hyperparameters_are_refused_at_every_entry_point(call, named):
    with pytest.raises(ValueError, match=named):
        call()


# ----------------------------------------------------------------------------- 4. leftovers


def test_a_command_refused_after_the_directory_was_made_leaves_nothing(cfg_file, run2, tmp_path,
                                                                        capsys, monkeypatch):
    from jaxprune import experiment

    def refuse(*a, **k):
        raise ValueError("refused by the method")

    monkeypatch.setattr(experiment, "_fit_phase", refuse)
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    assert cli.main(_train(cfg_file, fresh)) == cli.EXIT_USAGE
    assert "refused by the method" in _one_line(capsys)
    assert not fresh.exists()
    # an existing directory without a checkpoint gets its records back
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((run2 / "config.json").read_text())
    assert cli.main(_train(cfg_file, old, "--config.epochs=3", "--allow-schedule-change")) == cli.EXIT_USAGE
    assert (old / "config.json").read_text() == (run2 / "config.json").read_text()
    assert not (old / "config_changes.jsonl").exists()


def test_a_directory_as_config_and_a_damaged_compact_model_are_one_line(tmp_path, run2, capsys):
    capsys.readouterr()
    assert cli.main(["train", "--config", str(tmp_path), "--workdir", str(tmp_path / "w")]) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert str(tmp_path) in err and "is a directory" in err
    work = _copy(run2, tmp_path)
    largest = max((p for p in (work / "compact" / "variables").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    _truncate_largest(work / "compact" / "variables")
    assert cli.main(["eval", str(work)]) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert str(largest) in err and "does not match its checksum" in err
    work = _copy(run2, tmp_path / "again")
    (work / "compact" / "model" / "metadata").write_text("{bad")
    assert cli.main(["eval", str(work)]) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert str(work / "compact" / "model" / "metadata") in err and "does not match its checksum" in err
    # without its checksums the reader's own check still names the damage in one line
    (work / "compact" / "CHECKSUMS.json").unlink()
    doc = work / "compact" / "model" / "metadata"
    assert cli.main(["eval", str(work)]) == cli.EXIT_USAGE
    err = _one_line(capsys)
    assert str(work / "compact") in err and "'model' document is unreadable" in err
    assert doc.read_text() == "{bad"


def test_compact_model_files_are_checksummed_and_verified_at_load(run2, tmp_path, capsys):
    """A flipped byte, a cut end or a missing file of a saved compact model is refused by
    `jaxprune.load` (CorruptArtifactError naming the file) and by the CLI (one line, exit 2)."""
    work = _copy(run2, tmp_path)
    compact_dir = work / "compact"
    recorded = json.loads((compact_dir / "CHECKSUMS.json").read_text())["sha256"]
    assert recorded and all((compact_dir / rel).is_file() for rel in recorded)
    assert set(recorded) == {p.relative_to(compact_dir).as_posix() for p in compact_dir.rglob("*")
                             if p.is_file() and p.name != "CHECKSUMS.json"}
    art.load(compact_dir)  # intact: loads
    target = max((compact_dir / rel for rel in recorded), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    for damage in ("flip", "cut", "missing"):
        if damage == "flip":
            damaged = bytearray(data)
            damaged[len(damaged) // 2] ^= 0x01
            target.write_bytes(bytes(damaged))
        elif damage == "cut":
            target.write_bytes(bytes(data[: len(data) - 7]))
        else:
            target.unlink()
        with pytest.raises(art.CorruptArtifactError, match=str(target)):
            art.load(compact_dir)
        capsys.readouterr()
        assert cli.main(["eval", str(compact_dir)]) == cli.EXIT_USAGE
        assert str(target) in _one_line(capsys)
        target.write_bytes(bytes(data))
    art.load(compact_dir)  # restored: loads again


def test_the_first_ctrl_c_during_compaction_is_not_called_a_second_one(run2, tmp_path, capsys,
                                                                        monkeypatch):
    from jaxprune.commands import compact as compact_command

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    work = _copy(run2, tmp_path)
    before = snapshot(work)
    monkeypatch.setattr(compact_command, "finish", interrupted)  # `jaxprune compact` compacts
    capsys.readouterr()
    assert cli.main(["compact", str(work)]) == cli.EXIT_INTERRUPTED
    err = _one_line(capsys)
    assert "interrupted by Ctrl-C" in err and "second" not in err
    assert snapshot(work) == before


def test_sigterm_at_the_end_of_the_last_epoch_exits_4_and_the_rerun_finishes(tmp_path, capsys,
                                                                             monkeypatch):
    from jaxprune import train_step

    cfg = tmp_path / "p.py"
    cfg.write_text(tiny_config_source(epochs=1, train_subset=128, steps_per_call=1))
    work = tmp_path / "w"
    real_chunk = train_step.make_train_chunk
    calls = []

    def signalling(*a, **k):
        fn = real_chunk(*a, **k)

        def chunk(*xs):
            out = fn(*xs)
            calls.append(1)
            if len(calls) == 2:  # the last step of the last epoch
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        chunk.steps, chunk.with_steps = fn.steps, fn.with_steps
        return chunk

    monkeypatch.setattr(train_step, "make_train_chunk", signalling)
    capsys.readouterr()
    assert cli.main(_train(cfg, work)) == cli.EXIT_PREEMPTED
    err = _one_line(capsys)
    assert "at the end of epoch 1; its checkpoint was saved; rerun the same command to finish" in err
    assert not (work / "result.json").exists() and not (work / "compact").exists()
    monkeypatch.undo()
    assert cli.main(_train(cfg, work)) == 0
    assert json.loads((work / "result.json").read_text())["from_state"]["epochs_done"] == 1
