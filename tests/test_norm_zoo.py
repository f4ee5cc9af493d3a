"""Normalised models the code has not special-cased, pruned with ``norms='masked'``: a
ConvNeXt-style block (depthwise conv, LayerNorm, MLP, layer scale), an RMSNorm CNN, a GroupNorm
UNet (encoder/decoder, skip concatenation, GroupNorm) and a tiny ViT (CLS token, heads, MLP).

Each model, under both residual policies, at rates 0.1 / 0.5 / 0.9 (the default suite: rate
0.5, coupled; the rest is marked slow): compacted on a batch of 3
(the ViT also on a batch of 1), the compact outputs equal the masked model's
(`jaxprune.masked_norm.masked_apply` of the hard-masked variables; relative error <= 1e-5,
inference mode) at batch sizes 1 and 3; every pruned leaf shrinks by the pruned count. Once per
model, the ``jax.export`` artifact and ``save_compact`` -> ``jaxprune.load`` equal the compact
model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from tests.compact_checks import assert_pruned_tensors_shrink, random_masks
from jaxprune import load
from jaxprune.artifact import save_compact
from jaxprune.compaction import compact
from jaxprune.graph import trace
from jaxprune.masked_norm import masked_apply
from jaxprune.masks import apply_masks

RATES = (0.1, 0.5, 0.9)


class ConvNeXtBlock(nn.Module):
    """A stem, a ConvNeXt block (depthwise 7x7, LayerNorm, MLP 4x, layer scale, residual), a
    LayerNorm'd head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        h = nn.LayerNorm(name="ln")(nn.Conv(8, (7, 7), feature_group_count=8, name="dw")(x))
        h = nn.Dense(8, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(h)))
        x = x + h * self.param("gamma", nn.initializers.constant(0.5), (8,))
        return nn.Dense(5, name="head")(nn.LayerNorm(name="ln_out")(x.mean((1, 2))))


class RMSNormCNN(nn.Module):
    """Conv -> RMSNorm -> relu twice (the second strided) with a residual 1x1 branch."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.RMSNorm(name="n1")(nn.Conv(8, (3, 3), name="c1")(x)))
        y = nn.relu(nn.RMSNorm(name="n2")(nn.Conv(8, (3, 3), name="c2")(x)))
        x = x + nn.Conv(8, (1, 1), name="c3")(y)
        x = nn.relu(nn.RMSNorm(name="n4")(nn.Conv(12, (3, 3), strides=2, name="c4")(x)))
        return nn.Dense(5, name="head")(x.mean((1, 2)))


class GroupNormUNet(nn.Module):
    """Encoder (conv, GroupNorm, strided conv), decoder (nearest upsampling, conv), a skip
    concatenation and a per-pixel output."""

    @nn.compact
    def __call__(self, x):
        gn = lambda g, name: nn.GroupNorm(num_groups=g, name=name)  # noqa: E731
        e1 = nn.relu(gn(2, "gn1")(nn.Conv(8, (3, 3), name="enc1")(x)))
        e2 = nn.relu(gn(4, "gn2")(nn.Conv(16, (3, 3), strides=2, name="enc2")(e1)))
        u = jnp.repeat(jnp.repeat(e2, 2, axis=1), 2, axis=2)
        u = nn.relu(gn(2, "gn3")(nn.Conv(8, (3, 3), name="up")(u)))
        d = jnp.concatenate([u, e1], axis=-1)
        d = nn.relu(gn(2, "gn4")(nn.Conv(8, (3, 3), name="dec")(d)))
        return nn.Conv(3, (1, 1), name="out")(d)


class TinyViT(nn.Module):
    """Patch embedding, a CLS token broadcast over the batch, a pre-LN block (flax's multi-head
    attention, an MLP) and a LayerNorm'd head on the CLS token."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (4, 4), strides=4, name="patch")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, 16)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, 16))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, 16)), x], axis=1)
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(h)))
        return nn.Dense(5, name="head")(nn.LayerNorm(name="ln_f")(x[:, 0]))


MODELS = {"convnext": ConvNeXtBlock, "rmsnorm_cnn": RMSNormCNN, "groupnorm_unet": GroupNormUNet,
          "tiny_vit": TinyViT}


def _x(batch, seed=None):
    return jax.random.normal(jax.random.PRNGKey(batch if seed is None else seed), (batch, 8, 8, 3))


@pytest.fixture(scope="module", params=sorted(MODELS))
def zoo(request):
    model = MODELS[request.param]()
    return request.param, model, random_variables(model, _x(1))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(b))))


@pytest.mark.parametrize("residual, rates", [
    pytest.param("coupled", (0.5,), id="coupled-0.5"),
    pytest.param("coupled", (0.1, 0.9), id="coupled-0.1-0.9", marks=pytest.mark.slow),
    pytest.param("scatter", RATES, id="scatter", marks=pytest.mark.slow)])
def test_compact_equals_masked_model_at_every_rate_and_batch(zoo, residual, rates, tmp_path):
    """The default suite runs rate 0.5 under the coupled policy (with the export and save
    checks); ``-m slow`` the other rates and the scatter policy."""
    name, model, v = zoo
    graph = trace(model.apply, v, _x(1), residual=residual, norms="masked")
    assert graph.normalised, graph.summary()
    if name == "groupnorm_unet":  # channel j of every GroupNorm group is one unit
        assert {"enc1", "enc2", "up"} <= set(graph.groups)
        assert graph.groups["enc2"].size == 4
    if name == "tiny_vit":
        assert {"patch", "attn/query", "fc1"} <= set(graph.groups)
    ref = jax.jit(lambda w, x, m: masked_apply(model.apply, graph)(w, x, masks=m))
    for rate in rates:
        masks = random_masks(graph, rate)
        masked = apply_masks(v, masks, graph)
        for sample in ((1, 3) if name == "tiny_vit" else (3,)):
            res = compact(model, v, masks, graph, sample_input=_x(sample, seed=7))
            run = jax.jit(res.model.apply)
            for b in (1, 3):
                x = _x(b)
                assert _rel(run(res.variables, x), ref(masked, x, masks)) <= 1e-5, (rate, sample, b)
        shrunk = assert_pruned_tensors_shrink(res.variables, v, graph, masks)
        assert shrunk and all(shrunk.values())
        if rate == 0.5 and residual == "coupled":
            _check_saved(res, tmp_path)


def _check_saved(res, tmp_path):
    """``jax.export`` round trip and ``save_compact`` -> ``load`` equal the compact model."""
    x = _x(3, seed=3)
    want = res.model.apply(res.variables, x)
    exp = jax.export.deserialize(res.model.export(res.variables, x).serialize())
    assert _rel(exp.call(res.variables, x), want) <= 1e-6
    path = save_compact(tmp_path / "m", res.model, res.variables, {"method": "t"},
                        input_shape=(8, 8, 3), batch_size=2)
    m2, v2, _ = load(path)
    assert _rel(m2.apply(v2, x), want) <= 1e-5  # batch 3: padded to 4, two chunks
