"""Compaction of models shaped like third-party ones: a broadcast parameter (a ViT's CLS token,
whose program changes with the batch size), NNX ``nnx.Sequential`` / ``nnx.List`` layers
(integer keys), a dataclass output, a ``train`` argument that defaults to True, an inference
switch named ``deterministic``, and grouped (ResNeXt/RegNet-style) convolutions.

Each model: the compact outputs equal the hard-masked dense model's (relative error <= 1e-5,
inference mode) at rates 0.1 / 0.5 / 0.9 and batch sizes 1 and 3, under both residual
policies; every pruned leaf shrinks by the pruned count; the ``jax.export`` artifact and
``save_compact`` -> ``jaxprune.load`` give the same outputs.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.compact_checks import assert_pruned_tensors_shrink, random_masks
from jaxprune import criteria, load
from jaxprune.artifact import save_compact
from jaxprune.compaction import compact
from jaxprune.graph import leaf_paths, trace_linen
from jaxprune.masks import apply_masks
from jaxprune.pruner import nnx_apply, nnx_update, nnx_variables, trace_nnx

RATES = (0.1, 0.5, 0.9)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(b))))


def tree_err(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(rel_err(x, y) for x, y in zip(la, lb))


def _filled(shapes, seed=0):
    """Variables of the shapes ``shapes`` filled with numpy random values (no jitted init):
    N(0, 0.5), BN variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten(shapes)
    out = [rng.uniform(0.5, 2.0, s.shape) if p[-1] == "var" else rng.normal(size=s.shape) * 0.5
           for p, s in zip(leaf_paths(shapes), flat)]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a, s.dtype) for a, s in zip(out, flat)])


def _linen_variables(model, **init_kwargs):
    return _filled(jax.eval_shape(lambda: model.init(jax.random.key(0), _x(1), **init_kwargs)))


def _x(batch, shape=(8, 8, 3), seed=1):
    return jax.random.normal(jax.random.key(seed), (batch,) + shape)


def _check(model, variables, graph, dense_apply, sample_batch, **kwargs):
    """Compacts at every rate on a batch of ``sample_batch`` and compares at batches 1 and 3."""
    results = []
    for rate in RATES:
        masks = random_masks(graph, rate)
        res = compact(model, variables, masks, graph, sample_input=_x(sample_batch), **kwargs)
        masked = apply_masks(variables, masks, graph)
        for b in (1, 3):
            x = _x(b, seed=b)
            assert tree_err(res.model.apply(res.variables, x), dense_apply(masked, x)) <= 1e-5
        assert any(assert_pruned_tensors_shrink(res.variables, variables, graph, masks).values())
        results.append((res, masks))
    return results


def _check_saved(res, tmp_path, plain_ref=None):
    """``jax.export`` round trip and ``save_compact`` -> ``load`` equal the compact model."""
    x = _x(3, seed=3)
    want = res.model.apply(res.variables, x)
    want = want if plain_ref is None else plain_ref(want)
    exp = jax.export.deserialize(res.model.export(res.variables, x).serialize())
    assert tree_err(exp.call(res.variables, x), want) <= 1e-6
    path = save_compact(tmp_path / "m", res.model, res.variables, {"method": "t"},
                        input_shape=(8, 8, 3), batch_size=2)
    m2, v2, _ = load(path)
    assert tree_err(m2.apply(v2, x), want) <= 1e-5  # batch 3: padded to 4, two chunks


# ----------------------------------------------------------------------------- a ViT


@flax.struct.dataclass
class Output:
    logits: jax.Array
    aux: jax.Array


class TinyViT(nn.Module):
    """Patch embedding, a CLS token broadcast over the batch, a residual MLP, a dataclass
    output and an inference switch named ``deterministic`` (no default)."""

    @nn.compact
    def __call__(self, x, deterministic: bool):
        p = nn.Conv(8, (4, 4), strides=(4, 4), name="embed")(x)
        b = p.shape[0]
        p = p.reshape(b, -1, 8)
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, 8))
        h = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, 8)), p], axis=1)
        y = nn.gelu(nn.Dense(12, name="fc1")(h))
        y = nn.Dropout(0.5, deterministic=deterministic)(y)
        h = h + nn.Dense(8, name="fc2")(y)
        pooled = h[:, 0]
        return Output(nn.Dense(3, name="head")(pooled), nn.Dense(2, name="aux")(pooled))


@pytest.fixture(scope="module")
def vit():
    m = TinyViT()
    v = _linen_variables(m, deterministic=True)
    return m, v


@pytest.mark.parametrize("residual", ["coupled", "scatter"])
@pytest.mark.parametrize("sample_batch", [1, 3])
def test_vit_cls_broadcast_compacts_at_any_batch(vit, residual, sample_batch):
    m, v = vit
    graph = trace_linen(m, v, _x(1), residual=residual, deterministic=True)
    assert "embed" in graph.groups and "fc1" in graph.groups
    # the CLS token is pruned with the stream it is concatenated into (coupled policy)
    if residual == "coupled":
        assert any(mem.path == ("params", "cls") for mem in graph.groups["embed"].members)
    _check(m, v, graph, lambda w, a: m.apply(w, a, deterministic=True), sample_batch,
           deterministic=True)


def test_vit_dataclass_output_exports_and_saves(vit, tmp_path):
    m, v = vit
    graph = trace_linen(m, v, _x(1), deterministic=True)
    res = compact(m, v, random_masks(graph, 0.5), graph, sample_input=_x(2), deterministic=True)
    assert res.model.kwargs == {"deterministic": True}
    out = res.model.apply(res.variables, _x(3))
    assert isinstance(out, Output)  # the compact model returns the model's own type
    # saved and exported, it is a dict of the dataclass's fields
    _check_saved(res, tmp_path, lambda o: {"logits": o.logits, "aux": o.aux})


def test_compact_refuses_kwargs_for_a_bundled_model():
    from jaxprune.models import get_model

    model = get_model("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="bundled"):
        compact(model, {}, {}, None, deterministic=True)


# ----------------------------------------------------------------------------- ResNeXt


class ResNeXtBlock(nn.Module):
    """A stem and one ResNeXt bottleneck (1x1, grouped 3x3 with 3 groups of 4, 1x1) with a
    residual add; ``train`` defaults to True (as flaxmodels' models do)."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        x = nn.relu(bn("bn0")(nn.Conv(12, (3, 3), name="stem")(x)))
        y = nn.relu(bn("bn1")(nn.Conv(12, (1, 1), name="c1")(x)))
        y = nn.relu(bn("bn2")(nn.Conv(12, (3, 3), feature_group_count=3, name="c2")(y)))
        y = bn("bn3")(nn.Conv(12, (1, 1), name="c3")(y))
        x = nn.relu(x + y)
        return nn.Dense(5, name="fc")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def resnext():
    m = ResNeXtBlock()
    v = _linen_variables(m, train=False)
    return m, v


def test_grouped_conv_links_channel_j_of_every_group(resnext):
    m, v = resnext
    g = trace_linen(m, v, _x(1))
    assert "c2" not in g.unprunable and "c1" not in g.unprunable
    # channel j of the grouped conv's input is position j of each of its 3 groups of 4
    c1 = {mem.path: mem for mem in g.groups["c1"].members}
    assert g.groups["c1"].size == 4
    assert c1["params", "c1", "kernel"].index.tolist() == [[j, j + 4, j + 8] for j in range(4)]
    assert c1["params", "c2", "kernel"].index.tolist() == [[j] for j in range(4)]
    assert c1["params", "c2", "kernel"].role == "in"
    c2 = {mem.path: mem for mem in g.groups["c2"].members}
    assert c2["params", "c2", "kernel"].index.tolist() == [[j, j + 4, j + 8] for j in range(4)]
    assert c2["params", "c3", "kernel"].index.tolist() == [[j, j + 4, j + 8] for j in range(4)]
    # MACs of the grouped conv: 8x8 positions x kept outputs x kept inputs per group x 3x3
    from jaxprune import flops

    masks = {n: np.ones(grp.size, np.float32) for n, grp in g.groups.items()}
    masks["c1"][[0, 3]] = 0  # 2 of 4 inputs per group
    masks["c2"][[1]] = 0  # 3 of 4 outputs per group
    assert flops.count(g, masks).per_layer["c2"] == 64 * (3 * 3) * 2 * 9
    assert flops.count(g).per_layer["c2"] == 64 * 12 * 4 * 9


@pytest.mark.parametrize("residual", ["coupled", "scatter"])
def test_resnext_compacts_with_equal_counts_per_group(resnext, residual, tmp_path):
    m, v = resnext
    g = trace_linen(m, v, _x(1), residual=residual)
    results = _check(m, v, g, lambda w, a: m.apply(w, a, train=False), 3)
    for (res, masks) in results:
        kernel = res.variables["params"]["c2"]["kernel"]
        kept_in, kept_out = int(masks["c1"].sum()), int(masks["c2"].sum())
        # the group count is unchanged: 3 groups of kept_in inputs and kept_out outputs
        assert kernel.shape == (3, 3, kept_in, 3 * kept_out)
        assert res.model.kwargs == {"train": False}
        # and it runs narrow: a 3-group conv on the narrow kernel, not at full width
        jaxpr = jax.make_jaxpr(res.model.apply)(res.variables, _x(1))
        convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        assert any(e.params["feature_group_count"] == 3 and
                   e.invars[1].aval.shape == kernel.shape for e in convs)
    if residual == "coupled":
        # train=True is the model's default: apply and save_compact still run inference mode
        _check_saved(results[1][0], tmp_path)


# ----------------------------------------------------------------------------- NNX


class NNXStack(nnx.Module):
    """Layers in an ``nnx.Sequential`` and an ``nnx.List``: integer keys in the state."""

    def __init__(self, rngs):
        self.body = nnx.Sequential(nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.relu,
                                   nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs))
        self.layers = nnx.List([nnx.Conv(8, 8, (1, 1), rngs=rngs), nnx.Conv(8, 8, (1, 1), rngs=rngs)])
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.body(x))
        for layer in self.layers:
            h = h + nnx.relu(layer(h))
        return self.head(self.bn(h).mean((1, 2)))


@pytest.fixture(scope="module")
def nnx_stack():
    model = nnx.eval_shape(lambda: NNXStack(nnx.Rngs(0)))  # no eager init
    model.eval()
    variables = _filled(nnx_variables(model))
    nnx_update(model, variables)
    return model, variables


def test_nnx_variables_have_string_keys_and_criteria_read_them(nnx_stack):
    model, variables = nnx_stack
    assert set(variables["params"]["layers"]) == {"0", "1"}
    assert set(variables["params"]["body"]["layers"]) == {"0", "2"}
    g = trace_nnx(model, _x(1))
    assert "body/layers/2" in g.groups  # the grouped conv prunes
    kernel = np.asarray(variables["params"]["body"]["layers"]["0"]["kernel"])  # [3, 3, 3, 8]
    lead = next(mem for mem in g.groups["body/layers/0"].members if mem.path[-2:] == ("0", "kernel"))
    want = np.abs(kernel).sum((0, 1, 2))[lead.index].sum(1)
    got = criteria.l1_norm(variables, g)["body/layers/0"]
    others = [mem for mem in g.groups["body/layers/0"].members if mem.role == "out" and mem is not lead]
    assert not others  # one producer: l1 is its filters' norm
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for crit in (criteria.l2_norm, criteria.fpgm):
        assert set(crit(variables, g)) == set(g.groups)
    # the NNX state itself (integer keys) is read by the same paths
    state = nnx.state(model, nnx.Param)
    np.testing.assert_allclose(criteria.l1_norm({"params": state}, g)["body/layers/0"], want, rtol=1e-5)


@pytest.mark.parametrize("residual", ["coupled", "scatter"])
def test_nnx_sequential_and_list_compact_save_and_load(nnx_stack, residual, tmp_path):
    model, variables = nnx_stack
    g = trace_nnx(model, _x(1), residual=residual)
    results = _check(model, variables, g, nnx_apply(model), 3)
    if residual == "coupled":
        res = results[1][0]
        assert res.variables["params"]["layers"]["0"]["kernel"].shape[-1] < 8
        _check_saved(res, tmp_path)


# ----------------------------------------------------------------------------- source lines


class NormedDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln")(nn.Dense(6, name="fc")(x))
        return nn.Dense(2, name="out")(h)


def test_unprunable_layernorm_names_the_users_line(monkeypatch):
    import functools
    import os

    from jax._src import source_info_util

    # where site-packages is not under the standard library (a virtualenv), jax counts flax's
    # frames as the user's: the line named must still be this file's, not flax's LayerNorm
    jax_dir = os.path.dirname(os.path.abspath(jax.__file__)) + os.sep
    monkeypatch.setattr(source_info_util, "is_user_filename",
                        functools.lru_cache(lambda f: not f.startswith(jax_dir)))
    m = NormedDense()
    x = jnp.ones((1, 4))
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), x))
    why = trace_linen(m, v, x).unprunable["fc"]
    assert "test_compact_cases.py:" in why and "(NormedDense.__call__)" in why, why


def test_group_consistent_keeps_the_same_positions_in_every_group():
    from jaxprune.graph.narrow import group_consistent

    assert group_consistent(None, 3, 12)
    assert group_consistent(np.array([1, 3, 5, 7, 9, 11]), 3, 12)  # j = 1, 3 of each group of 4
    assert not group_consistent(np.array([1, 3, 5, 6, 9, 11]), 3, 12)  # group 1 keeps 1, 2
    assert not group_consistent(np.array([0, 4, 8, 9]), 3, 12)  # 4 kept: not 3 equal counts
    assert not group_consistent(np.array([], np.int64), 3, 12)
