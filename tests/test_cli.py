"""Every CLI command on a tiny config; bad configs are rejected with the value named."""

import json

import pytest

from conftest import tiny_config_source
from jaxprune import cli
from jaxprune import config as config_lib

TINY = tiny_config_source()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.py"
    p.write_text(TINY)
    return p


def test_info_model_prints_exact_totals(capsys):
    assert cli.main(["info", "resnet56"]) == 0
    out = capsys.readouterr().out
    assert "125485056" in out and "853018" in out
    assert "layer1_0/conv1" in out


@pytest.mark.parametrize("override, named", [
    ("--config.method.rate=1.5", "method.rate=1.5"),
    ("--config.method.name=magic", "method.name='magic'"),
    ("--config.model=resnet7", "model='resnet7'"),
    ("--config.nonsense=3", "nonsense"),
    ("--config.epochs=0", "epochs=0"),
])
def test_bad_configs_are_rejected_naming_the_value(tiny_config, tmp_path, capsys, override, named):
    rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(tmp_path / "w"), override])
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "w").exists(), "nothing may be written for a rejected config"


def test_missing_checkpoint_and_config_file(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path)]) == 2
    assert "none.py" in capsys.readouterr().err


def test_override_parses_literals_and_keeps_types():
    c = config_lib.base_config()
    c2 = config_lib.override(c, ["epochs=3", "optimizer.base_lr=1", "optimizer.boundaries=(1, 2)",
                                 "method.name=sfp", "method.kwargs.alpha=0.5"])
    assert c2.epochs == 3 and isinstance(c2.optimizer.base_lr, float) and c2.optimizer.base_lr == 1.0
    assert tuple(c2.optimizer.boundaries) == (1, 2) and c2.method.name == "sfp"
    assert c2.method.kwargs.alpha == 0.5
    assert c.epochs == 200, "override must not modify its input"


def test_train_compact_eval_info_on_tiny_config(tiny_config, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress"]) == 0
    rec = json.loads((work / "result.json").read_text())
    assert rec["masked_accuracy"] == rec["compact_accuracy"]
    assert rec["compact"]["macs_conv"] < rec["dense"]["macs_conv"]
    assert (work / "metrics.jsonl").read_text().count("\n") == 2
    from jaxprune.parallel import device_label

    epochs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [e["device"] for e in epochs] == [device_label()] * 2  # each epoch names its device
    assert rec["trained_on"] == {device_label(): 2} and rec["device"] == device_label()
    assert any((work / "tb").iterdir())

    assert cli.main(["compact", str(work)]) == 0
    rec2 = json.loads((work / "result.json").read_text())
    assert rec2["compact"] == rec["compact"]

    capsys.readouterr()
    assert cli.main(["eval", str(work / "compact"), "--test-subset", "128", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert abs(res["accuracy"] - rec["compact_accuracy"]) < 1e-9 and res["images"] == 128
    # by default the whole test set (360 digits images), the count printed
    assert cli.main(["eval", str(work)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(" on 360 digits test images") and out.count("\n") == 0, out

    # the report of this directory of runs: not a paper row, in a table of its own
    assert cli.main(["report", "--records", str(tmp_path), "--out", str(tmp_path / "R.md")]) == 0
    md = (tmp_path / "R.md").read_text()
    assert "## Other records (no config file)" in md and "| `run` |" in md
    assert "sfp_resnet56_cifar10" not in md, "paper rows without a record are listed only with --all-rows"
    assert f"wrote {tmp_path / 'R.md'}" in capsys.readouterr().out

    assert cli.main(["info", str(work / "compact")]) == 0
    out = capsys.readouterr().out
    assert str(rec["compact"]["macs_conv"]) in out and str(rec["compact"]["params"]) in out

    # prune: start from the trained run (one-shot / fine-tune), 1 epoch
    work2 = tmp_path / "pruned"
    assert cli.main(["prune", str(work), "--config", str(tiny_config), "--workdir", str(work2),
                     "--no-progress", "--config.epochs=1"]) == 0
    rec3 = json.loads((work2 / "result.json").read_text())
    assert rec3["masked_accuracy"] == rec3["compact_accuracy"]
    assert json.loads((work2 / "config.json").read_text())["pretrained"] == str(work)

    # sensitivity: every prunable numbered conv at 9 rates, CSV + plot
    sens = tmp_path / "sens"
    assert cli.main(["sensitivity", str(work), "--config", str(tiny_config), "--out", str(sens)]) == 0
    rows = (sens / "sensitivity.csv").read_text().strip().splitlines()
    assert rows[0] == "layer,group,rate,accuracy"
    assert len(rows) - 1 == 19 * 10  # 19 convs of ResNet-20 x (baseline + 9 rates)
    assert (sens / "sensitivity.png").stat().st_size > 0
    assert not (sens / "sensitivity.partial.csv").exists() and not (sens / "sensitivity.partial.json").exists()
    # a resumed analysis refuses rows measured another way (here: another evaluation batch)
    half = tmp_path / "half"
    half.mkdir()
    settings = json.loads((sens / "sensitivity.json").read_text())
    newest = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    from jaxprune.pretrained import load_trained, weights_digest

    digest = weights_digest(load_trained(work)[1])
    assert settings["weights_from"] == {"checkpoint_step": newest, "newest_step": newest, "sha256": digest}
    keys = ("checkpoint", "model", "convs", "test_images", "rates", "batch_size", "normalization")
    before = dict({k: settings[k] for k in keys}, checkpoint=str(work.resolve()))
    (half / "sensitivity.partial.json").write_text(json.dumps(before))
    (half / "sensitivity.partial.csv").write_text("layer 1 (x),stem,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5\n")
    args = ["sensitivity", str(work), "--config", str(tiny_config), "--out", str(half)]
    assert cli.main(args + ["--batch-size", "7"]) == 2
    assert "other settings (batch_size)" in capsys.readouterr().err
    assert (half / "sensitivity.partial.csv").read_text().count("\n") == 1  # untouched


def test_hfp_finetune_phase_keeps_masks_and_resumes(tiny_config, tmp_path, capsys):
    work = tmp_path / "hfp"
    args = ["train", "--config", str(tiny_config), "--workdir", str(work), "--no-progress",
            "--config.method.name=hfp", "--config.method.rate=0.0",
            "--config.method.kwargs.macs_reduction=0.3", "--config.method.kwargs.params_reduction=0.3",
            "--config.finetune_epochs=1", "--config.finetune_lr=0.01"]
    assert cli.main(args) == 0
    rec = json.loads((work / "result.json").read_text())
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert [r.get("phase") for r in lines] == [None, None, "finetune"]
    assert "train_hfp_penalty" not in lines[2]  # the fine-tuning has no HFP penalty
    # both targets met after fine-tuning: the masks HFP chose are kept (hard) through it (one
    # stage-1 channel of this 8x8-input model is ~0.7% of its MACs, hence the 1% window)
    assert 0.3 <= rec["macs_reduction_conv_fc"] <= 0.31
    assert 0.3 <= rec["params_reduction"] <= 0.31
    assert rec["masked_accuracy"] == rec["compact_accuracy"]
    assert (work / "checkpoints_finetune").is_dir()
    # a restart finds both phases finished in their checkpoints and reproduces the result
    assert cli.main(args) == 0
    again = json.loads((work / "result.json").read_text())
    assert again["masked_accuracy"] == rec["masked_accuracy"] and again["compact"] == rec["compact"]
    # `jaxprune compact` compacts the fine-tuned weights, not the pre-fine-tuning checkpoint
    assert cli.main(["compact", str(work)]) == 0
    compacted = json.loads((work / "result.json").read_text())
    assert compacted["masked_accuracy"] == rec["masked_accuracy"] and compacted["compact"] == rec["compact"]
    assert compacted["best_accuracy"] == rec["best_accuracy"]


def test_finetune_config_values_are_checked(tiny_config, tmp_path, capsys):
    for override, named in (("--config.finetune_epochs=-1", "finetune_epochs"),
                            ("--config.finetune_lr=0.0", "finetune_lr")):
        rc = cli.main(["train", "--config", str(tiny_config), "--workdir", str(tmp_path / "w"), override])
        assert rc == 2
        assert named in capsys.readouterr().err
        assert not (tmp_path / "w").exists()


def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"jaxprune {command}: error: "), err
    return err


@pytest.mark.parametrize("source, named", [
    ("def get_config(:\n    pass\n", "line 1: "),
    ("import math\n\ndef get_config():\n    return 1 / 0\n", "line 4: ZeroDivisionError"),
    ("x = 1\n", "defines no get_config()"),
])
def test_a_config_file_that_fails_to_load_is_one_line_and_exit_2(tmp_path, capsys, source, named):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    assert cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path / "w")]) == 2
    err = _one_line_error(capsys, "train")
    assert str(bad) in err and named in err, err
    assert not (tmp_path / "w").exists()


def test_unknown_keys_and_config_names_get_a_suggestion(tiny_config, tmp_path, capsys):
    args = ["train", "--config", str(tiny_config), "--workdir", str(tmp_path / "w")]
    assert cli.main(args + ["--config.train_subest=10"]) == 2
    assert "(did you mean 'train_subset'?)" in _one_line_error(capsys, "train")
    assert cli.main(args + ["--config.method.rat=0.3"]) == 2
    assert "(did you mean 'rate'?)" in _one_line_error(capsys, "train")
    assert cli.main(["train", "--config", "sfp_resnet56_cifar1", "--workdir", str(tmp_path / "w")]) == 2
    assert "did you mean 'sfp_resnet56_cifar10'?" in _one_line_error(capsys, "train")


def test_packaged_configs_load_by_name():
    names = config_lib.packaged_configs()
    assert "sfp_resnet56_cifar10" in names and "common" not in names
    c = config_lib.load_config("sfp_resnet56_cifar10")
    assert c.model == "resnet56" and c.method.name == "sfp" and c.name == "sfp_resnet56_cifar10"
    assert config_lib.load_config("sfp_resnet56_cifar10.py").to_dict() == c.to_dict()


def test_help_names_the_override_syntax_and_where_keys_are_documented(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--config.KEY=VALUE" in out and "jaxprune/config.py" in out and "train_subset" in out
    assert "--data-dir" in out


def test_epoch_line_is_one_human_line():
    from jaxprune.training import epoch_line, kept_channels

    rec = {"epoch": 4, "step": 50, "train_loss": 1.23456, "train_accuracy": 0.5, "train_penalty": 0.0,
           "test_accuracy": 0.61234, "test_top5": 0.9, "test_loss": 1.1, "epoch_time_s": 12.345}
    assert epoch_line(rec, 200, (412, 560)) == ("epoch 5/200  loss 1.2346  train acc 0.5000  "
                                                "test acc 0.6123  kept 412/560 channels  12.3 s")
    assert epoch_line({"epoch": 0, "epoch_time_s": 1.0}, 3) == "epoch 1/3  1.0 s"
    import numpy as np

    assert kept_channels({"a": np.array([1.0, 0.0, 1.0]), "b": np.array([0.0, 0.5])}) == (3, 5)


def test_absl_warnings_stay_off_the_console(capfd):
    import logging

    from absl import logging as absl_logging

    cli._quiet_absl()
    absl_logging.warning("a stray absl warning")
    logging.getLogger("absl").warning("another one")
    assert "stray" not in capfd.readouterr().err
    assert logging.getLogger("absl").getEffectiveLevel() == logging.ERROR
