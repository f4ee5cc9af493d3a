"""PyTorch weight import (`jaxprune.models.torch_import`), ``jaxprune import`` and runs that start
from imported weights; the shipped pretrained CIFAR ResNets evaluate to their published accuracy."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config_source
from jaxprune import augment, cli, evaluation
from jaxprune import data as data_lib
from jaxprune.graph import leaf_paths
from jaxprune.models.torch_import import from_torch

PRETRAINED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained"
CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
IMAGENET_STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def torch_state_dict(depth: int, seed: int = 0, num_classes: int = 10) -> dict[str, np.ndarray]:
    """A random state dict in PyTorch layout with the keys of the akamaster CIFAR ResNet,
    written from the architecture (not from the importer's mapping)."""
    rng = np.random.default_rng(seed)
    n = (depth - 2) // 6
    sd: dict[str, np.ndarray] = {}

    def bn(prefix, c):
        sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{prefix}.bias"] = rng.normal(0, 0.2, c).astype(np.float32)
        sd[f"{prefix}.running_mean"] = rng.normal(0, 0.5, c).astype(np.float32)
        sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{prefix}.num_batches_tracked"] = np.asarray(7)

    def conv(key, o, i):
        sd[key] = (rng.normal(size=(o, i, 3, 3)) * np.sqrt(2 / (9 * i))).astype(np.float32)

    conv("conv1.weight", 16, 3)
    bn("bn1", 16)
    cin = 16
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            conv(f"layer{s}.{b}.conv1.weight", planes, cin)
            bn(f"layer{s}.{b}.bn1", planes)
            conv(f"layer{s}.{b}.conv2.weight", planes, planes)
            bn(f"layer{s}.{b}.bn2", planes)
            cin = planes
    sd["linear.weight"] = rng.normal(size=(num_classes, 64)).astype(np.float32)
    sd["linear.bias"] = rng.normal(size=(num_classes,)).astype(np.float32)
    return sd


def test_layout_transposes_by_hand():
    sd = torch_state_dict(20)
    sd["conv1.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    sd["conv1.weight"][5, 2, 0, 1] = 3.0  # out 5, in 2, row 0, column 1
    sd["linear.weight"] = np.zeros((10, 64), np.float32)
    sd["linear.weight"][7, 40] = 2.0  # out 7, in 40
    _, v = from_torch("resnet20", sd)
    k = np.asarray(v["params"]["stem"]["kernel"])
    assert k.shape == (3, 3, 3, 16) and k[0, 1, 2, 5] == 3.0 and k.sum() == 3.0
    fc = np.asarray(v["params"]["fc"]["kernel"])
    assert fc.shape == (64, 10) and fc[40, 7] == 2.0 and fc.sum() == 2.0
    bn = v["batch_stats"]["layer2_1"]["bn2"]
    np.testing.assert_array_equal(bn["var"], sd["layer2.1.bn2.running_var"])
    np.testing.assert_array_equal(v["params"]["layer3_2"]["bn1"]["scale"], sd["layer3.2.bn1.weight"])


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_every_depth_imports_into_the_models_exact_structure(depth):
    sd = torch_state_dict(depth, seed=depth)
    model, v = from_torch(f"resnet{depth}", sd)
    want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    assert leaf_paths(v) == leaf_paths(want)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(want)):
        assert a.shape == b.shape
    # every source tensor lands somewhere, once: the total number of values is the same
    n_src = sum(a.size for k, a in sd.items() if not k.endswith("num_batches_tracked"))
    assert sum(a.size for a in jax.tree.leaves(v)) == n_src


def test_module_prefix_of_dataparallel_is_stripped():
    sd = {f"module.{k}": a for k, a in torch_state_dict(20).items()}
    _, v = from_torch("resnet20", sd)
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], sd["module.linear.bias"])


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("layer2.1.bn1.running_var"), "layer2.1.bn1.running_var"),
    (lambda sd: sd.__setitem__("layer4.0.conv1.weight", np.zeros((1, 1, 3, 3), np.float32)),
     "layer4.0.conv1.weight"),
    (lambda sd: sd.__setitem__("layer1.0.conv2.weight", np.zeros((16, 8, 3, 3), np.float32)),
     "(16, 8, 3, 3)"),
    (lambda sd: sd.__setitem__("linear.bias", np.full((10,), np.nan, np.float32)), "non-finite"),
])
def test_bad_state_dicts_are_rejected_naming_the_key(edit, named):
    sd = torch_state_dict(20)
    edit(sd)
    with pytest.raises(ValueError, match="linear.bias|layer") as e:
        from_torch("resnet20", sd)
    assert named in str(e.value)


def test_misshaped_tensor_names_both_shapes():
    sd = torch_state_dict(20)
    sd["layer1.0.conv2.weight"] = np.zeros((16, 8, 3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        from_torch("resnet20", sd)
    assert "(16, 8, 3, 3)" in str(e.value) and "(3, 3, 16, 16)" in str(e.value)


def test_unsupported_model_and_epsilon_are_refused():
    with pytest.raises(ValueError, match="vgg16"):
        from_torch("vgg16", torch_state_dict(20))
    with pytest.raises(ValueError, match="bn_epsilon"):
        from_torch("resnet20", torch_state_dict(20), bn_epsilon=1e-3)


def test_cli_import_writes_a_trained_model_dir_and_refuses_a_used_one(tmp_path, capsys):
    src = tmp_path / "r20.npz"
    np.savez(src, **torch_state_dict(20))
    out = tmp_path / "imp"
    assert cli.main(["import", "resnet20", str(src), "--workdir", str(out), "--mean", "0.485", "0.456",
                     "0.406", "--std", "0.229", "0.224", "0.225"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "resnet20" and cfg["mean"] == [0.485, 0.456, 0.406]
    prov = json.loads((out / "import.json").read_text())
    assert len(prov["sha256"]) == 64 and prov["source"].endswith("r20.npz")
    from jaxprune.artifact import load

    model, v, meta = load(out / "compact")
    assert meta["mean"] == [0.485, 0.456, 0.406] and not model.keep_out
    before = sorted(p.name for p in out.rglob("*"))
    assert cli.main(["import", "resnet20", str(src), "--workdir", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    bad = tmp_path / "bad.npz"
    sd = torch_state_dict(20)
    sd.pop("bn1.bias")
    np.savez(bad, **sd)
    assert cli.main(["import", "resnet20", str(bad), "--workdir", str(tmp_path / "b")]) == 2
    assert "bn1.bias" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


TINY_FROM_PRETRAINED = tiny_config_source(name="from_import", epochs=1, train_subset=128,
                                          optimizer__base_lr=0.001, method__name="dense",
                                          method__rate=0.0)


def test_a_run_from_imported_weights_inherits_their_normalisation_and_records_provenance(
        tmp_path, monkeypatch):
    src = tmp_path / "r20.npz"
    np.savez(src, **torch_state_dict(20))
    imp = tmp_path / "imp"
    assert cli.main(["import", "resnet20", str(src), "--workdir", str(imp), "--mean", "0.5", "0.5",
                     "0.5", "--std", "0.25", "0.25", "0.25"]) == 0
    cfg_file = tmp_path / "tiny.py"
    cfg_file.write_text(TINY_FROM_PRETRAINED)
    from jaxprune import config as config_lib
    from jaxprune.experiment import run

    from jaxprune import train_step

    cfg = config_lib.load_config(cfg_file)
    cfg.pretrained = str(imp)
    work = tmp_path / "run"
    inits, real_init = [], train_step.prune_init
    monkeypatch.setattr(train_step, "prune_init", lambda p, st: inits.append(p) or real_init(p, st))
    rec = run(cfg, work, progress=False)
    assert len(inits) == 1  # the method's init runs once: start.json and training share it
    written = json.loads((work / "config.json").read_text())
    assert written["mean"] == [0.5, 0.5, 0.5] and written["std"] == [0.25, 0.25, 0.25]
    assert rec["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert rec["baseline"]["kind"] == "imported" and rec["baseline"]["sha256"]
    start = json.loads((work / "start.json").read_text())
    assert 0.0 <= start["pretrained_accuracy"] <= 1.0
    # dense: init changes nothing, so the accuracy right after init is the pretrained one
    assert start["after_init_accuracy"] == start["pretrained_accuracy"]


needs_pretrained = pytest.mark.skipif(
    not (PRETRAINED / "resnet56.npz").is_file() or not (CIFAR10 / "test.npz").is_file(),
    reason=f"the trained CIFAR-10 ResNets ({PRETRAINED}) or the CIFAR-10 test set are absent")


@needs_pretrained
@pytest.mark.parametrize("name, accuracy", [("resnet20", 0.9173), ("resnet56", 0.9339)])
def test_imported_pretrained_models_reach_their_published_accuracy(name, accuracy):
    model, variables = from_torch(name, PRETRAINED / f"{name}.npz")
    ds = data_lib.load_cifar("cifar10", str(CIFAR10))
    pre = functools.partial(augment.normalize, **IMAGENET_STATS)
    res = evaluation.evaluate(model, variables, ds.x_test, ds.y_test, 1000, preprocess=pre)
    assert ds.num_test == 10000
    assert res["accuracy"] == accuracy  # exactly: 9173 / 9339 of the 10,000 test images
