"""The GPU kit's pieces that run without a GPU (experiments/gpu/): the lossless CIFAR encoding,
the staging plan, the job plan, the resume pack and the limits on what a device call returns."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

GPU = Path(__file__).resolve().parent.parent / "experiments" / "gpu"
sys.path.insert(0, str(GPU))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpukit_{name}", GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


cw, kit, stage, unpack = (_load(n) for n in ("cifar_webp", "kit", "stage", "unpack"))
MIB = 1 << 20


# ----------------------------------------------------------------------------- CIFAR as WebP


def test_mosaic_places_tiles_row_major_and_inverts():
    x = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    pic = cw.mosaic(x)
    assert pic.shape == (2 * 32, 3 * 32, 3)  # ceil(sqrt(5)) = 3 columns, 2 rows
    np.testing.assert_array_equal(pic[32:64, 0:32], x[3])  # tile 3: second row, first column
    np.testing.assert_array_equal(pic[32:64, 64:96], 0)  # the unused sixth tile is black
    np.testing.assert_array_equal(cw.unmosaic(pic, 5), x)


def test_webp_round_trip_is_exact_and_digest_sees_one_value(tmp_path):
    rs = np.random.RandomState(1)
    x = rs.randint(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    y = rs.randint(0, 10, 7).astype(np.uint8)
    np.testing.assert_array_equal(cw.decode(cw.encode(x), 7), x)
    flipped = x.copy()
    flipped[6, 31, 31, 2] ^= 1
    assert cw.digest(flipped) != cw.digest(x)
    np.savez(tmp_path / "train_0.npz", x=x, y=y)
    shards = cw.encode_folder(tmp_path, tmp_path / "enc")
    assert shards == {"train_0": {"n": 7, "x": cw.digest(x), "y": cw.digest(y)}}
    out = cw.decode_shard(tmp_path / "enc" / "train_0.webp", shards, tmp_path / "dec")
    with np.load(out) as z:
        np.testing.assert_array_equal(z["x"], x)
        np.testing.assert_array_equal(z["y"], y)
    bad = {"train_0": dict(shards["train_0"], y=cw.digest(y + 1))}
    with pytest.raises(ValueError, match="decoded y"):
        cw.decode_shard(tmp_path / "enc" / "train_0.webp", bad, tmp_path / "dec")


# ----------------------------------------------------------------------------- staging


def test_pack_calls_first_fit_decreasing():
    items = [("e", 2), ("a", 6), ("d", 3), ("b", 5), ("c", 4)]
    # a(6) -> call 1 (4 left); b(5) -> call 2 (5 left); c(4) -> call 1; d(3), e(2) -> call 2
    assert stage.pack_calls(items, 10) == [["a", "c"], ["b", "d", "e"]]
    with pytest.raises(ValueError, match="more than"):
        stage.pack_calls([("big", 11)], 10)


def test_split_files_reassemble(tmp_path):
    data = bytes(range(256)) * 41  # 10,496 bytes
    (tmp_path / "resume.tgz").write_bytes(data)
    parts = stage.split_file(tmp_path / "resume.tgz", 4096, tmp_path / "chunks")
    assert [p.name for p in parts] == ["resume.tgz.000", "resume.tgz.001", "resume.tgz.002"]
    assert [p.stat().st_size for p in parts] == [4096, 4096, 2304]
    assert b"".join(p.read_bytes() for p in parts) == data
    out = tmp_path / "out"
    out.mkdir()
    (out / "resume.tgz").write_bytes(data)
    assert [p.name for p in kit.split_file(out / "resume.tgz", 6000)] == ["resume.tgz.000", "resume.tgz.001"]
    assert unpack.resume_bytes(out) == data


# ----------------------------------------------------------------------------- jobs


def test_job_plan_order_and_filter(tmp_path):
    st = kit.settings(False, tmp_path)
    jobs = kit.plan_jobs(st)
    names = [j.name for j in jobs]
    assert names[:3] == ["pfec_resnet56_A_gpu", "pfec_resnet56_B_gpu", "sfp_resnet56_from_trained_gpu"]
    assert names[3:7] == [f"sfp_resnet{d}_cifar10/seed0" for d in (20, 32, 56, 110)]
    assert len(jobs) == 3 + 4 * 3 and names[-1] == "sfp_resnet110_cifar10/seed2"
    assert not any("resnet20" in j.config and j.kind == "prune" for j in jobs)  # not a paper row
    assert [j.name for j in kit.plan_jobs(st, ["pfec_*", "*/seed1"])] == [
        "pfec_resnet56_A_gpu", "pfec_resnet56_B_gpu"] + [f"sfp_resnet{d}_cifar10/seed1" for d in (20, 32, 56, 110)]
    # the patterns' order is the run order; a job matched twice runs once, at its first pattern
    assert [j.name for j in kit.plan_jobs(st, ["pfec_resnet56_A*", "sfp_resnet20_cifar10/seed0", "pfec_*"])] == [
        "pfec_resnet56_A_gpu", "sfp_resnet20_cifar10/seed0", "pfec_resnet56_B_gpu"]
    for j in jobs:  # every config named exists
        assert (GPU.parent.parent / "jaxprune" / "configs" / f"{j.config}.py").is_file()
    cmd = kit.job_command(jobs[0], tmp_path, st, "python3")
    assert cmd[:5] == ["python3", "-m", "jaxprune.cli", "prune", str(tmp_path / "runs" / "pretrained" / "import_resnet56")]
    assert "--config.dtype=bfloat16" in cmd and "--config.steps_per_call=0" in cmd


def test_recorded_in_repo_needs_a_paper_record_of_that_seed(tmp_path):
    st = kit.settings(False, tmp_path)
    job = kit.Job("sfp_resnet20_cifar10/seed1", "row", "sfp_resnet20_cifar10", 1)
    row = tmp_path / "experiments" / "results" / "sfp_resnet20_cifar10"
    row.mkdir(parents=True)
    (row / "seed1.json").write_text(json.dumps({"seed": 1, "schedule": "short (3 epochs)", "device": "cpu:cpu x1"}))
    (row / "seed0.gpu.json").write_text(json.dumps({"seed": 0, "schedule": "paper", "device": "gpu:NVIDIA H200 x1"}))
    assert not kit.recorded_in_repo(job, tmp_path, st)  # a short schedule, another seed
    # a paper-schedule record counts from any device (a GPU-trained row finished on the CPU)
    (row / "seed1.gpu.json").write_text(json.dumps({"seed": 1, "schedule": "paper", "device": "cpu:cpu x1"}))
    assert kit.recorded_in_repo(job, tmp_path, st)
    assert not kit.recorded_in_repo(job, tmp_path, kit.settings(True, tmp_path))  # smoke never
    pre = kit.Job("pfec_resnet56_A_gpu", "prune", "pfec_resnet56_cifar10_A", 0, "resnet56")
    assert not kit.recorded_in_repo(pre, tmp_path, st)
    d = tmp_path / "experiments" / "pretrained_records" / "pfec_resnet56_A_gpu"
    d.mkdir(parents=True)
    (d / "result.json").write_text("{}")
    assert kit.recorded_in_repo(pre, tmp_path, st)


# ----------------------------------------------------------------------------- resume and $OUT


def _run(home: Path, rel: str, finished: bool, ckpt_bytes: int = 10) -> Path:
    run = home / "runs" / rel
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "checkpoints" / "12" / "state").mkdir(parents=True)
    (run / "checkpoints" / "12" / "state" / "data").write_bytes(b"x" * ckpt_bytes)
    (run / "checkpoints" / "top.json").write_text("{}")
    (run / "retrain_model").mkdir()
    (run / "tb").mkdir()
    for f in ("config.json", "metrics.jsonl") + (("result.json",) if finished else ()):
        (run / f).write_text("{}")
    return run


def test_epochs_done_counts_epochs_and_takes_medians_of_both_timings(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert kit.epochs_done(run) == (0, 0, None, None)
    (run / "config.json").write_text(json.dumps({"epochs": 200}))
    recs = [{"epoch": 0, "epoch_time_s": 28.6}, {"epoch": 1, "epoch_time_s": 2.0, "between_epochs_s": 1.1},
            {"epoch": 2, "epoch_time_s": 2.1, "between_epochs_s": 0.9}, {"epoch": 3, "epoch_time_s": 1.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"epoch": 4, "epo')
    # 4 whole lines (a torn last line is not an epoch); medians: upper middle of the sorted values
    assert kit.epochs_done(run) == (4, 200, 2.1, 1.1)


def test_resume_paths_keep_the_latest_checkpoint_of_unfinished_runs(tmp_path):
    run = _run(tmp_path, "pretrained/a", finished=False)
    (run / "checkpoints" / "preempt").mkdir()
    for step in ("2", "10"):
        (run / "checkpoints_finetune" / step).mkdir(parents=True)
    got = {str(p.relative_to(run)) for p in kit.resume_paths(run)}
    assert got == {"config.json", "metrics.jsonl", "retrain_model", "checkpoints/12", "checkpoints/preempt",
                   "checkpoints/top.json", "checkpoints_finetune/10"}
    done = _run(tmp_path, "pretrained/b", finished=True)
    assert {p.name for p in kit.resume_paths(done)} == {"config.json", "metrics.jsonl", "result.json"}


def test_pack_resume_leaves_out_checkpoints_past_the_limit(tmp_path):
    home = tmp_path / "home"
    a = _run(home, "pretrained/a", finished=False, ckpt_bytes=100)
    b = _run(home, "rows/r/seed0", finished=False, ckpt_bytes=100)
    (home / "runs" / "pretrained" / "import_resnet56").mkdir()
    (home / "runs" / "pretrained" / "import_resnet56" / "import.json").write_text("{}")
    (home / "results" / "r").mkdir(parents=True)
    (home / "results" / "r" / "seed0.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    files, dropped = kit.pack_resume(home, out, [b, a], limit=150)
    assert [f.name for f in files] == ["resume.tgz"] and dropped == ["runs/pretrained/a"]
    with tarfile.open(files[0]) as tar:
        names = set(tar.getnames())
    assert "runs/rows/r/seed0/checkpoints/12/state/data" in names  # b came first
    assert "runs/pretrained/a/config.json" in names and not any(n.startswith("runs/pretrained/a/checkpoints") for n in names)
    assert "results/r/seed0.json" in names and not any("import_resnet56" in n or "/tb" in n for n in names)


def test_check_out_limits(tmp_path):
    assert kit.check_out(tmp_path) == []
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert kit.check_out(tmp_path) == []
    (tmp_path / "f8.txt").write_text("x")
    assert kit.check_out(tmp_path) == ["9 files, over 8"]
    for i in range(9):
        (tmp_path / f"f{i}.txt").unlink()
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "ok.txt").write_text("x")  # two folders down comes back
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(17 * MIB)
    got = kit.check_out(tmp_path)
    assert got == ["a/b/c/deep.txt: more than 2 folders down", "bad name.txt: name outside [A-Za-z0-9._-]",
                   "big.bin: 17.0 MiB, over 16 MiB"]
    for i in range(4):
        with open(tmp_path / f"big{i}.bin", "wb") as f:
            f.truncate(15 * MIB)
    assert "77.0 MiB in all, over 64 MiB" in kit.check_out(tmp_path)


def test_record_destination_keeps_another_devices_record(tmp_path):
    gpu = {"device": "gpu:NVIDIA H200 x1", "seed": 0}
    assert unpack.record_destination(tmp_path, "seed0.json", gpu) == tmp_path / "seed0.json"
    (tmp_path / "seed0.json").write_text(json.dumps({"device": "cpu:cpu x1"}))
    assert unpack.record_destination(tmp_path, "seed0.json", gpu) == tmp_path / "seed0.gpu.json"
    (tmp_path / "seed0.json").write_text(json.dumps(gpu))
    assert unpack.record_destination(tmp_path, "seed0.json", gpu) == tmp_path / "seed0.json"
    (tmp_path / "seed0.json").write_text(json.dumps(dict(gpu, schedule="short (3 epochs)")))
    assert unpack.record_destination(tmp_path, "seed0.json", dict(gpu, schedule="paper")) == tmp_path / "seed0.gpu.json"


def test_wheels_are_unzipped_when_pip_fails(tmp_path):
    import zipfile

    recv, home = tmp_path / "recv", tmp_path / "home"
    (recv / "whl").mkdir(parents=True)
    with zipfile.ZipFile(recv / "whl" / "tiny-1.0-py3-none-any.whl", "w") as z:
        z.writestr("tiny/__init__.py", "VALUE = 7\n")
    lines = []
    kit.process_part({"whl/tiny-1.0-py3-none-any.whl": {}}, recv, home, {"cifar10": {"shards": {}}},
                     "/bin/false", lines.append)  # an interpreter without pip
    assert (home / "site" / "tiny" / "__init__.py").read_text() == "VALUE = 7\n"
    assert lines[0].startswith("pip install failed") and lines[-1].startswith("installed 1 wheel")
