"""Masked normalisation: channels summed over (LayerNorm, RMSNorm, GroupNorm, channel means)
pruned exactly: `trace(norms='masked')`, `jaxprune.masked_norm.masked_apply` and their
compaction."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import evaluation, optim, parallel, train_step
from jaxprune import training as tr
from jaxprune.compaction import compact
from jaxprune.graph import leaf_paths, trace, trace_linen
from jaxprune.masked_norm import masked_apply
from jaxprune.masks import apply_masks, binarize, init_masks
from jaxprune.methods import SFP


class ConvNeXtBlock(nn.Module):
    """A stem, one ConvNeXt block (depthwise 7x7, LayerNorm, MLP 4x, layer scale, residual) and a
    LayerNorm'd head."""

    dim: int = 8

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (3, 3), name="stem")(x)
        h = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim, name="dw")(x)
        h = nn.LayerNorm(name="ln")(h)
        h = nn.gelu(nn.Dense(4 * self.dim, name="fc1")(h))
        h = nn.Dense(self.dim, name="fc2")(h)
        x = x + h * self.param("gamma", nn.initializers.constant(0.5), (self.dim,))
        x = nn.LayerNorm(name="ln_out")(x.mean((1, 2)))
        return nn.Dense(5, name="head")(x)


class RMSNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.RMSNorm(name="n1")(nn.Conv(8, (3, 3), name="c1")(x)))
        x = nn.relu(nn.RMSNorm(name="n2")(nn.Conv(12, (3, 3), strides=2, name="c2")(x)))
        return nn.Dense(5, name="head")(x.mean((1, 2)))


class GNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.GroupNorm(num_groups=2, name="gn")(nn.Conv(8, (3, 3), name="c1")(x)))
        return nn.Dense(5, name="head")(x.mean((1, 2)))


class LNNet(nn.Module):
    """A small LayerNorm CNN for the digits."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(nn.LayerNorm(name="ln1")(nn.Conv(16, (3, 3), name="c1")(x)))
        x = nn.relu(nn.LayerNorm(name="ln2")(nn.Conv(16, (3, 3), strides=2, name="c2")(x)))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def _setup(model, shape=(2, 8, 8, 3)):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    v = model.init(jax.random.PRNGKey(0), x)
    return x, v, trace(model.apply, v, x, norms="masked")


def _random_masks(graph, rate, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for n, g in graph.groups.items():
        keep = max(1, int(round(g.size * (1 - rate))))
        m = np.zeros(g.size, np.float32)
        m[rng.choice(g.size, keep, replace=False)] = 1
        out[n] = jnp.asarray(m)
    return out


def _close(out, ref) -> bool:
    """Relative error <= 1e-5 of the largest output, or of 1 for outputs below 1 (a LayerNorm
    over two kept channels amplifies float32 rounding: `compact_program`'s own scale)."""
    return float(np.max(np.abs(out - ref))) <= 1e-5 * max(float(np.max(np.abs(ref))), 1.0)


def _leaves(tree):
    return dict(zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("model, groups", [
    (ConvNeXtBlock(), {"stem", "fc1"}), (RMSNet(), {"c1", "c2"})])
def test_compact_equals_masked_apply_and_every_pruned_tensor_shrinks(model, groups):
    x, v, graph = _setup(model)
    assert set(graph.groups) == groups and graph.normalised
    ma = jax.jit(lambda v, x, m: masked_apply(model.apply, graph)(v, x, masks=m))
    for rate in (0.1, 0.5, 0.9):
        masks = _random_masks(graph, rate)
        ref = np.asarray(ma(apply_masks(v, masks, graph), x, masks))
        res = compact(model, v, masks, graph, sample_input=x)
        out = np.asarray(res.model.apply(res.variables, x))
        assert _close(out, ref), rate
        dense, small = _leaves(v), _leaves(res.variables)
        for name, g in graph.groups.items():
            kept = int(np.sum(np.asarray(masks[name])))
            if kept == g.size:
                continue
            for mem in g.members:
                assert small[mem.path].shape[mem.axis] < dense[mem.path].shape[mem.axis], mem.path


def test_masked_layernorm_is_the_layernorm_of_the_kept_channels():
    """Hand reference: LayerNorm (numpy, float64) over the kept channels only."""
    model = ConvNeXtBlock()
    x, v, graph = _setup(model)
    masks = _random_masks(graph, 0.5, seed=3)
    vm = apply_masks(v, masks, graph)
    _, inter = masked_apply(
        lambda vv, xx: model.apply(vv, xx, capture_intermediates=True, mutable=["intermediates"]),
        graph)(vm, x, masks=masks)
    kept = np.flatnonzero(np.asarray(masks["stem"]))
    # the depthwise conv's output (the LayerNorm's input), recomputed from the masked weights
    h = model.apply(vm, x, capture_intermediates=True, mutable=["intermediates"])[1]
    dw = np.asarray(h["intermediates"]["dw"]["__call__"][0], np.float64)[..., kept]
    mu = dw.mean(-1, keepdims=True)
    var = dw.var(-1, keepdims=True)
    p = vm["params"]["ln"]
    want = (dw - mu) / np.sqrt(var + 1e-6) * np.asarray(p["scale"])[kept] + np.asarray(p["bias"])[kept]
    got = np.asarray(inter["intermediates"]["ln"]["__call__"][0])
    np.testing.assert_allclose(got[..., kept], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[..., np.asarray(masks["stem"]) == 0], 0.0)


def test_all_ones_masks_give_the_plain_model():
    for model in (ConvNeXtBlock(), RMSNet()):
        x, v, graph = _setup(model)
        ones = init_masks(graph)
        got = masked_apply(model.apply, graph)(v, x, masks=ones)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(model.apply(v, x)))  # bitwise
        jitted = jax.jit(lambda v, x, m: masked_apply(model.apply, graph)(v, x, masks=m))(v, x, ones)
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(model.apply(v, x)), rtol=1e-5,
                                   atol=1e-6)


def test_plain_graphs_run_apply_itself():
    model = RMSNet()
    x, v, _ = _setup(model)
    graph = trace(model.apply, v, x)  # norms='refuse': nothing normalised
    assert not graph.normalised and "c1" in graph.unprunable
    f = masked_apply(model.apply, graph)
    np.testing.assert_array_equal(np.asarray(f(v, x, masks={})), np.asarray(model.apply(v, x)))


def test_group_norm_prunes_channel_j_of_every_group_and_is_refused_by_default():
    x, v, graph = _setup(GNNet())
    assert set(graph.groups) == {"c1"} and graph.normalised == {"c1"}
    want = [[j, j + 4] for j in range(4)]  # 2 groups of 4: channel j of each group is one unit
    assert {m.path[1:]: m.index.tolist() for m in graph.groups["c1"].members} == {
        ("c1", "kernel"): want, ("c1", "bias"): want, ("gn", "scale"): want,
        ("gn", "bias"): want, ("head", "kernel"): want}
    refused = trace(GNNet().apply, v, x)
    assert "c1" not in refused.groups
    assert "splits the channel axis into groups" in refused.unprunable["c1"]
    with pytest.raises(ValueError, match="norms='sometimes'"):
        trace(GNNet().apply, v, x, norms="sometimes")


def _np_group_norm(h, groups, scale, bias, eps=1e-6):
    """GroupNorm of ``h [N, H, W, C]`` (numpy, float64) over ``groups`` equal groups."""
    n, hh, w, c = h.shape
    g = h.reshape(n, hh, w, groups, c // groups)
    mu = g.mean((1, 2, 4), keepdims=True)
    var = g.var((1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + eps)).reshape(h.shape) * scale + bias


def test_masked_group_norm_is_the_group_norm_of_the_kept_channels_and_compacts_narrow():
    """Hand reference: GroupNorm (numpy) of the kept channels, 2 groups of 2; the compact
    model equals it and its group reshape runs narrow ([.., 2 groups, 2 kept])."""
    model = GNNet()
    x, v, graph = _setup(model)
    masks = {"c1": jnp.asarray([1.0, 0.0, 0.0, 1.0])}
    kept = np.array([0, 3, 4, 7])
    vm = apply_masks(v, masks, graph)
    _, inter = masked_apply(
        lambda vv, xx: model.apply(vv, xx, capture_intermediates=True, mutable=["intermediates"]),
        graph)(vm, x, masks=masks)
    h = model.apply(vm, x, capture_intermediates=True, mutable=["intermediates"])[1]
    conv = np.asarray(h["intermediates"]["c1"]["__call__"][0], np.float64)[..., kept]
    p = vm["params"]["gn"]
    want = _np_group_norm(conv, 2, np.asarray(p["scale"])[kept], np.asarray(p["bias"])[kept])
    got = np.asarray(inter["intermediates"]["gn"]["__call__"][0])
    np.testing.assert_allclose(got[..., kept], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.delete(got, kept, axis=-1), 0.0)
    res = compact(model, v, masks, graph, sample_input=x)
    ref = masked_apply(model.apply, graph)(vm, x, masks=masks)
    assert _close(np.asarray(res.model.apply(res.variables, x)), np.asarray(ref))
    assert res.variables["params"]["gn"]["scale"].shape == (4,)
    jaxpr = jax.make_jaxpr(res.model.apply)(res.variables, x)
    shapes = [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "reshape"]
    assert (2, 8, 8, 2, 2) in shapes and not any(8 in s[3:] for s in shapes if len(s) == 5)


def test_a_group_norm_channel_masked_then_unmasked_is_counted_again():
    """SFP's re-selection: a channel whose mask comes back to 1 (its weights regrown) takes part
    in its group's statistics again: the masked apply is then the plain model."""
    model = GNNet()
    x, v, graph = _setup(model)
    f = masked_apply(model.apply, graph)
    off = {"c1": jnp.asarray([1.0, 0.0, 1.0, 1.0])}
    on = {"c1": jnp.ones(4)}
    dropped = np.asarray(f(apply_masks(v, off, graph), x, masks=off))
    back = np.asarray(f(v, x, masks=on))  # the same function: its cached plan reads the masks
    np.testing.assert_array_equal(back, np.asarray(model.apply(v, x)))
    assert not np.allclose(back, dropped, atol=1e-3)
    # and it is differentiable in the regrown channel through the statistics
    grad = jax.grad(lambda w: jnp.sum(f(w, x, masks=on) ** 2))(v)["params"]["c1"]["kernel"]
    assert float(jnp.abs(grad[..., 1]).sum()) > 0 and float(jnp.abs(grad[..., 5]).sum()) > 0


def test_a_channel_shuffle_next_to_a_norm_is_still_refused():
    """A split of the channel axis that is not a GroupNorm (a ShuffleNet channel shuffle: no sum
    over the split's inner part) stays unprunable, with norms='masked' and a LayerNorm nearby."""

    class Shuffle(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm(name="ln")(nn.Conv(8, (3, 3), name="a")(x))
            b, h, w, c = x.shape
            x = x.reshape(b, h, w, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(b, h, w, c)
            return nn.Dense(3, name="head")(nn.Conv(4, (1, 1), name="b")(x).mean((1, 2)))

    x, v, graph = _setup(Shuffle())
    assert "a" not in graph.groups and "splits the channel axis" in graph.unprunable["a"]
    assert "b" in graph.groups


def test_sums_inside_a_loop_are_refused_by_masked_apply():
    class Looped(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(4, (3, 3), name="a")(x)
            y = jax.lax.fori_loop(0, 2, lambda i, c: c - c.mean(-1, keepdims=True), y)
            return nn.Dense(2, name="b")(y.mean((1, 2)))

    x, v, graph = _setup(Looped())
    assert graph.normalised == {"a"}
    with pytest.raises(ValueError, match="loop or branch"):
        masked_apply(Looped().apply, graph)(v, x, masks=init_masks(graph))


def test_evaluation_of_a_normalised_graph_needs_masks():
    model = RMSNet()
    x, v, graph = _setup(model)
    labels = np.arange(2, dtype=np.int32)
    with pytest.raises(ValueError, match="pass masks"):
        evaluation.evaluate(model, v, np.asarray(x), labels, 2, graph=graph)
    masks = _random_masks(graph, 0.5)
    vm = apply_masks(v, masks, graph)
    got = evaluation.evaluate(model, vm, np.asarray(x), labels, 2, graph=graph, masks=masks)
    logits = masked_apply(model.apply, graph)(vm, x, masks=masks)
    ce = -jax.nn.log_softmax(logits)[np.arange(2), labels]
    assert got["loss"] == pytest.approx(float(jnp.mean(ce)), rel=1e-5)


def test_sfp_trains_a_layernorm_model_and_its_compact_model_matches_the_masked_one():
    from jaxprune.data import load_digits_dataset

    ds = load_digits_dataset(image_size=8, channels=1)
    norm = lambda a: ((np.asarray(a, np.float32) - ds.mean[0]) / ds.std[0])  # noqa: E731
    x_train, x_test = norm(ds.x_train), norm(ds.x_test)
    model = LNNet()
    graph = trace_linen(model, model.init(jax.random.PRNGKey(0), x_test[:1]), x_test[:1],
                        norms="masked")
    assert graph.normalised == {"c1", "c2"}
    epochs, bs = 2, 32
    steps = -(-len(x_train) // bs)
    pruner = SFP(rate=0.5, final_bn="zero").pruner(graph, epochs, steps)
    opt = optim.make_optimizer(optim.step_schedule(epochs, base_lr=0.1, boundaries=(), factor=1.0))
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), x_train[:1], opt)
    state, hist = tr.fit(model, graph, pruner, state, opt,
                         (x_train, ds.y_train), (x_test, ds.y_test),
                         tr.FitOptions(epochs=epochs, batch_size=bs, progress=False, mesh=mesh))
    masks = binarize(state.masks)
    assert all(int(np.sum(np.asarray(m))) == 8 for m in masks.values())
    masked_vars = apply_masks(state.variables, masks, graph)
    masked = evaluation.evaluate(model, masked_vars, x_test, ds.y_test, 360, graph=graph,
                                 masks=masks)
    assert masked["accuracy"] > 0.8  # it learned
    res = compact(model, state.variables, masks, graph, sample_input=x_test[:8])
    logits = np.asarray(res.model.apply(res.variables, x_test))
    assert float(np.mean(np.argmax(logits, -1) == ds.y_test)) == masked["accuracy"]
    assert len(hist) == epochs


class EinsumAttention(nn.Module):
    """Multi-head self-attention written by hand: a fused qkv projection, a head reshape, einsum."""

    heads: int = 4

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // self.heads), -1)
        return nn.Dense(c, name="proj")(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, c))


class TinyViT(nn.Module):
    """Patch embedding conv, CLS token (broadcast_to), a pre-LN block with flax's multi-head
    self-attention and an MLP, a LayerNorm'd head."""

    dim: int = 16
    heads: int = 2
    einsum: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.dim, (4, 4), strides=4, name="patch")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, self.dim)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.dim))
        h = nn.LayerNorm(name="ln1")(x)
        if self.einsum:
            x = x + EinsumAttention(name="attn")(h)
        else:
            x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(self.dim, name="fc2")(nn.gelu(nn.Dense(4 * self.dim, name="fc1")(h)))
        return nn.Dense(5, name="head")(nn.LayerNorm(name="ln_f")(x[:, 0]))


@pytest.mark.parametrize("einsum", [False, True])
def test_tiny_vit_prunes_heads_mlp_units_and_the_normalised_width(einsum):
    """Traced and compacted at batch 1 (batches 1 and 3, both policies, export and save:
    tests/test_norm_zoo.py)."""
    model = TinyViT(einsum=einsum)
    x, v, graph = _setup(model, (1, 8, 8, 3))
    members = lambda n: {(m.path[1:], m.axis, m.role) for m in graph.groups[n].members}  # noqa: E731
    if einsum:  # one unit per head: its query, key and value columns and its projection rows
        heads = graph.groups["attn/qkv"]
        assert heads.size == 4
        idx = {m.path[1:]: m.index for m in heads.members}
        np.testing.assert_array_equal(idx[("attn", "qkv", "kernel")][1],
                                      [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39])
        np.testing.assert_array_equal(idx[("attn", "proj", "kernel")][1], [4, 5, 6, 7])
    else:  # flax's attention: heads, the query/key head dims and the value head dims
        heads = members("attn/query")
        assert graph.groups["attn/query"].size == 2
        assert {(("attn", p, "kernel"), 1, "out") for p in ("query", "key", "value")} <= heads
        assert (("attn", "out", "kernel"), 0, "in") in heads  # the output projection's head rows
        assert graph.groups["attn/value"].size == 8
    assert {(("fc1", "kernel"), 1, "out"), (("fc2", "kernel"), 0, "in")} <= members("fc1")
    assert graph.groups["fc1"].size == 64 and graph.normalised == {"patch"}
    ma = jax.jit(lambda v, x, m: masked_apply(model.apply, graph)(v, x, masks=m))
    for rate in (0.1, 0.5, 0.9):
        masks = _random_masks(graph, rate, seed=1)
        ref = np.asarray(ma(apply_masks(v, masks, graph), x, masks))
        res = compact(model, v, masks, graph, sample_input=x)
        out = np.asarray(res.model.apply(res.variables, x))
        assert _close(out, ref), rate
        dense, small = _leaves(v), _leaves(res.variables)
        for name, g in graph.groups.items():
            if int(np.sum(np.asarray(masks[name]))) < g.size:
                for mem in g.members:
                    assert small[mem.path].shape[mem.axis] < dense[mem.path].shape[mem.axis]


def test_masked_apply_takes_train_mode_calls_with_mutable_state_and_rngs():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.LayerNorm()(nn.Conv(8, (3, 3), name="c")(x))
            x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), name="d")(x))
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(3)(x.mean((1, 2)))

    model = Net()
    x, v, graph = _setup(model, (2, 6, 6, 3))
    assert graph.normalised == {"c"}
    f = masked_apply(model.apply, graph)
    for key in (jax.random.PRNGKey(3), jax.random.key(3)):  # raw and typed keys
        kw = dict(train=True, mutable=["batch_stats"], rngs={"dropout": key})
        got, st = f(v, x, masks=init_masks(graph), **kw)
        want, st_want = model.apply(v, x, **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for a, b in zip(jax.tree_util.tree_leaves(st), jax.tree_util.tree_leaves(st_want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    masks = _random_masks(graph, 0.5)
    got, _ = f(apply_masks(v, masks, graph), x, masks=masks, train=True, mutable=["batch_stats"],
               rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.all(np.isfinite(np.asarray(got)))


def test_trace_nnx_takes_norms_and_its_masked_layernorm_is_over_the_kept_channels():
    """An NNX model (conv -> LayerNorm -> mean -> linear): `trace_nnx` refuses the normalised
    conv by default and prunes it with ``norms='masked'``; the masked model's output equals a
    numpy reference whose LayerNorm runs over the kept channels only."""
    from flax import nnx

    from jaxprune.pruner import nnx_apply, nnx_variables, trace_nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.ln = nnx.LayerNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.head(self.ln(self.conv(x)).mean((1, 2)))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
    assert "conv" not in trace_nnx(model, x).groups
    graph = trace_nnx(model, x, norms="masked")
    assert set(graph.groups) == {"conv"} and graph.normalised == {"conv"}
    v = nnx_variables(model)
    masks = {"conv": jnp.asarray([1, 0, 1, 1, 0, 1, 0, 1], jnp.float32)}
    got = masked_apply(nnx_apply(model), graph)(apply_masks(v, masks, graph), x, masks=masks)
    kept = np.flatnonzero(np.asarray(masks["conv"]))
    p = {k: {n: np.asarray(a, np.float64) for n, a in d.items()} for k, d in v["params"].items()}
    h = np.asarray(model.conv(x), np.float64)[..., kept]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * p["ln"]["scale"][kept] + p["ln"]["bias"][kept]
    want = h.mean((1, 2)) @ p["head"]["kernel"][kept] + p["head"]["bias"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
