"""Masks against hand-written numpy masking, plus the jit / optimizer contracts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import np_apply_masks, random_masks, random_variables
from jaxprune.graph import leaf_paths, trace_linen
from jaxprune.masks import (
    apply_masks,
    binarize,
    hard_masked,
    init_masks,
    keep_indices,
    mask_optimizer_state,
    validate_masks,
    zero_channels,
)


def _np_tree(tree):
    return {p: np.array(x) for p, x in zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree))}


def _assert_tree_equal(got, expected: dict):
    got = _np_tree(got)
    assert set(got) == set(expected)
    for p in expected:
        np.testing.assert_array_equal(got[p], expected[p], err_msg=str(p))


def _hand_masked_resnet20_scatter(variables, masks):
    """ResNet-20 masking under 'scatter', written per layer from the architecture."""
    v = _np_tree(variables)

    def zero_bn(prefix, j):
        for coll, leaf in (("params", "scale"), ("params", "bias"),
                           ("batch_stats", "mean"), ("batch_stats", "var")):
            v[(coll,) + prefix + (leaf,)][j] = 0.0

    def pruned(name):
        return np.flatnonzero(np.asarray(masks[name]) == 0)

    j = pruned("stem")
    v[("params", "stem", "kernel")][..., j] = 0.0
    zero_bn(("stem_bn",), j)
    v[("params", "layer1_0", "conv1", "kernel")][:, :, j, :] = 0.0
    for s in (1, 2, 3):
        for b in range(3):
            blk = f"layer{s}_{b}"
            j = pruned(f"{blk}/conv1")
            v[("params", blk, "conv1", "kernel")][..., j] = 0.0
            zero_bn((blk, "bn1"), j)
            v[("params", blk, "conv2", "kernel")][:, :, j, :] = 0.0
            j = pruned(f"{blk}/conv2")
            v[("params", blk, "conv2", "kernel")][..., j] = 0.0
            zero_bn((blk, "bn2"), j)
    return v


def test_apply_masks_equals_hand_masking_resnet20_scatter(resnet20, resnet20_graphs):
    _, variables, _ = resnet20
    g = resnet20_graphs["scatter"]
    masks = random_masks(g, seed=1)
    expected = _hand_masked_resnet20_scatter(variables, masks)
    _assert_tree_equal(jax.jit(lambda v, m: apply_masks(v, m, g))(variables, masks), expected)


def test_apply_masks_coupled_reaches_every_stage(resnet20, resnet20_graphs):
    _, variables, _ = resnet20
    g = resnet20_graphs["coupled"]
    masks = init_masks(g)
    masks["stem"] = masks["stem"].at[3].set(0.0)  # stem-stream channel 3
    masks["layer3_0/conv2"] = masks["layer3_0/conv2"].at[20].set(0.0)
    out = _np_tree(jax.jit(lambda v, m: apply_masks(v, m, g))(variables, masks))
    v = _np_tree(variables)
    # stage-1 position 3 == stage-2 position 3 + 8 == stage-3 position 3 + 24 (option-A pad)
    for blk, pos in (("layer1_2", 3), ("layer2_1", 11), ("layer3_2", 27)):
        assert not out[("params", blk, "conv2", "kernel")][..., pos].any()
        assert out[("params", blk, "bn2", "bias")][pos] == 0
        assert out[("batch_stats", blk, "bn2", "var")][pos] == 0
        assert not out[("params", blk, "conv1", "kernel")][:, :, pos, :].any()
    assert not out[("params", "stem", "kernel")][..., 3].any()
    # layer3_0/conv2 group channel 20: its sorted positions are 0..15, 48..63 -> 52
    assert not out[("params", "fc", "kernel")][52].any()
    assert not out[("params", "fc", "kernel")][27].any()
    # the other fc rows are untouched
    k = out[("params", "fc", "kernel")].copy()
    k[[27, 52]] = v[("params", "fc", "kernel")][[27, 52]]
    np.testing.assert_array_equal(k, v[("params", "fc", "kernel")])
    # and it matches the member-by-member numpy reference everywhere
    ref = _np_tree(np_apply_masks(variables, masks, g))
    for p in ref:
        np.testing.assert_array_equal(out[p], ref[p], err_msg=str(p))


class _Concat(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.Conv(3, (3, 3), name="a")(x)
        b = nn.Conv(2, (3, 3), name="b")(x)
        y = nn.relu(jnp.concatenate([a, b], -1))
        y = nn.Conv(5, (3, 3), feature_group_count=5, name="dw")(y)
        return nn.Conv(2, (1, 1), name="out")(nn.relu(y))


def test_apply_masks_soft_values_and_roles_on_shared_axes():
    # dw's kernel axis 3 and out's axis 2 hold two groups each (a's then b's channels)
    m = _Concat()
    x = jnp.zeros((1, 5, 5, 2))
    variables = random_variables(m, x)
    g = trace_linen(m, variables, x)
    assert list(g.groups) == ["a", "b"]
    masks = {"a": jnp.asarray([1.0, 0.0, 0.5]), "b": jnp.asarray([0.25, 1.0])}
    v = _np_tree(variables)
    out = _np_tree(jax.jit(lambda v, m: apply_masks(v, m, g))(variables, masks))
    mult = np.array([1.0, 0.0, 0.5, 0.25, 1.0])  # concat order: a's 3 then b's 2
    dw = v[("params", "dw", "kernel")]
    np.testing.assert_allclose(out[("params", "a", "kernel")],
                               v[("params", "a", "kernel")] * mult[:3])
    np.testing.assert_allclose(out[("params", "a", "bias")], v[("params", "a", "bias")] * mult[:3])
    np.testing.assert_allclose(out[("params", "b", "kernel")],
                               v[("params", "b", "kernel")] * mult[3:])
    np.testing.assert_allclose(out[("params", "dw", "kernel")], dw * mult)
    np.testing.assert_allclose(out[("params", "dw", "bias")], v[("params", "dw", "bias")] * mult)
    np.testing.assert_allclose(out[("params", "out", "kernel")],
                               v[("params", "out", "kernel")] * mult[:, None])
    np.testing.assert_array_equal(out[("params", "out", "bias")], v[("params", "out", "bias")])
    # roles={'out'}: only the filters (SFP's official masking), not biases nor consumers
    only = _np_tree(jax.jit(lambda v, m: apply_masks(v, m, g, roles={"out"}))(variables, masks))
    np.testing.assert_allclose(only[("params", "dw", "kernel")], dw * mult)
    np.testing.assert_array_equal(only[("params", "a", "bias")], v[("params", "a", "bias")])
    np.testing.assert_array_equal(only[("params", "out", "kernel")], v[("params", "out", "kernel")])
    # a params sub-tree with prefix
    sub = jax.jit(lambda v, m: apply_masks(v, m, g, prefix=("params",)))(variables["params"], masks)
    np.testing.assert_allclose(np.asarray(sub["dw"]["kernel"]), dw * mult)


def test_validate_masks_names_the_problem(resnet20_graphs):
    g = resnet20_graphs["scatter"]
    masks = init_masks(g)
    assert {n: m.shape for n, m in masks.items()} == {n: (s,) for n, s in g.group_sizes().items()}
    assert all(bool((m == 1).all()) for m in masks.values())
    validate_masks(masks, g)
    bad = dict(masks, nonsense=jnp.ones(3))
    with pytest.raises(ValueError, match="unknown groups \\['nonsense'\\]"):
        validate_masks(bad, g)
    missing = {n: m for n, m in masks.items() if n != "layer2_1/conv1"}
    with pytest.raises(ValueError, match="missing groups \\['layer2_1/conv1'\\]"):
        validate_masks(missing, g)
    wrong = dict(masks)
    wrong["layer3_0/conv1"] = jnp.ones(63)
    msg = "'layer3_0/conv1' has shape \\(63,\\); expected \\(64,\\)"
    with pytest.raises(ValueError, match=msg):
        validate_masks(wrong, g)
    with pytest.raises(ValueError, match="unknown groups"):
        apply_masks({}, bad, g)


def test_changing_mask_values_does_not_recompile(resnet20, resnet20_graphs):
    _, variables, _ = resnet20
    g = resnet20_graphs["coupled"]
    traces = []

    @jax.jit
    def f(params, masks):
        traces.append(1)  # runs once per trace (compilation)
        return apply_masks(params, masks, g, prefix=("params",))

    params = variables["params"]
    outs = [f(params, random_masks(g, seed=s)) for s in range(3)]
    outs.append(f(params, {n: m * 0.5 for n, m in init_masks(g).items()}))
    assert len(traces) == 1
    assert f._cache_size() == 1
    assert not np.array_equal(np.asarray(outs[0]["stem"]["kernel"]),
                              np.asarray(outs[1]["stem"]["kernel"]))


def test_keep_indices_and_binarize():
    masks = {"a": jnp.asarray([1.0, 0.0, 0.3, 0.0]), "b": jnp.asarray([0.0, 0.0])}
    keep = keep_indices(masks)
    np.testing.assert_array_equal(keep["a"], [0, 2])
    assert keep["b"].size == 0 and isinstance(keep["a"], np.ndarray)
    bin_ = binarize(masks)
    np.testing.assert_array_equal(np.asarray(bin_["a"]), [1.0, 0.0, 1.0, 0.0])
    assert bin_["a"].dtype == jnp.float32


# ----------------------------------------------------------------------------- optimizer


@pytest.fixture(scope="module")
def chain_setup(resnet20, resnet20_graphs):
    _, variables, _ = resnet20
    g = resnet20_graphs["scatter"]
    masks = random_masks(g, seed=7)
    params = np_apply_masks(variables["params"], masks, g, prefix=("params",))
    return g, masks, params


def _pruned_slices(params, masks, g):
    """(path, axis, positions) of every pruned slice of a params tree."""
    out = []
    for name, grp in g.groups.items():
        dead = np.flatnonzero(np.asarray(masks[name]) == 0)
        for mem in grp.members:
            if mem.path[0] == "params" and dead.size:
                out.append((mem.path[1:], mem.axis, mem.index[dead].ravel()))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam"])
def test_mask_optimizer_state_masks_moments(chain_setup, opt):
    g, masks, params = chain_setup
    tx = optax.sgd(0.1, momentum=0.9) if opt == "sgd_momentum" else optax.adam(1e-3)
    grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p), params)

    @jax.jit
    def run(params, grads, masks):
        _, state = tx.update(grads, tx.init(params), params)  # moments nonzero everywhere
        return state, mask_optimizer_state(state, masks, g)

    state, masked = run(params, grads, masks)
    moments = [masked[0].trace] if opt == "sgd_momentum" else [masked[0].mu, masked[0].nu]
    before = [state[0].trace] if opt == "sgd_momentum" else [state[0].mu, state[0].nu]
    for mom, orig in zip(moments, before):
        ref = np_apply_masks(orig, masks, g, prefix=("params",))
        for p, a, b in zip(leaf_paths(mom), jax.tree_util.tree_leaves(mom),
                           jax.tree_util.tree_leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
        for path, axis, pos in _pruned_slices(params, masks, g):
            assert not np.take(_get(mom, path), pos, axis=axis).any()
        # kept channels keep their moments (nonzero: the gradient was all ones)
        assert np.asarray(mom["fc"]["bias"]).all()
    if opt == "adam":
        assert int(masked[0].count) == int(state[0].count) == 1


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_hard_masked_keeps_pruned_channels_and_their_moments_exactly_zero(chain_setup, opt):
    """Wrapping the user's whole optimizer: once hard-pruned, channels stay exactly zero under
    the momentum they had built up and weight decay, their moments are zeroed, and kept
    channels move exactly as under the plain optimizer (element-wise rules)."""
    g, masks, params = chain_setup
    inner = (optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))
             if opt == "sgd" else optax.adamw(1e-2, weight_decay=1e-4))
    tx = hard_masked(inner, g)
    state, plain_state = tx.init(params), inner.init(params)

    @jax.jit
    def step(params, state, plain, plain_state, grads, masks):
        updates, state = tx.update(grads, state, params, masks=masks)
        pu, plain_state = inner.update(grads, plain_state, plain)
        return (optax.apply_updates(params, updates), state, optax.apply_updates(plain, pu),
                plain_state)

    rng = np.random.default_rng(0)
    ones = {n: jnp.ones_like(m) for n, m in masks.items()}
    p, plain = params, params
    for k in range(5):  # 2 steps with nothing pruned build up moments, then hard masks
        if k == 2:
            p = apply_masks(p, masks, g, prefix=("params",))
        grads = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), p)  # nonzero everywhere
        p, state, plain, plain_state = step(p, state, plain, plain_state, grads,
                                            ones if k < 2 else masks)
    for path, axis, pos in _pruned_slices(params, masks, g):
        assert not np.take(_get(p, path), pos, axis=axis).any(), path
        mom = optax.tree_utils.tree_get(state.inner, "trace" if opt == "sgd" else "mu")
        assert not np.take(_get(mom, path), pos, axis=axis).any(), path
    # the kept slices moved, exactly as under the plain optimizer
    keep = np_apply_masks(jax.tree_util.tree_map(jnp.ones_like, params), masks, g,
                          prefix=("params",))
    for a, b, c, k in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(params),
                          jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(keep)):
        k = np.asarray(k) != 0
        assert (np.asarray(a)[k] != np.asarray(b)[k]).all()
        np.testing.assert_allclose(np.asarray(a)[k], np.asarray(c)[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="masks="):
        hard_masked(inner, g).update(params, tx.init(params), params)


def test_zero_channels_equals_hand_zeroing_resnet20_scatter(resnet20, resnet20_graphs):
    """Every member slice of the hard channels (filters, BN scale/bias and statistics, the
    consumers' inputs) is zeroed; the rest is untouched; empty collections pass through."""
    _, variables, _ = resnet20
    g = resnet20_graphs["scatter"]
    hard = {n: (np.asarray(m) != 0).astype(np.float32) for n, m in random_masks(g, seed=3).items()}
    assert any(not m.all() for m in hard.values())
    expected = _hand_masked_resnet20_scatter(variables, hard)
    got = jax.jit(lambda v, h: zero_channels(v, h, g))(dict(variables), hard)
    _assert_tree_equal(got, expected)
    out = zero_channels({"params": variables["params"], "batch_stats": {}}, hard, g)
    assert out["batch_stats"] == {}


def test_hard_masked_mask_gradients_decides_what_a_channel_mixing_optimizer_sees(chain_setup):
    """With global-norm clipping the hard channels' gradients count in the norm only when the
    gradients are not masked first (``mask_gradients=False``); updates are masked either way."""
    g, masks, params = chain_setup
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    keep = np_apply_masks(jax.tree_util.tree_map(jnp.ones_like, params), masks, g,
                          prefix=("params",))
    n_all = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    n_kept = sum(int((np.asarray(k) != 0).sum()) for k in jax.tree_util.tree_leaves(keep))
    assert n_kept < n_all
    for flag, count in ((True, n_kept), (False, n_all)):
        tx = hard_masked(inner, g, mask_gradients=flag)
        updates, _ = tx.update(grads, tx.init(params), params, masks=masks)
        for u, k in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(keep)):
            k = np.asarray(k) != 0
            np.testing.assert_allclose(np.asarray(u)[k], -1.0 / np.sqrt(count), rtol=1e-5)
            assert not np.asarray(u)[~k].any()
