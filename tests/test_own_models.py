"""A model of the user's own (tests/own_models: Linen and NNX) through the whole pipeline:
`config.model` as an import path on the command line (train with SFP, compact, eval, info,
report), `jaxprune.load` of the compact model in a process without the model's code, and
`jaxprune.experiment.run(config, workdir, model=..., data=...)` from Python."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import config as config_lib
from jaxprune import data as data_lib
from jaxprune.user_models import NNXModel, build_model, import_path_of, is_import_path
from own_models.nets import LinenNet, NNXNet

REPO = Path(__file__).resolve().parent.parent
OWN = Path(__file__).resolve().parent / "own_models"


def test_build_model_resolves_classes_factories_and_instances():
    m = build_model("own_models.nets:make_linen_net", {"width": 4}, num_classes=7)
    assert isinstance(m, LinenNet) and m.width == 4 and m.num_classes == 7  # num_classes filled in
    n = build_model("own_models.nets:NNXNet", {"width": 4}, num_classes=3, seed=1)
    assert isinstance(n, NNXModel) and n.module.head.out_features == 3  # rngs filled in
    assert build_model(LinenNet(width=2), num_classes=10).width == 2
    assert import_path_of(n) == "own_models.nets:NNXNet"
    assert is_import_path("a.b:c") and not is_import_path("resnet20")
    for spec, named in (("own_models.nope:f", "cannot import 'own_models.nope'"),
                        ("own_models.nets:missing", "has no 'missing'"),
                        ("own_models.nets:jnp", "is a module")):
        with pytest.raises(ValueError, match=named) as e:
            build_model(spec, num_classes=10)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model_kwargs"):
        build_model("own_models.nets:make_linen_net", {"depth": 3}, num_classes=10)


def test_nnx_model_applies_like_the_module_and_updates_batch_stats():
    net = NNXNet(width=4, rngs=nnx.Rngs(0))
    m = NNXModel(net)
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 3))
    v = m.init(None, x)
    net.eval()
    np.testing.assert_allclose(m.apply(v, x), net(x), rtol=1e-6, atol=1e-6)
    doubled = jax.tree.map(lambda a: 2 * a, v)
    assert not np.allclose(m.apply(doubled, x), net(x), atol=1e-3)  # the given variables are used
    out, upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    mean = np.asarray(upd["batch_stats"]["bn1"]["mean"])
    h = net.conv1(x)  # BN's running mean moves 1% towards the batch mean (NNX momentum 0.99)
    np.testing.assert_allclose(mean, 0.01 * np.asarray(jnp.mean(h, axis=(0, 1, 2))), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(nnx.state(net, nnx.BatchStat).to_pure_dict()["bn1"]["mean"]) == 0)


def _config_file(path: Path, model: str, residual: str, **extra) -> Path:
    lines = ["from jaxprune.config import base_config", "", "def get_config():",
             "    c = base_config()", f"    c.model = {model!r}", "    c.model_kwargs.width = 8",
             "    c.dataset = 'digits'", "    c.image_size = 8", "    c.epochs = 2",
             "    c.batch_size = 64", "    c.train_subset = 256", "    c.test_subset = 128",
             "    c.optimizer.schedule = 'constant'", "    c.optimizer.base_lr = 0.05",
             "    c.method.name = 'sfp'", "    c.method.rate = 0.5",
             f"    c.method.residual = {residual!r}", "    c.keep_checkpoints = 1"]
    lines += [f"    c.{k} = {v!r}" for k, v in extra.items()]
    path.write_text("\n".join(lines + ["    return c", ""]))
    return path


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "jaxprune.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("model, residual", [
    ("own_models.nets:make_linen_net", "coupled"),
    pytest.param("own_models.nets:NNXNet", "scatter", marks=pytest.mark.slow)])  # NNX: also below
def test_own_model_end_to_end_on_the_command_line(tmp_path, capsys, model, residual):
    pkg = tmp_path / "pkg"
    shutil.copytree(OWN, pkg / "own_models", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(pkg)]))
    cfg = _config_file(tmp_path / "own.py", model, residual)
    work = tmp_path / "run"
    r = _cli(["train", "--config", str(cfg), "--workdir", str(work)], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    epoch_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "kept " in epoch_lines[-1] and "\r" not in r.stdout + r.stderr
    rec = json.loads((work / "result.json").read_text())
    assert rec["model"] == model and rec["residual"] == residual
    assert rec["masked_accuracy"] == rec["compact_accuracy"]
    assert rec["compact"]["params"] < rec["dense"]["params"]
    assert all(w <= 8 for w in rec["widths"].values()) and min(rec["widths"].values()) < 8

    # `prune`: a new run that starts from this run's weights (one epoch of SFP on top)
    pruned = tmp_path / "pruned"
    r = _cli(["prune", str(work), "--config", str(cfg), "--workdir", str(pruned), "--no-progress",
              "--config.epochs=1"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    prec = json.loads((pruned / "result.json").read_text())
    assert prec["model"] == model and prec["masked_accuracy"] == prec["compact_accuracy"]
    start = json.loads((pruned / "start.json").read_text())
    assert abs(start["pretrained_accuracy"] - rec["compact_accuracy"]) < 0.05

    # the other commands in this process (own_models is importable here too)
    from jaxprune import cli

    capsys.readouterr()
    assert cli.main(["compact", str(work)]) == 0
    assert f"compact model saved to {work / 'compact'}" in capsys.readouterr().out
    assert cli.main(["eval", str(work), "--test-subset", "128", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 128 and abs(res["accuracy"] - rec["compact_accuracy"]) < 1e-9
    assert cli.main(["info", str(work / "compact")]) == 0
    assert str(rec["compact"]["params"]) in capsys.readouterr().out
    assert cli.main(["info", model]) == 0
    assert "prunable groups" in capsys.readouterr().out
    assert cli.main(["report", "--records", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `run` |" in out and "| `pruned` |" in out

    # the compact model loads and runs without the model's code (no own_models on the path)
    ds = data_lib.load_digits_dataset(image_size=8)
    x = np.asarray(ds.x_test[:10], np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, jaxprune\n"
            "assert 'own_models' not in sys.modules\n"
            f"m, v, meta = jaxprune.load({str(work / 'compact')!r})\n"
            "x = np.load(sys.argv[1])\n"
            "mean, std = np.array(meta['mean']), np.array(meta['std'])\n"
            "np.save(sys.argv[2], np.asarray(m.apply(v, (x / 255 - mean) / std)))\n")
    bare = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       env=bare, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    compact_out = np.load(tmp_path / "y.npy")

    # ... and computes what the masked model computes
    from jaxprune.commands.compact import restore_run
    from jaxprune.masks import apply_masks, binarize
    from jaxprune.methods.base import final_roles
    from jaxprune.train_step import prune_finalize

    s, state, _, _, _ = restore_run(work)
    state = prune_finalize(s.pruner, state)
    masked = apply_masks(state.variables, binarize(state.masks), s.graph, roles=final_roles(s.method))
    mean, std = np.array(s.dataset.mean), np.array(s.dataset.std)
    ref = s.model.apply(masked, jnp.asarray((x / 255 - mean) / std, jnp.float32), train=False)
    np.testing.assert_allclose(compact_out, np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_run_takes_a_model_object_and_a_dataset(tmp_path):
    from jaxprune.experiment import run

    ds = data_lib.load_digits_dataset(image_size=8)
    ds = dataclasses.replace(ds, x_train=ds.x_train[:128], y_train=ds.y_train[:128],
                             x_test=ds.x_test[:64], y_test=ds.y_test[:64])
    c = config_lib.base_config()
    c.epochs, c.batch_size, c.keep_checkpoints = 1, 64, 1
    c.optimizer.schedule, c.method.name, c.method.rate = "constant", "sfp", 0.5
    rec = run(c, tmp_path / "run", progress=False, model=NNXNet(width=8, rngs=nnx.Rngs(0)), data=ds)
    assert rec["model"] == "own_models.nets:NNXNet"
    assert rec["masked_accuracy"] == rec["compact_accuracy"]
    assert rec["widths"] == {"conv1": 4, "conv2": 8}  # SFP 50% of 8 and 16 filters
