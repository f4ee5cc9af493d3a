"""Bundled models: registry, configs, parameter counts and the shapes the papers describe."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from jaxprune.models import (
    MODEL_NAMES,
    CifarBasicBlock,
    CifarResNet,
    CifarVGG,
    ImageNetResNet,
    gather_channels,
    get_model,
    materialize,
    model_config,
    model_from_config,
    registry_name,
    reindex,
)
from jaxprune.models.common import reindex_plan


def _shapes(model, size=32, **kw):
    x = jnp.zeros((1, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, **kw))


def _n_params(model, size=32):
    params = _shapes(model, size)["params"]
    return sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- registry


def test_unknown_model_lists_the_allowed_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as info:
        get_model("resnet21")
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="fixes \\['depth'\\]"):
        get_model("resnet20", depth=32)
    assert get_model("ResNet20").depth == 20  # case-insensitive


def test_registry_covers_the_documented_models():
    assert set(MODEL_NAMES) == {
        "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "vgg11", "vgg13", "vgg16", "vgg19",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "mobilenetv2_tiny", "densenet_tiny"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_config_round_trip(name):
    model = get_model(name, num_classes=7)
    cfg = json.loads(json.dumps(model_config(model)))
    assert cfg["model"] == name and registry_name(model) == name
    assert model_from_config(cfg) == model
    assert model_from_config({"model": name, "num_classes": 7}) == model


def test_model_config_round_trip_with_keep_dicts():
    model = get_model("resnet20", keep_out={"stem": [0, 2, 5], "layer1_0/conv1": np.arange(3)},
                      keep_in={"layer1_0/conv1": (0, 2, 5)})
    assert model.keep_out == FrozenDict({"stem": (0, 2, 5), "layer1_0/conv1": (0, 1, 2)})
    cfg = json.loads(json.dumps(model_config(model)))
    assert cfg["keep_out"] == {"stem": [0, 2, 5], "layer1_0/conv1": [0, 1, 2]}
    back = model_from_config(cfg)
    assert back == model and hash(back) == hash(model)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_from_config({"model": "nope"})
    with pytest.raises(ValueError, match="unknown model class 'Foo'"):
        model_from_config({"class": "Foo"})


def test_depth_validation():
    x = jnp.zeros((1, 32, 32, 3))
    for model, msg in ((CifarResNet(depth=21), "6n\\+2"), (ImageNetResNet(depth=19), "one of"),
                       (CifarVGG(depth=12), "one of")):
        with pytest.raises(ValueError, match=msg):
            jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), x))


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("depth,expected", [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_cifar_resnet_param_count(depth, expected):
    n = (depth - 2) // 6
    hand = 9 * 3 * 16 + 2 * 16 + 64 * 10 + 10  # stem, stem_bn, fc
    c_in = 16
    for w in (16, 32, 64):
        for _ in range(n):
            hand += 9 * c_in * w + 9 * w * w + 4 * w  # conv1, conv2 (no bias), bn1, bn2
            c_in = w
    assert _n_params(get_model(f"resnet{depth}")) == hand == expected


@pytest.mark.parametrize("name,expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                           ("resnet50", 25_557_032)])
def test_imagenet_resnet_param_counts_match_torchvision(name, expected):
    assert _n_params(get_model(name, num_classes=1000), size=64) == expected


def test_tiny_models_param_counts():
    assert _n_params(get_model("mobilenetv2_tiny")) == 20_794
    assert _n_params(get_model("densenet_tiny")) == 6_314


# ----------------------------------------------------------------------------- option A


def test_option_a_shortcut_zero_pads_channels():
    """Stride-2 block 2 -> 4 channels: shortcut = x[:, ::2, ::2] padded with one zero channel
    on each side (lo = (4 - 2) // 2 = 1). The branch is silenced with bn2 scale = 0, so the
    block's output is relu(shortcut + bn2.bias)."""
    block = CifarBasicBlock(in_planes=2, planes=4, stride=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.0, size=(1, 4, 4, 2)), jnp.float32)
    v = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype),
                               jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x)))
    params = jax.tree_util.tree_map(lambda a: a, v["params"])
    bias = jnp.asarray([0.25, -0.1, 0.5, -0.75])
    params["bn2"] = {"scale": jnp.zeros(4), "bias": bias}
    out = np.asarray(block.apply({"params": params, "batch_stats": v["batch_stats"]}, x))
    sub = np.asarray(x)[:, ::2, ::2, :]
    expected = np.zeros((1, 2, 2, 4), np.float32)
    expected[..., 1:3] = sub
    expected = np.maximum(expected + np.asarray(bias), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert (out[..., 0] == 0.25).all() and (out[..., 3] == 0).all()

    # compacted: the stream enters at positions (0, 1) -> (1, 2) after the pad and leaves at
    # positions (1, 3): channel 0 is x's channel 0, channel 1 (position 3) is pad only
    small = CifarBasicBlock(in_planes=2, planes=4, stride=2, out_positions=(1, 3),
                            keep_out={"conv2": (1, 3)})
    params2 = dict(params)
    params2["conv2"] = {"kernel": params["conv2"]["kernel"][..., (1, 3)]}
    params2["bn2"] = {"scale": jnp.zeros(2), "bias": bias[np.array([1, 3])]}
    stats2 = dict(v["batch_stats"])
    stats2["bn2"] = {"mean": jnp.ones(2), "var": jnp.ones(2)}
    out2 = np.asarray(small.apply({"params": params2, "batch_stats": stats2}, x))
    np.testing.assert_allclose(out2, expected[..., [1, 3]], rtol=1e-6, atol=1e-6)


def test_reindex_matches_numpy():
    x = jnp.arange(2 * 5, dtype=jnp.float32).reshape(2, 5) + 1.0
    src = (1, 3, 4, 7, 9)

    def ref(dst):
        where = {p: i for i, p in enumerate(src)}
        out = np.zeros((2, len(dst)), np.float32)
        for j, p in enumerate(dst):
            if p in where:
                out[:, j] = np.asarray(x)[:, where[p]]
        return out

    for dst, kind in (((1, 3, 4, 7, 9), "identity"), ((0, 3, 4, 7, 8), "pad"),
                      ((9, 1), "gather"), ((0, 1, 2, 9), "gather"), ((3, 4), "pad"),
                      ((2, 5), "pad")):
        assert reindex_plan(src, dst)[0] == kind, dst
        np.testing.assert_array_equal(np.asarray(reindex(x, src, dst)), ref(dst))
    assert reindex(x, src, src) is x
    with pytest.raises(ValueError, match="5 channels but src lists 2"):
        reindex(x, (0, 1), (0, 1))


def test_gather_channels_is_an_exact_selection_without_a_gather():
    """Bitwise equal to numpy's take with a zero slot, on any axis and dtype, and compiled
    without a gather (a gather along channels costs XLA:CPU two transposes)."""
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((2, 3, 5)).astype(np.float32) * 1e3  # full-mantissa values
    index = np.array([4, 5, 0, 0, 2, 5])  # 5 = the zero slot
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
        x = jnp.asarray(x32).astype(dtype)
        for axis in (2, 0, -2):
            n = x.shape[axis]
            idx = np.minimum(index, n)
            ref = np.take(np.concatenate([np.asarray(x), np.zeros_like(np.take(np.asarray(x), [0], axis))],
                                         axis=axis), idx, axis=axis)
            got = gather_channels(x, idx, axis=axis)
            assert got.dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(got), ref, err_msg=f"{dtype} axis {axis}")
    hlo = jax.jit(lambda a: gather_channels(a, index)).lower(jnp.asarray(x32)).compile().as_text()
    assert " gather(" not in hlo
    with pytest.raises(ValueError, match=r"index out of range \[0, 5\]"):
        gather_channels(jnp.asarray(x32), [6])


def _barriers(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "optimization_barrier"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += _barriers(sub)
    return n


@pytest.mark.parametrize("name, blocks, size", [("resnet20", 9, 32), ("resnet18", 8, 64),
                                                 ("mobilenetv2_tiny", 2, 32)])
def test_every_residual_block_output_is_materialized(name, blocks, size):
    """One barrier per residual add (and none elsewhere), in training and inference; the
    barrier is the identity with an identity gradient."""
    model = get_model(name)
    x = jnp.ones((2, size, size, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    for train in (False, True):
        jaxpr = jax.make_jaxpr(lambda vv: model.apply(vv, x, train=train, mutable=["batch_stats"]))(v)
        assert _barriers(jaxpr.jaxpr) == blocks, (name, train)
    a = jnp.arange(6.0).reshape(2, 3) - 2.5
    np.testing.assert_array_equal(materialize(a), a)
    np.testing.assert_array_equal(jax.grad(lambda t: jnp.sum(materialize(t) ** 3))(a), 3 * a ** 2)


# ----------------------------------------------------------------------------- VGG


def test_vgg16_structure_and_classifier():
    """PFEC's CIFAR VGG-16: 13 conv (no bias) + BN, fc1 512 + BN + ReLU, fc2; no dropout."""
    model = get_model("vgg16")
    shapes = _shapes(model)
    params = shapes["params"]
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert set(params) == ({f"conv{i}" for i in range(1, 14)} | {f"bn{i}" for i in range(1, 14)}
                           | {"fc1", "fc1_bn", "fc2"})
    c_in = 3
    for i, w in enumerate(widths, start=1):
        assert set(params[f"conv{i}"]) == {"kernel"}
        assert params[f"conv{i}"]["kernel"].shape == (3, 3, c_in, w)
        assert params[f"bn{i}"]["scale"].shape == (w,)
        c_in = w
    assert params["fc1"]["kernel"].shape == (512, 512)  # 1x1x512 after five 2x2 pools
    assert params["fc1_bn"]["scale"].shape == (512,)
    assert params["fc2"]["kernel"].shape == (512, 10)
    assert set(shapes["batch_stats"]) == {f"bn{i}" for i in range(1, 14)} | {"fc1_bn"}
    # train mode runs without a 'dropout' rng (flax's Dropout would ask for one) and draws
    # no random numbers anywhere in its jaxpr: there is no dropout
    x = jnp.zeros((2, 32, 32, 3))
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(shapes)
    names = _primitives(jaxpr.jaxpr)
    assert "conv_general_dilated" in names
    assert not names & {"random_bits", "random_wrap", "threefry2x32", "random_seed"}


def _primitives(jaxpr) -> set:
    """Names of every primitive of a jaxpr, sub-jaxprs included."""
    out = set()
    for e in jaxpr.eqns:
        out.add(e.primitive.name)
        for p in e.params.values():
            sub = getattr(p, "jaxpr", p)
            if hasattr(sub, "eqns"):
                out |= _primitives(sub)
    return out
