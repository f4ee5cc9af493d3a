"""The paper-row configs (jaxprune/configs), the runner (experiments/run.py) and the report
(jaxprune.report): every row loads, validates and states its paper row and numbers; SFP rows'
FLOPs claims match SFP's formula; the runner plans dependencies and schedules; the report lists
every row, "not yet run" where no record exists, mean +- std right. The end-to-end --tiny runs
are @pytest.mark.slow (python -m pytest -m slow tests/test_experiments.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import config as config_lib
from jaxprune.flops import sfp_formula_reduction

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "jaxprune" / "configs"
CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"

EXPECTED_ROWS = {
    # SFP (CIFAR-10 from scratch, pretrained, ImageNet)
    "sfp_resnet20_cifar10", "sfp_resnet32_cifar10", "sfp_resnet56_cifar10", "sfp_resnet110_cifar10",
    "sfp_resnet56_cifar10_pretrained", "sfp_resnet110_cifar10_pretrained", "sfp_resnet18_imagenet", "sfp_resnet34_imagenet",
    "sfp_resnet50_imagenet",
    # dense baselines
    "dense_resnet20_cifar10", "dense_resnet32_cifar10", "dense_resnet56_cifar10",
    "dense_resnet110_cifar10", "dense_vgg16_cifar10", "dense_resnet56_cifar100",
    "dense_resnet110_cifar100", "dense_resnet34_imagenet",
    # PFEC
    "pfec_vgg16_cifar10_A", "pfec_resnet56_cifar10_A", "pfec_resnet56_cifar10_B",
    "pfec_resnet110_cifar10_A", "pfec_resnet110_cifar10_B", "pfec_resnet34_imagenet_A",
    "pfec_resnet34_imagenet_B", "pfec_resnet34_imagenet_C",
    # GHFP and its controls (the CIFAR-10 SFP controls are the SFP rows)
    "ghfp_resnet56_cifar10", "ghfp_resnet110_cifar10", "ghfp_resnet56_cifar100",
    "ghfp_resnet110_cifar100", "asfp_resnet56_cifar10", "asfp_resnet110_cifar10",
    "asfp_resnet56_cifar100", "asfp_resnet110_cifar100", "sfp_resnet56_cifar100",
    "sfp_resnet110_cifar100",
    # HFP
    "hfp_resnet56_cifar10", "hfp_resnet50_imagenet",
}


def _load_runner():
    spec = importlib.util.spec_from_file_location("jaxprune_experiments_run", REPO / "experiments" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


runner = _load_runner()
ROWS = runner.row_names()


def _module_doc(name: str) -> str:
    import ast

    return ast.get_docstring(ast.parse((CONFIGS / f"{name}.py").read_text())) or ""


def _doc_numbers(doc: str) -> str:
    return doc.replace("\n", " ")


# ----------------------------------------------------------------------------- configs


def test_every_paper_row_has_a_config():
    assert set(ROWS) == EXPECTED_ROWS


@pytest.mark.parametrize("name", sorted(EXPECTED_ROWS))
def test_config_loads_validates_and_states_its_paper_row(name):
    from jaxprune.factories import make_method

    cfg = config_lib.load_config(CONFIGS / f"{name}.py")
    config_lib.validate(cfg)
    make_method(cfg)  # the method kwargs (PFEC config names, HFP targets, GHFP ramp) are accepted
    assert cfg.name == name
    method, model, dataset = name.split("_")[:3]
    assert cfg.method.name == method and cfg.model == model
    assert cfg.dataset == {"imagenet": "imagenet2012"}.get(dataset, dataset)
    assert cfg.num_seeds == (1 if cfg.dataset == "imagenet2012" else 3)
    p = cfg.paper
    assert p.source and p.row and p.table in ("SFP", "PFEC", "GHFP", "HFP", "Baselines")
    doc = _module_doc(name)
    text = _doc_numbers(doc)
    assert f'"{p.row}"' in text, f"{name}: the docstring does not name its paper row {p.row!r}"
    for key, digits in (("baseline_acc", 2), ("pruned_acc", 2), ("macs_reduction", 1),
                        ("params_reduction", 1)):
        v = p[key]
        assert v == -1.0 or v >= 0
        if v >= 0:
            assert f"{v:.{digits}f}" in text, f"{name}: docstring lacks paper.{key} = {v}"
    for ctrl in p.get("controls", ()):
        assert ctrl in EXPECTED_ROWS and ctrl in text


def test_load_config_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load_config(str(CONFIGS / "pfec_resnet56_cifar10_A.py"))
    assert cfg.method.kwargs.config == "resnet56-A"
    assert cfg.pretrained == "experiments/runs/dense_resnet56_cifar10/seed0"
    assert Path(sys.modules["jaxprune.configs.common"].__file__).resolve() == CONFIGS / "common.py"
    assert "common" not in sys.modules  # no top-level module named `common` is imported


def test_overrides_apply_to_row_configs():
    cfg = config_lib.load_config(CONFIGS / "sfp_resnet56_cifar10.py")
    cfg = config_lib.override(cfg, ["epochs=10", "method.rate=0.3", "paper.row=x"])
    assert (cfg.epochs, cfg.method.rate, cfg.paper.row) == (10, 0.3, "x")


def test_sfp_rows_flops_claims_match_the_sfp_formula():
    checked = 0
    for name in ROWS:
        cfg = config_lib.load_config(CONFIGS / f"{name}.py")
        if cfg.method.name not in ("sfp", "asfp", "ghfp") or cfg.dataset == "imagenet2012":
            continue
        depth = int(cfg.model[len("resnet"):])
        formula = 100 * sfp_formula_reduction(depth, 1 - cfg.method.rate)
        if cfg.paper.macs_reduction >= 0:
            assert abs(formula - cfg.paper.macs_reduction) <= 0.05 + 1e-9, (name, formula)
            checked += 1
    assert checked == 6  # ResNet-20/32/56/110 from scratch, ResNet-56/110 from a trained model


def test_sfp_rows_use_the_papers_rates_and_recipe():
    rates = {"resnet20": 0.3, "resnet32": 0.3, "resnet56": 0.4, "resnet110": 0.3, "resnet18": 0.3,
             "resnet34": 0.3, "resnet50": 0.3}
    for name in ROWS:
        cfg = config_lib.load_config(CONFIGS / f"{name}.py")
        if cfg.method.name in ("sfp", "asfp", "ghfp"):
            assert cfg.method.rate == rates[cfg.model], name
            assert cfg.method.criterion == "l2" and cfg.method.residual == "scatter"
        if cfg.dataset == "imagenet2012" and cfg.method.name != "pfec":
            assert (cfg.batch_size, cfg.optimizer.base_lr, cfg.optimizer.weight_decay) == (256, 0.1, 1e-4)
            if cfg.method.name == "sfp":
                assert cfg.epochs == 100 and tuple(cfg.optimizer.boundaries) == (30, 60, 90)
                assert tuple(cfg.method.exclude) == ("*/downsample",)
        elif cfg.method.name != "pfec":
            o = cfg.optimizer
            assert cfg.epochs == 200 and tuple(o.boundaries) == (60, 120, 160)
            assert (o.schedule, o.factor, o.weight_decay, o.nesterov) == ("sfp_cifar", 0.2, 5e-4, True)
            if cfg.method.name in ("ghfp", "asfp"):  # the GHFP author's recipe: no warm-up, Cutout
                assert (o.warmup_lr, o.base_lr) == (0.1, 0.1), name
                assert cfg.cutout == {"cifar10": 12, "cifar100": 6}[cfg.dataset], name
            elif cfg.pretrained:  # SFP from a trained model: one tenth of the LR (FPGM 4.1)
                assert (o.warmup_lr, o.base_lr, cfg.cutout) == (0.001, 0.01, 0), name
            else:  # the SFP paper recipe
                assert (o.warmup_lr, o.base_lr, cfg.cutout) == (0.01, 0.1, 0), name
        if cfg.method.name == "pfec":
            assert cfg.optimizer.schedule == "constant" and cfg.optimizer.base_lr == 0.001
            assert cfg.epochs == (20 if cfg.dataset == "imagenet2012" else 40)


def test_ghfp_rows_run_the_authors_variant_and_controls_its_soft_part():
    from jaxprune.factories import make_method
    from jaxprune.methods import GHFP

    seen = 0
    for name in ROWS:
        cfg = config_lib.load_config(CONFIGS / f"{name}.py")
        if cfg.method.name == "ghfp":
            assert make_method(cfg) == GHFP.author(cfg.method.rate), name
            for control in cfg.paper.controls:
                ctrl = config_lib.load_config(CONFIGS / f"{control}.py")
                if ctrl.method.name == "asfp":  # the same soft part on the same recipe
                    assert make_method(ctrl) == GHFP.author(cfg.method.rate).soft, control
                    assert (ctrl.cutout, ctrl.optimizer.to_dict()) == (cfg.cutout, cfg.optimizer.to_dict())
                    seen += 1
    assert seen == 4


def test_pretrained_rows_depend_on_their_dense_baseline():
    deps = {}
    for name in ROWS:
        cfg = config_lib.load_config(CONFIGS / f"{name}.py")
        dep = runner.dependency(cfg, ROWS)
        assert (dep is None) == (cfg.pretrained == ""), name
        if dep is not None:
            base = config_lib.load_config(CONFIGS / f"{dep[0]}.py")
            assert dep[1] == 0 and base.method.name == "dense"
            assert (base.model, base.dataset) == (cfg.model, cfg.dataset)
            # the baseline's checkpoint (per-group masks) must fit this row's graph
            assert base.method.residual == cfg.method.residual, name
            deps[name] = dep[0]
    assert set(deps) == {n for n in EXPECTED_ROWS if n.startswith("pfec_")} | {
        "sfp_resnet56_cifar10_pretrained", "sfp_resnet110_cifar10_pretrained"}


# ----------------------------------------------------------------------------- runner


def _opts(tmp_path, **kw):
    return runner.Options(runs_dir=tmp_path / "runs", records_dir=tmp_path / "rec", **kw)


def test_plan_runs_dependencies_first_and_points_pretrained_at_them(tmp_path):
    jobs = runner.plan(["pfec_resnet56_cifar10_A"], _opts(tmp_path, tiny=True), seeds=2)
    assert [(j.row, j.seed, j.requested) for j in jobs] == [
        ("dense_resnet56_cifar10", 0, False), ("pfec_resnet56_cifar10_A", 0, True),
        ("pfec_resnet56_cifar10_A", 1, True)]
    assert jobs[1].config.pretrained == str(tmp_path / "runs" / "dense_resnet56_cifar10" / "seed0")
    assert jobs[2].config.seed == 1 and jobs[2].workdir == tmp_path / "runs" / "pfec_resnet56_cifar10_A" / "seed1"
    assert jobs[2].record_path == tmp_path / "rec" / "pfec_resnet56_cifar10_A" / "seed1.json"
    assert all(j.schedule == "tiny" and j.config.epochs == 2 and j.config.train_subset == 256 for j in jobs)
    # a dependency that is also requested runs with the row's own overrides
    jobs = runner.plan(["pfec_resnet56_cifar10_A", "dense_resnet56_cifar10"],
                       _opts(tmp_path, overrides=("steps_per_call=7", "batch_size=64")), only_seed=0)
    assert [(j.row, j.requested, j.config.batch_size) for j in jobs] == [
        ("dense_resnet56_cifar10", True, 64), ("pfec_resnet56_cifar10_A", True, 64)]


def test_a_preempted_run_stops_the_runner_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM inside a run (training.Preempted, its checkpoint saved) stops the runner: one
    line, no traceback, no later run started."""
    from jaxprune.training import Preempted

    jobs = runner.plan(["sfp_resnet20_cifar10", "sfp_resnet32_cifar10"], _opts(tmp_path, tiny=True),
                       seeds=1)
    started = []

    def execute(job, opts, data):
        started.append(job.row)
        raise Preempted("stopped by SIGTERM at epoch 1, step 3; a checkpoint of epoch 1, step 3 "
                        "was saved; rerun the same command to resume")

    monkeypatch.setattr(runner, "execute", execute)
    status = runner.run_jobs(jobs, _opts(tmp_path, tiny=True))
    assert started == ["sfp_resnet20_cifar10"]
    assert list(status.values()) == ["stopped by SIGTERM at epoch 1, step 3; a checkpoint of epoch 1, "
                                     "step 3 was saved; rerun the same command to resume"]
    assert "Traceback" not in capsys.readouterr().out


def test_a_full_disk_stops_the_runner_in_one_line(tmp_path, monkeypatch, capsys):
    """A failed write inside a run (ENOSPC, the path named) stops the runner with one line and
    no traceback, no later row started, and ``main`` exits 5 (as the CLI)."""
    import errno

    jobs = runner.plan(["sfp_resnet20_cifar10", "sfp_resnet32_cifar10"], _opts(tmp_path, tiny=True),
                       seeds=1)
    started = []

    def execute(job, opts, data):
        started.append(job.row)
        raise RuntimeError("saving failed") from OSError(errno.ENOSPC, "No space left on device",
                                                         "/runs/x/metrics.jsonl")

    monkeypatch.setattr(runner, "execute", execute)
    status = runner.run_jobs(jobs, _opts(tmp_path, tiny=True))
    assert started == ["sfp_resnet20_cifar10"]
    (line,) = status.values()
    assert line.startswith("write failed: cannot write /runs/x/metrics.jsonl: No space left on "
                           f"device (errno {errno.ENOSPC})")
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert runner.main(["sfp_resnet20_cifar10", "--tiny", "--seeds", "1", "--runs-dir",
                        str(tmp_path / "r"), "--records", str(tmp_path / "rec")]) == 5


def test_overrides_reach_dependencies_only_for_environment_keys(tmp_path):
    jobs = runner.plan(["sfp_resnet56_cifar10_pretrained"],
                       _opts(tmp_path, overrides=("data_dir=/x", "batch_size=64")), only_seed=0)
    dep, row = jobs
    assert (dep.config.data_dir, dep.config.batch_size) == ("/x", 128)
    assert (row.config.data_dir, row.config.batch_size) == ("/x", 64)


def test_a_shortened_recipe_keeps_each_lr_phase_share(tmp_path):
    """A 3-epoch SFP recipe warms up, reaches LR 0.1 and steps down x0.2 three times, each phase
    holding the same share of the steps as in the 200-epoch recipe (to within a step)."""
    from jaxprune.factories import make_schedule

    (full,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path), only_seed=0)
    (short,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path, epochs=3), only_seed=0)
    spe = 390

    def shares(cfg):
        sched = make_schedule(cfg, spe)
        lrs = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(cfg.epochs * spe)), np.float32)
        values, counts = np.unique(lrs, return_counts=True)
        return dict(zip(values.tolist(), (counts / len(lrs)).tolist()))

    a, b = shares(full.config), shares(short.config)
    assert sorted(a) == sorted(b) and len(a) == 5  # 0.01 warm-up, 0.1, 0.02, 0.004, 0.0008
    assert max(b) == pytest.approx(0.1)
    for lr in a:
        assert abs(a[lr] - b[lr]) <= 1.0 / (3 * spe) + 1e-9, (lr, a[lr], b[lr])


def test_schedules_and_labels(tmp_path):
    assert runner.scale_boundaries((60, 120, 160), 200, 20) == (6, 12, 16)
    assert runner.scale_boundaries((60, 120, 160), 200, 2) == (0.6, 1.2, 1.6)
    (job,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path, epochs=20), only_seed=0)
    assert job.schedule == "short (20 epochs)" and tuple(job.config.optimizer.boundaries) == (6, 12, 16)
    (job,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path), only_seed=2)
    assert job.schedule == "paper" and job.config.epochs == 200 and job.config.seed == 2
    (job,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path, overrides=("train_subset=1000",)),
                         only_seed=0)
    assert job.schedule.startswith("short (200 epochs, 1000 training images")
    # HFP's fine-tuning epochs shrink with the schedule, never below one
    (job,) = runner.plan(["hfp_resnet56_cifar10"], _opts(tmp_path), only_seed=0)
    assert (job.config.epochs, job.config.finetune_epochs, job.config.finetune_lr) == (200, 20, 0.001)
    (job,) = runner.plan(["hfp_resnet56_cifar10"], _opts(tmp_path, epochs=20), only_seed=0)
    assert job.config.finetune_epochs == 2
    (job,) = runner.plan(["hfp_resnet56_cifar10"], _opts(tmp_path, epochs=2), only_seed=0)
    assert job.config.finetune_epochs == 1
    (job,) = runner.plan(["sfp_resnet56_cifar10"], _opts(tmp_path, epochs=20), only_seed=0)
    assert job.config.finetune_epochs == 0


def test_row_selection(tmp_path):
    assert runner.select_rows(["pfec_resnet56_*"]) == ["pfec_resnet56_cifar10_A", "pfec_resnet56_cifar10_B"]
    assert runner.select_rows(["jaxprune/configs/hfp_resnet56_cifar10.py"]) == ["hfp_resnet56_cifar10"]
    assert runner.select_rows(["all"]) == ROWS
    with pytest.raises(ValueError, match="no row matches"):
        runner.select_rows(["nope_*"])


def test_tiny_runs_never_suggest_writing_tracked_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, opts, stop_after=None: {})
    rec = tmp_path / "rec"
    assert runner.main(["sfp_resnet20_cifar10", "--tiny", "--seeds", "1", "--records", str(rec),
                        "--runs-dir", str(tmp_path / "runs")]) == 0
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"jaxprune report --records {rec} [--out {rec / 'REPORT.md'}]" in hint
    assert "RESULTS.md" not in hint and "experiments/plots" not in hint


def test_cli_list_dry_run_and_errors(capsys):
    assert runner.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(r in out for r in EXPECTED_ROWS)
    assert runner.main(["pfec_vgg16_cifar10_A", "--tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dense_vgg16_cifar10/seed0 (dependency)" in out and "runs-tiny" in out
    assert runner.main(["nope"]) == 2
    assert "no row matches" in capsys.readouterr().err
    assert runner.main(["sfp_resnet20_cifar10", "--config.method.rate=2.0", "--dry-run"]) == 2


def test_finished_runs_are_skipped_and_recorded_and_foreign_runs_refused(tmp_path):
    opts = _opts(tmp_path)
    (job,) = runner.plan(["sfp_resnet20_cifar10"], opts, only_seed=0)
    job.workdir.mkdir(parents=True)
    (job.workdir / "config.json").write_text(json.dumps(job.config.to_dict()))
    (job.workdir / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "test_accuracy": 0.1 * e}) + "\n" for e in range(200)))
    result = {"compact_accuracy": 0.9, "masked_accuracy": 0.9, "macs_reduction_conv": 0.39,
              "device": "cpu:cpu x1", "wall_time_s": 1.0}
    (job.workdir / "result.json").write_text(json.dumps(result))
    status = runner.run_jobs([job], opts)
    assert status[("sfp_resnet20_cifar10", 0)] == "finished earlier"
    rec = json.loads(job.record_path.read_text())
    assert rec["row"] == "sfp_resnet20_cifar10" and rec["seed"] == 0 and rec["schedule"] == "paper"
    assert rec["accuracy"] == 0.9 and rec["config"]["method"]["rate"] == 0.3
    assert rec["paper"]["pruned_acc"] == 90.83 and len(rec["curve"]) == 200
    assert rec["test_accuracy_at_half"] == pytest.approx(9.9)
    # the same directory under another schedule is refused (no training starts)
    (short,) = runner.plan(["sfp_resnet20_cifar10"], _opts(tmp_path, epochs=5), only_seed=0)
    status = runner.run_jobs([short], opts)
    assert status[("sfp_resnet20_cifar10", 0)].startswith("failed: ValueError")
    assert "epochs" in status[("sfp_resnet20_cifar10", 0)]


def test_a_finished_dependency_serves_any_schedule(tmp_path):
    (paper,) = runner.plan(["dense_resnet56_cifar10"], _opts(tmp_path), only_seed=0)
    paper.workdir.mkdir(parents=True)
    (paper.workdir / "config.json").write_text(json.dumps(paper.config.to_dict()))
    (paper.workdir / "result.json").write_text(json.dumps({"compact_accuracy": 0.93}))
    opts = _opts(tmp_path, epochs=5, force=True)
    dep, row = runner.plan(["pfec_resnet56_cifar10_A"], opts, only_seed=0)
    assert not dep.requested and dep.config.epochs == 5 and row.config.pretrained == str(paper.workdir)
    status = runner.run_jobs([dep], opts)  # neither refused nor deleted by --force
    assert status[("dense_resnet56_cifar10", 0)].startswith("finished earlier")
    assert (paper.workdir / "result.json").is_file() and not dep.record_path.exists()


def test_a_paper_row_refuses_a_short_baseline_and_accepts_imported_weights(tmp_path):
    (short,) = runner.plan(["dense_resnet56_cifar10"], _opts(tmp_path, epochs=3), only_seed=0)
    short.workdir.mkdir(parents=True)
    (short.workdir / "config.json").write_text(json.dumps(short.config.to_dict(), default=list))
    (short.workdir / "result.json").write_text(json.dumps({"compact_accuracy": 0.5}))
    opts = _opts(tmp_path)
    dep, row = runner.plan(["pfec_resnet56_cifar10_A"], opts, only_seed=0)
    assert row.schedule == "paper"
    with pytest.raises(ValueError, match=r"labelled 'paper' .* trained 3 epochs .*its recipe has 200"):
        runner.check_paper_baseline(row, opts)
    status = runner.run_jobs([dep, row], opts)
    assert "labelled 'paper'" in status[("pfec_resnet56_cifar10_A", 0)]
    assert not row.workdir.exists(), "a refused row writes nothing"
    # a shortened row may start from it; a paper row may start from imported weights
    (srow,) = [j for j in runner.plan(["pfec_resnet56_cifar10_A"], _opts(tmp_path, epochs=3),
                                      only_seed=0) if j.requested]
    runner.check_paper_baseline(srow, opts)
    imp = tmp_path / "imp"
    imp.mkdir()
    (imp / "config.json").write_text(json.dumps({"name": "import_resnet56", "epochs": 200}))
    (imp / "import.json").write_text(json.dumps({"source": "x.npz", "sha256": "0" * 64}))
    (row,) = [j for j in runner.plan(["pfec_resnet56_cifar10_A"],
                                     _opts(tmp_path, overrides=(f"pretrained={imp}",)), only_seed=0)
              if j.requested]
    assert row.config.pretrained == str(imp) and row.depends is None
    runner.check_paper_baseline(row, opts)


def test_imagenet_rows_need_synthetic_data_in_tiny_mode(tmp_path):
    opts = _opts(tmp_path, tiny=True)
    jobs = runner.plan(["pfec_resnet34_imagenet_C"], opts)
    status = runner.run_jobs(jobs, opts)
    assert status[("dense_resnet34_imagenet", 0)] == (
        "skipped (ImageNet rows run in --tiny mode with --synthetic-data only)")
    assert status[("pfec_resnet34_imagenet_C", 0)].startswith("skipped (dependency")
    synth = _opts(tmp_path, tiny=True, synthetic_data=True)
    for job in runner.plan(["pfec_resnet34_imagenet_C", "sfp_resnet18_imagenet"], synth):
        c = job.config
        assert c.data_dir == str(synth.runs_dir / "synthetic-imagenet"), job.row
        assert (c.epochs, c.batch_size, c.image_size, c.eval_batch_size) == (2, 16, 64, 16)
        assert c.train_subset == 0 and job.schedule == "tiny"
    assert runner.main(["sfp_resnet18_imagenet", "--synthetic-data", "--dry-run"]) == 2


def test_the_sfp_imagenet_recipe_uses_nesterov_as_the_official_script():
    for row in ROWS:
        cfg = runner.load_row(row)
        if cfg.dataset == "imagenet2012":
            assert cfg.optimizer.nesterov == row.startswith("sfp_"), row


# ----------------------------------------------------------------------------- report


def _fake_record(row, seed, acc, schedule="paper", **extra):
    rec = {"row": row, "seed": seed, "schedule": schedule, "compact_accuracy": acc,
           "masked_accuracy": acc, "macs_reduction_conv": 0.377, "macs_reduction_conv_fc": 0.376,
           "params_reduction": 0.38, "device": "gpu:NVIDIA H100 x1", "test_accuracy_at_half": 0.8}
    rec.update(extra)
    return rec


def _write_records(root: Path, recs):
    for rec in recs:
        p = root / rec["schedule"] / rec["row"] / f"seed{rec['seed']}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec))


def _table_line(md: str, row: str, schedule: str | None = None) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| `{row}` |") and (schedule is None or f"| {schedule} |" in line):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table line for {row} {schedule}")


def test_trained_on_counts_epochs_per_device_and_the_report_shows_them(tmp_path):
    from jaxprune import report
    from jaxprune.experiment import trained_on

    # 3 epochs on a GPU, 1 from before epochs named their device, 1 resumed on the CPU
    history = [{"epoch": i, "device": "gpu:NVIDIA H200 x1"} for i in range(3)]
    history += [{"epoch": 3}, {"epoch": 4, "device": "cpu:cpu x1"}]
    assert trained_on(history) == {"gpu:NVIDIA H200 x1": 3, "unrecorded": 1, "cpu:cpu x1": 1}
    assert list(trained_on(history)) == ["gpu:NVIDIA H200 x1", "unrecorded", "cpu:cpu x1"]
    assert trained_on([]) == {}
    # the report's device column: where the epochs trained, else where the record was made
    assert report.record_devices({"device": "cpu:cpu x1", "trained_on": {"gpu:NVIDIA H200 x1": 200}}) == [
        "gpu:NVIDIA H200 x1"]
    assert report.record_devices({"device": "cpu:cpu x1", "trained_on": {"unrecorded": 5}}) == ["cpu:cpu x1"]
    assert report.record_devices({"device": "cpu:cpu x1"}) == ["cpu:cpu x1"] and report.record_devices({}) == []
    records = tmp_path / "records"
    _write_records(records, [_fake_record("sfp_resnet56_cifar10", 0, 0.92, device="cpu:cpu x1",
                                          trained_on={"gpu:NVIDIA H200 x1": 199, "cpu:cpu x1": 1}),
                             _fake_record("sfp_resnet56_cifar10", 1, 0.93, device="gpu:NVIDIA H200 x1")])
    md = report.write_report(records, tmp_path / "RESULTS.md").read_text()
    assert _table_line(md, "sfp_resnet56_cifar10", "paper")[-1] == "gpu:NVIDIA H200 x1, cpu:cpu x1"


def test_report_lists_every_row_and_computes_mean_and_std(tmp_path):
    from jaxprune import report

    records = tmp_path / "records"
    _write_records(records, [_fake_record("sfp_resnet56_cifar10", 0, 0.92),
                             _fake_record("sfp_resnet56_cifar10", 1, 0.93),
                             _fake_record("sfp_resnet56_cifar10", 0, 0.5, schedule="tiny"),
                             _fake_record("ghfp_resnet56_cifar10", 0, 0.91),
                             _fake_record("my_adhoc_run", 0, 0.5)])
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nSanity runs: hand-written notes.\n\n"
                   f"{report.BEGIN}\nold tables\n{report.END}\n\nTrailing note.\n")
    report.write_report(records, out, plots=tmp_path / "plots")
    md = out.read_text()
    assert md.startswith("# Results\n\nSanity runs: hand-written notes.\n\n")
    assert md.rstrip().endswith("Trailing note.") and "old tables" not in md
    for row in EXPECTED_ROWS:
        assert f"| `{row}` |" in md, row
    cells = _table_line(md, "sfp_resnet56_cifar10", "paper")
    m, s = 100 * np.mean([0.92, 0.93]), 100 * np.std([0.92, 0.93], ddof=1)
    assert cells[4] == f"{m:.2f} ± {s:.2f}" == "92.50 ± 0.71"
    assert cells[3] == "2/3" and cells[5] == "92.26" and cells[6] == "+0.24"
    assert cells[7] == "37.7 / 37.6" and cells[8] == "52.6" and cells[9] == "52.6"
    assert cells[11] == "gpu:NVIDIA H100 x1"
    assert _table_line(md, "sfp_resnet56_cifar10", "tiny")[4] == "50.00"
    # a short (here: tiny) row shows no diff against the paper, but its schedule
    assert _table_line(md, "sfp_resnet56_cifar10", "tiny")[6] == "n/a"
    # every row without a record says so, or why it cannot run on this machine's data
    not_run = [r for r in EXPECTED_ROWS if r not in ("sfp_resnet56_cifar10", "ghfp_resnet56_cifar10")]
    for row in not_run:
        cfg = report.load_rows()[row]
        why = report.unavailable_reason(cfg["dataset"])
        assert _table_line(md, row)[2] == (why or report.NOT_RUN), row
        if cfg["dataset"] == "imagenet2012" and why:
            assert "imagenet2012" in why
    assert "| `my_adhoc_run` |" in md  # a record without a config still shows up
    ghfp = _table_line(md, "ghfp_resnet56_cifar10")
    assert ghfp[4] == "91.00" and ghfp[7] == "80.00"  # acc. at T/2 column
    hfp = _table_line(md, "hfp_resnet56_cifar10")
    assert hfp[7] == "MACs -50%, params -50%"
    # the GHFP table lists its controls (the SFP row on CIFAR-10 appears in both tables)
    ghfp_section = md.split("## GHFP")[1].split("## HFP")[0]
    assert "`sfp_resnet56_cifar10`" in ghfp_section and "`asfp_resnet56_cifar100`" in ghfp_section
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "cifar10_resnet56.png" in plots and "](plots/cifar10_resnet56.png)" in md
    # regenerating is idempotent
    report.write_report(records, out, plots=tmp_path / "plots")
    assert out.read_text() == md


def test_report_creates_and_appends_markers(tmp_path):
    from jaxprune import report

    new = tmp_path / "new.md"
    report.write_report(tmp_path / "none", new)
    text = new.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    for row in EXPECTED_ROWS:  # schedule and accuracy cells: not run, or why it cannot run here
        cells = _table_line(text, row)
        if cells[2] == report.NOT_RUN:
            assert cells[4] == report.NOT_RUN
        else:
            assert cells[2].startswith("cannot run here") and cells[4] == "—"
    old = tmp_path / "old.md"
    old.write_text("# My notes\n")
    report.write_report(tmp_path / "none", old)
    assert old.read_text().startswith("# My notes\n\n" + report.BEGIN)


def test_mean_std():
    from jaxprune.report import mean_std

    assert mean_std([0.5]) == (0.5, None)
    m, s = mean_std([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))


# ----------------------------------------------------------------------------- end to end (slow)


def _need_cifar10():
    if not (CIFAR10 / "test.npz").is_file():
        pytest.skip(f"needs the offline CIFAR-10 copy in {CIFAR10} (see ../shared/data/cifar10/README.md)")


def _cifar100_env(tmp_path) -> dict:
    """Env for the runner; a synthetic CIFAR-100 stand-in when no CIFAR-100 copy exists."""
    from jaxprune import data

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        data.load_cifar("cifar100", verify=False)
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        root = tmp_path / "data"
        data.write_npz_shards(root / "cifar100", rng.integers(0, 256, (600, 32, 32, 3), np.uint8),
                              np.arange(600) % 100, rng.integers(0, 256, (200, 32, 32, 3), np.uint8),
                              np.arange(200) % 100, class_names=[f"class{i}" for i in range(100)])
        env["JAXPRUNE_DATA_DIR"] = str(root)
    return env


def _run(args, env=None, timeout=None):
    return subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_runner_tiny_one_cifar_row(tmp_path):
    _need_cifar10()
    args = ["sfp_resnet20_cifar10", "--tiny", "--seeds", "1", "--no-progress",
            "--runs-dir", str(tmp_path / "runs"), "--records", str(tmp_path / "rec")]
    proc = _run(args, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "rec" / "sfp_resnet20_cifar10" / "seed0.json").read_text())
    assert rec["schedule"] == "tiny" and rec["epochs"] == 2 and rec["seed"] == 0
    assert rec["compact_accuracy"] == rec["masked_accuracy"]
    assert rec["dense"]["macs_conv"] == 40_550_400 and rec["compact"]["macs_conv"] < rec["dense"]["macs_conv"]
    assert {"macs_conv", "macs_conv_fc", "params"} <= set(rec["compact"])
    assert rec["sfp_formula_macs_reduction"] == pytest.approx(0.422, abs=5e-4)
    assert len(rec["curve"]) == 2 and rec["wall_time_s"] > 0 and rec["device"].startswith("cpu")
    assert (tmp_path / "runs" / "sfp_resnet20_cifar10" / "seed0" / "compact").is_dir()
    again = _run(args, timeout=600)  # finished: skipped, record rewritten
    assert again.returncode == 0 and "finished earlier" in again.stdout
    from jaxprune.report import write_report

    md = write_report(tmp_path / "rec", tmp_path / "RESULTS.md").read_text()
    assert _table_line(md, "sfp_resnet20_cifar10", "tiny")[3] == "1/3"


@pytest.mark.slow
def test_all_cifar_rows_run_end_to_end_on_tiny(tmp_path):
    _need_cifar10()
    env = _cifar100_env(tmp_path)
    rows = [r for r in ROWS if not r.endswith("imagenet") and "_imagenet_" not in r]
    assert len(rows) == 28
    proc = _run([*rows, "--tiny", "--seeds", "1", "--no-progress", "--runs-dir", str(tmp_path / "runs"),
                 "--records", str(tmp_path / "rec")], env=env, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    from jaxprune.report import write_report

    md = write_report(tmp_path / "rec", tmp_path / "RESULTS.md").read_text()
    for row in rows:
        rec = json.loads((tmp_path / "rec" / row / "seed0.json").read_text())
        assert rec["schedule"] == "tiny" and rec["compact_accuracy"] == rec["masked_accuracy"], row
        if not row.startswith("dense_"):
            assert rec["macs_reduction_conv"] > 0, row
        assert _table_line(md, row, "tiny")[3] == "1/3", row
    hfp = json.loads((tmp_path / "rec" / "hfp_resnet56_cifar10" / "seed0.json").read_text())
    assert 0.495 <= hfp["macs_reduction_conv_fc"] <= 0.51  # HFP meets its MACs target


@pytest.mark.slow
def test_all_imagenet_rows_run_end_to_end_on_synthetic_data(tmp_path):
    """Every ImageNet row (dependencies included) on the generated TFDS ImageNet: streamed
    training, re-selection / one-shot pruning, compaction, streamed top-1/top-5 evaluation."""
    rows = [r for r in ROWS if r.endswith("imagenet") or "_imagenet_" in r]
    assert len(rows) == 8
    proc = _run([*rows, "--tiny", "--synthetic-data", "--no-progress", "--runs-dir",
                 str(tmp_path / "runs"), "--records", str(tmp_path / "rec")], timeout=4 * 3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for row in rows:
        rec = json.loads((tmp_path / "rec" / row / "seed0.json").read_text())
        assert rec["schedule"] == "tiny" and rec["dataset"] == "imagenet2012", row
        assert rec["compact_accuracy"] == rec["masked_accuracy"], row
        assert rec["compact_top5"] == rec["masked_top5"], row
        if not row.startswith("dense_"):
            assert rec["macs_reduction_conv"] > 0, row


def test_sanity_table_formats_records_dense_first(tmp_path):
    spec = importlib.util.spec_from_file_location("jaxprune_sanity_table", REPO / "experiments" / "sanity_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cost = lambda m, f, p: {"macs_conv": m, "macs_conv_fc": f, "params": p}  # noqa: E731
    for name, method, rate, acc in (("b_sfp", "sfp", 0.3, 0.5), ("a_dense", "dense", 0.0, 0.6)):
        d = tmp_path / name
        d.mkdir()
        c = cost(1000, 1010, 100) if method == "dense" else cost(600, 605, 55)
        (d / "result.json").write_text(json.dumps({
            "name": name, "method": method, "rate": rate, "epochs": 2, "masked_accuracy": acc,
            "compact_accuracy": acc, "dense": cost(1000, 1010, 100), "compact": c,
            "macs_reduction_conv": 1 - c["macs_conv"] / 1000, "macs_reduction_conv_fc": 1 - c["macs_conv_fc"] / 1010,
            "params_reduction": 1 - c["params"] / 100, "wall_time_s": 120}))
        (d / "metrics.jsonl").write_text('{"test_accuracy": 0.4}\n{"test_accuracy": %s}\n' % acc)
    rows = mod.table(mod.load_runs(tmp_path)).splitlines()[2:]
    assert rows[0].startswith("| `a_dense` | dense | 2 | 60.00 | 60.00 | 40.0, 60.0 |")
    assert "| `b_sfp` | sfp 30% |" in rows[1]
    assert "1,000 -> 600 (-40.0%)" in rows[1] and "1,010 -> 605 (-40.1%)" in rows[1]
    assert "100 -> 55 (-45.0%)" in rows[1] and rows[1].endswith("| 2 min |")
    assert mod.main([str(tmp_path / "missing")]) == 1


def test_pretrained_table_labels_epochs_against_the_papers_schedule(tmp_path):
    """A PFEC run counts its epochs against PFEC's 40; an SFP run planned shorter than SFP's 200
    says it is a shortened recipe, so a short row never reads as the paper's; each row says
    whether it retrained the compact or the masked model, and in which compute dtype; a run that
    is not on a paper row's recipe (another peak LR, a model the papers do not start from a
    trained one) says so."""
    spec = importlib.util.spec_from_file_location("jaxprune_pretrained_table",
                                                  REPO / "experiments" / "pretrained_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cost = {"macs_conv": 1000, "macs_conv_fc": 1010, "params": 100}
    small = {"macs_conv": 600, "macs_conv_fc": 610, "params": 70}
    extra = {"pfec_run": {"compact_before_retraining": True, "dtype": "bfloat16", "model": "resnet56",
                          "optimizer": {"base_lr": 0.001}},
             "sfp_run": {"model": "resnet56", "optimizer": {"base_lr": 0.1}}}
    for name, method, epochs, done in (("pfec_run", "pfec", 40, 1), ("sfp_run", "sfp", 6, 2)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"epochs": epochs, "method": {"name": method},
                                                   **extra[name]}))
        (d / "start.json").write_text(json.dumps({"pretrained_accuracy": 0.9, "after_init_accuracy": 0.5,
                                                  "dense_costs": cost, "after_init_costs": small}))
        (d / "metrics.jsonl").write_text('{"test_accuracy": 0.8}\n' * done)
    (tmp_path / "sfp_run" / "result.json").write_text(json.dumps(
        {"masked_accuracy": 0.4301, "compact_accuracy": 0.43,
         "compaction_check": {"dtype": "float32", "masked_accuracy": 0.4266, "compact_accuracy": 0.4266}}))
    extra["sfp_run"]["dtype"] = "bfloat16"
    (tmp_path / "sfp_run" / "config.json").write_text(json.dumps({"epochs": 6, "method": {"name": "sfp"},
                                                                  **extra["sfp_run"]}))
    rows = mod.runs_table(tmp_path).splitlines()[2:]
    assert rows[0].startswith("| `pfec_run` | pfec | compact, bfloat16 | 1 / 40 | 90.00 | 50.00 | 80.00 "
                              "| not finished |")
    assert rows[1].startswith("| `sfp_run` | sfp (peak LR 0.1, not the paper's 0.01) | masked, bfloat16 "
                              "| 2 / 6 (the paper's 200 shortened to 6) | 90.00 |")
    assert mod.recipe_note({"method": {"name": "sfp"}, "model": "resnet56", "optimizer": {"base_lr": 0.01}}) == ""
    assert (mod.recipe_note({"method": {"name": "sfp"}, "model": "resnet20", "optimizer": {"base_lr": 0.01}})
            == "not a paper row: sfp from a trained resnet20")
    # a bfloat16 run's final accuracies may differ by an image; the float32 check must be equal
    assert "| 43.01, 43.00 (bfloat16); float32: 42.66 = 42.66 |" in rows[1]
    assert "1,000 -> 600 (-40.0%)" in rows[1] and "100 -> 70 (-30.0%)" in rows[1]
