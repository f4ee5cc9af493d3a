"""Compaction: the physically smaller model computes exactly what the masked model computes."""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from conftest import np_apply_masks, random_masks, random_variables, rel_err
from jaxprune import flops
from jaxprune.compaction import (
    axis_keep_from_json,
    axis_keep_to_json,
    compact,
    compact_variables,
    slice_tree,
    surgery,
)
from jaxprune.graph import leaf_paths, trace, trace_linen
from jaxprune.masks import hard_masked
from jaxprune.models import (
    MODEL_NAMES,
    CifarResNet,
    SmallNNXCNN,
    get_model,
    model_config,
    model_from_config,
)

SLOW = {"resnet32", "resnet44", "resnet56", "resnet110", "resnet101", "resnet152", "vgg11", "vgg13",
        "vgg19"}  # depth variants of the families tested by default; run with -m slow
NO_ADD = {"vgg11", "vgg13", "vgg16", "vgg19", "densenet_tiny"}  # no residual add: one policy


pytestmark = pytest.mark.usefixtures("fast_compiles")


@functools.lru_cache(maxsize=None)
def _setup(name: str):
    """(model, variables, x, jitted eval forward) with 32x32 inputs, batch 2."""
    model = get_model(name)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x, seed=abs(hash(name)) % 1000)
    forward = jax.jit(lambda v, a: model.apply(v, a, train=False))
    return model, variables, x, forward


def _removed(masks, graph):
    """(leaf path, axis) -> positions of pruned channels, from the group members."""
    removed: dict = {}
    for name, g in graph.groups.items():
        dead = np.flatnonzero(np.asarray(masks[name]) == 0)
        for m in g.members:
            removed.setdefault((m.path, m.axis), set()).update(m.index[dead].ravel().tolist())
    return removed


def _expected_shapes(variables, masks, graph):
    """Leaf path -> shape after removing every position of a pruned channel."""
    removed = _removed(masks, graph)
    out = {}
    for path, leaf in zip(leaf_paths(variables), jax.tree_util.tree_leaves(variables)):
        shape = list(np.shape(leaf))
        for ax in range(len(shape)):
            shape[ax] -= len(removed.get((path, ax), ()))
        out[path] = tuple(shape)
    return out


def _expected_keep(variables, masks, graph, role):
    """Module path -> kept original positions of its 'out' (or 'in') kernel axis."""
    removed = _removed(masks, graph)
    shapes = dict(zip(leaf_paths(variables), map(np.shape, jax.tree_util.tree_leaves(variables))))
    out = {}
    for g in graph.groups.values():
        for m in g.members:
            if m.role == role:
                dead = removed[(m.path, m.axis)]
                out[m.module] = tuple(i for i in range(shapes[m.path][m.axis]) if i not in dead)
    return out


def _cases():
    for name in MODEL_NAMES:
        marks = [pytest.mark.slow] if name in SLOW else []
        for pol in ("scatter", "coupled"):
            if name in NO_ADD and pol == "coupled":
                continue  # identical graph, checked in test_policies_agree_without_adds
            yield pytest.param(name, pol, marks=marks, id=f"{name}-{pol}")


@pytest.mark.parametrize("name,policy", list(_cases()))
def test_compact_equals_masked_model(name, policy):
    model, variables, x, forward = _setup(name)
    g = trace_linen(model, variables, x, residual=policy)
    masks = random_masks(g, seed=len(name) + (policy == "coupled"))
    ref = forward(np_apply_masks(variables, masks, g), x)

    res = compact(model, variables, masks, g)
    out = jax.jit(lambda v, a: res.model.apply(v, a, train=False))(res.variables, x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
    np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(ref, -1))

    # every leaf lost exactly the positions of its pruned channels
    got = {p: tuple(np.shape(v)) for p, v in zip(leaf_paths(res.variables),
                                                 jax.tree_util.tree_leaves(res.variables))}
    assert got == _expected_shapes(variables, masks, g)
    # keep_out / keep_in: the surviving original positions of each kernel's out / in axis
    # (under 'coupled' a conv2's filters belong to several groups: the union is kept)
    assert res.keep_out == _expected_keep(variables, masks, g, "out")
    assert res.keep_in == _expected_keep(variables, masks, g, "in")

    # the exact count under masks is the count of the compacted model, re-traced
    g2 = trace_linen(res.model, res.variables, x, residual=policy)
    assert g2.group_sizes() == {n: int(np.sum(np.asarray(m) != 0)) for n, m in masks.items()}
    for conv in flops.CONVENTIONS:
        a, b = flops.count(g, masks, convention=conv), flops.count(g2, convention=conv)
        assert (a.macs, a.params) == (b.macs, b.params), conv
        assert a.per_layer == b.per_layer


@pytest.mark.parametrize("name", sorted(NO_ADD - SLOW))
def test_policies_agree_without_adds(name):
    model, variables, x, _ = _setup(name)
    a = trace_linen(model, variables, x, residual="scatter")
    b = trace_linen(model, variables, x, residual="coupled")
    assert a.group_sizes() == b.group_sizes()
    for n in a.groups:
        assert [(m.path, m.axis, m.role, m.index.tolist()) for m in a.groups[n].members] == \
               [(m.path, m.axis, m.role, m.index.tolist()) for m in b.groups[n].members]


# ----------------------------------------------------------------------------- surgery replay


def test_compacting_twice_composes_original_indices(resnet20, resnet20_graphs):
    model, variables, x = resnet20
    for policy in ("scatter", "coupled"):
        g = resnet20_graphs[policy]
        m1 = random_masks(g, seed=3)
        r1 = compact(model, variables, m1, g)
        g2 = trace_linen(r1.model, r1.variables, x, residual=policy)
        m2 = random_masks(g2, seed=4)
        r2 = compact(r1.model, r1.variables, m2, g2)
        both = {}
        for n, m in m1.items():  # channel c of g2's group n is g's kept channel c
            kept1 = np.flatnonzero(np.asarray(m))
            v = np.zeros(g.groups[n].size, np.float32)
            v[kept1[np.asarray(m2[n]) != 0]] = 1.0
            both[n] = v
        once = compact(model, variables, both, g)
        assert r2.keep_out == once.keep_out and r2.keep_in == once.keep_in
        assert r2.model == once.model
        for a, b in zip(jax.tree_util.tree_leaves(r2.variables),
                        jax.tree_util.tree_leaves(once.variables)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("value", [0.5, 2.0, float("nan")])
def test_compact_refuses_non_binary_masks(resnet20, resnet20_graphs, value):
    """A decayed, out-of-range or NaN mask value would give a compact model that differs from
    the masked one: compact refuses it, naming the group, the channel and the value."""
    model, variables, x = resnet20
    g = resnet20_graphs["scatter"]
    masks = random_masks(g, seed=5)
    name = sorted(masks)[2]
    masks[name] = masks[name].at[3].set(value)
    with pytest.raises(ValueError, match=rf"compact's masks: group '{name}' channel 3 has mask value "
                                         rf"{value!r}".replace("(", r"\(").replace(")", r"\)")):
        compact(model, variables, masks, g)


def test_keep_indices_replay_on_a_fresh_model(resnet20, resnet20_graphs):
    model, variables, x = resnet20
    g = resnet20_graphs["scatter"]
    masks = random_masks(g, seed=11)
    res = compact(model, variables, masks, g)
    axis_keep, keep_out, keep_in = surgery(masks, g)
    assert (keep_out, keep_in) == (res.keep_out, res.keep_in)

    # rebuild from JSON only: the model config and the recorded surgery
    cfg = json.loads(json.dumps(model_config(res.model)))
    rebuilt = model_from_config(cfg)
    assert rebuilt == res.model
    recorded = axis_keep_from_json(json.loads(json.dumps(axis_keep_to_json(res.axis_keep))))
    assert {p: {a: i.tolist() for a, i in v.items()} for p, v in recorded.items()} == \
           {p: {a: i.tolist() for a, i in v.items()} for p, v in res.axis_keep.items()}

    fresh = random_variables(model, x, seed=99)  # a freshly initialised dense model
    sliced = slice_tree(fresh, recorded)
    shapes = jax.eval_shape(lambda: rebuilt.init(jax.random.PRNGKey(0), x[:1]))
    assert jax.tree_util.tree_structure(sliced) == jax.tree_util.tree_structure(shapes)
    for a, b in zip(jax.tree_util.tree_leaves(sliced), jax.tree_util.tree_leaves(shapes)):
        assert a.shape == b.shape
    # the replayed surgery on the fresh weights is the masked fresh model
    out = jax.jit(lambda v, a: rebuilt.apply(v, a))(sliced, x)
    ref = jax.jit(lambda v, a: model.apply(v, a))(np_apply_masks(fresh, masks, g), x)
    assert rel_err(out, ref) <= 1e-5
    # compact_variables is the model-independent half of compact
    cv, ak = compact_variables(fresh, masks, g)
    for a, b in zip(jax.tree_util.tree_leaves(cv), jax.tree_util.tree_leaves(sliced)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ak.keys() == res.axis_keep.keys()


# ------------------------------------------------------------- carried BN constants (SFP)

def _filters_only(variables, masks, graph):
    """SFP's official final model (numpy, member by member): only the filters (role 'out'
    slices) of the pruned channels are zero; their BN and the consumers' input slices stay."""
    leaves = jax.tree_util.tree_leaves(variables)
    flat = {p: np.array(leaf) for p, leaf in zip(leaf_paths(variables), leaves)}
    for name, g in graph.groups.items():
        dead = np.flatnonzero(np.asarray(masks[name]) == 0)
        for m in g.members:
            if m.role == "out" and m.path in flat:
                np.moveaxis(flat[m.path], m.axis, 0)[m.index[dead].ravel()] = 0.0
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(variables),
                                        [jnp.asarray(flat[p]) for p in leaf_paths(variables)])


@pytest.mark.parametrize("name,policy", [("resnet20", "scatter"), ("resnet20", "coupled"),
                                         ("resnet18", "scatter"), ("resnet50", "scatter"),
                                         ("vgg16", "scatter")])
def test_keep_constants_carries_what_the_removed_channels_emit(name, policy):
    """Removed channels whose filters alone were zeroed still emit their BN constants (SFP's
    official final model): the compact model carries them (bias maps at the consumer convs,
    constants at the reindexed add operands) and equals that model, on an input it was not
    built from; without them it does not."""
    model, variables, x, forward = _setup(name)
    g = trace_linen(model, variables, x, residual=policy)
    masks = random_masks(g, seed=7)
    x_new = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    ref = forward(_filters_only(variables, masks, g), x_new)

    res = compact(model, variables, masks, g, keep_constants=True, sample_input=x)
    out = jax.jit(lambda v, a: res.model.apply(v, a, train=False))(res.variables, x_new)
    assert rel_err(out, ref) <= 1e-5
    assert jax.tree_util.tree_leaves(res.variables["carry"])
    plain = compact(model, variables, masks, g)
    assert rel_err(plain.model.apply(plain.variables, x_new), ref) > 1e-2  # the constants matter
    # a model whose removed channels are zero everywhere has nothing to carry
    zero = compact(model, np_apply_masks(variables, masks, g), masks, g, keep_constants=True,
                   sample_input=x)
    assert "carry" not in zero.variables


def test_keep_constants_of_a_bfloat16_model_are_computed_in_float32():
    """The carried constants are weights: a bf16-compute model carries the float32 constants
    (bf16-rounded ones put its compact model ~1e-2 off the masked one, which flipped test
    predictions of SFP's ResNet-56), so the float32 compact model equals the float32 masked one."""
    model, variables, x, _ = _setup("resnet20")
    g = trace_linen(model, variables, x, residual="scatter")
    masks = random_masks(g, seed=7)
    want = compact(model, variables, masks, g, keep_constants=True, sample_input=x)
    got = compact(model.clone(dtype=jnp.bfloat16), variables, masks, g, keep_constants=True,
                  sample_input=x)
    chex.assert_trees_all_equal(got.variables["carry"], want.variables["carry"])
    ref = model.apply(_filters_only(variables, masks, g), x)
    out = got.model.clone(dtype=jnp.float32).apply(got.variables, x)
    assert rel_err(out, ref) <= 1e-5


def test_keep_constants_refuses_what_it_cannot_carry():
    model, variables, x, _ = _setup("resnet20")
    g = trace_linen(model, variables, x, residual="scatter")
    masks = random_masks(g, seed=7)
    with pytest.raises(ValueError, match="needs sample_input="):
        compact(model, variables, masks, g, keep_constants=True)
    small = compact(model, variables, masks, g)
    g2 = trace_linen(small.model, small.variables, x, residual="scatter")
    with pytest.raises(ValueError, match="already compact"):
        compact(small.model, small.variables, random_masks(g2), g2, keep_constants=True, sample_input=x)
    # MobileNetV2 has no `carried` hook at its depthwise convs: refused, never silently wrong
    model, variables, x, _ = _setup("mobilenetv2_tiny")
    g = trace_linen(model, variables, x, residual="scatter")
    with pytest.raises(ValueError, match="no `carried` hook"):
        compact(model, variables, random_masks(g, seed=3), g, keep_constants=True, sample_input=x)


def test_carried_constants_survive_save_and_load(tmp_path):
    import jaxprune
    from jaxprune.artifact import save_compact

    model, variables, x, forward = _setup("resnet20")
    g = trace_linen(model, variables, x, residual="scatter")
    masks = random_masks(g, seed=7)
    res = compact(model, variables, masks, g, keep_constants=True, sample_input=x)
    path = save_compact(tmp_path / "m", res.model, res.variables, {}, input_shape=(32, 32, 3))
    loaded, got, _ = jaxprune.load(path)
    want = res.model.apply(res.variables, x)
    np.testing.assert_array_equal(np.asarray(loaded.apply(got, x)), np.asarray(want))


# ----------------------------------------------------------------------------- fine-tuning


def test_sliced_optimizer_state_fine_tunes_like_the_masked_model():
    """One SGD-Nesterov step of the compact model == one hard-masked step, on kept slices.

    ResNet-8 (one block per stage: option-A shortcuts, scatter adds) keeps the two train-step
    compiles short.
    """
    model = CifarResNet(depth=8)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = random_variables(model, x, seed=8)
    g = trace_linen(model, variables, x, residual="scatter")
    masks = random_masks(g, seed=21)
    labels = jnp.asarray([3, 7])
    start = np_apply_masks(variables, masks, g)

    def make_step(mdl, tx):
        def loss_fn(params, batch_stats):
            logits, upd = mdl.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

        @jax.jit
        def step(params, batch_stats, state):
            (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
            updates, state = tx.update(grads, state, params, masks=masks)
            return optax.apply_updates(params, updates), upd["batch_stats"], state

        return step

    base = [optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)]
    tx_masked = hard_masked(optax.chain(*base), g)
    step_m = make_step(model, tx_masked)
    p, bs, st = start["params"], start["batch_stats"], jax.jit(tx_masked.init)(start["params"])
    for _ in range(2):  # build up momentum, the hard mask keeps pruned slices at 0
        p, bs, st = step_m(p, bs, st)

    res = compact(model, {"params": p, "batch_stats": bs}, masks, g)
    tx_c = optax.chain(*base)  # the compact model needs no mask
    st_c = slice_tree(st.inner, res.axis_keep, match_suffix=True)
    fresh = jax.eval_shape(tx_c.init, res.variables["params"])
    assert jax.tree_util.tree_structure(st_c) == jax.tree_util.tree_structure(fresh)
    for a, b in zip(jax.tree_util.tree_leaves(st_c), jax.tree_util.tree_leaves(fresh)):
        assert a.shape == b.shape
    step_c = make_step(res.model, tx_c)
    pc, bsc, st_c = step_c(res.variables["params"], res.variables["batch_stats"], st_c)
    p, bs, st = step_m(p, bs, st)

    expect = slice_tree({"params": p, "batch_stats": bs}, res.axis_keep)
    for a, b in zip(jax.tree_util.tree_leaves({"params": pc, "batch_stats": bsc}),
                    jax.tree_util.tree_leaves(expect)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    mom = slice_tree(st[:2], res.axis_keep, match_suffix=True)
    for a, b in zip(jax.tree_util.tree_leaves(st_c), jax.tree_util.tree_leaves(mom)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- NNX


def test_nnx_compaction_via_split_merge():
    """NNX models have no keep contract: surgery + slice_tree + the model's width argument."""
    model = nnx.eval_shape(lambda: SmallNNXCNN(rngs=nnx.Rngs(0), features=(8, 12)))
    graphdef, state = nnx.split(model)  # abstract: filled with numpy values below
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    state = random_variables_like(state)
    g = trace(lambda st, a: nnx.merge(graphdef, st)(a), state, x)
    masks = random_masks(g, seed=5)

    compact_state, axis_keep = compact_variables(state, masks, g)
    _, keep_out, _ = surgery(masks, g)
    small = nnx.eval_shape(lambda: SmallNNXCNN(rngs=nnx.Rngs(1), features=(8, 12),
                                               keep_out=keep_out))
    small_def, small_state = nnx.split(small)
    assert jax.tree_util.tree_structure(small_state) == jax.tree_util.tree_structure(compact_state)
    for a, b in zip(jax.tree_util.tree_leaves(small_state),
                    jax.tree_util.tree_leaves(compact_state)):
        assert a.shape == b.shape

    run = lambda d: jax.jit(lambda st, a: nnx.merge(d, st)(a))  # noqa: E731
    out = run(small_def)(compact_state, x)
    ref = run(graphdef)(np_apply_masks(state, masks, g), x)
    assert rel_err(out, ref) <= 1e-5
    g2 = trace(lambda st, a: nnx.merge(small_def, st)(a), compact_state, x)
    assert flops.count(g2).macs == flops.count(g, masks).macs
    assert flops.count(g2).params == flops.count(g, masks).params


def random_variables_like(tree, seed: int = 0):
    """``tree`` with every leaf replaced by numpy random values (BN var positive)."""
    rng = np.random.default_rng(seed)
    leaves = []
    for path, leaf in zip(leaf_paths(tree), jax.tree_util.tree_leaves(tree)):
        if path[-1] == "var":
            v = rng.uniform(0.5, 2.0, size=leaf.shape)
        elif path[-1] == "scale":
            v = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            v = rng.normal(size=leaf.shape) * (0.3 if path[-1] == "kernel" else 0.2)
        leaves.append(jnp.asarray(v, leaf.dtype))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def test_slice_tree_host_jit_and_suffix_paths():
    kernel = jnp.arange(24.0).reshape(2, 3, 4)
    cut = {("params", "a", "kernel"): {2: np.array([0, 3]), 1: np.array([2])}}
    expected = np.asarray(kernel)[:, [2]][:, :, [0, 3]]
    tree = {"params": {"a": {"kernel": kernel}, "b": {"kernel": kernel}}}
    for got in (slice_tree(tree, cut), jax.jit(lambda t: slice_tree(t, cut))(tree),
                slice_tree(jax.tree_util.tree_map(np.asarray, tree), cut)):
        assert isinstance(got["params"]["a"]["kernel"], jax.Array)
        np.testing.assert_array_equal(np.asarray(got["params"]["a"]["kernel"]), expected)
        np.testing.assert_array_equal(np.asarray(got["params"]["b"]["kernel"]), kernel)
    # an optax-like state nests params-shaped trees: matched by path suffix
    state = (optax.EmptyState(), optax.TraceState(trace=tree["params"]))
    got = slice_tree(state, cut, match_suffix=True)
    np.testing.assert_array_equal(np.asarray(got[1].trace["a"]["kernel"]), expected)
    assert slice_tree(state, cut)[1].trace["a"]["kernel"].shape == (2, 3, 4)  # no suffix match


@pytest.mark.parametrize("path", ["compact_bundled", "compact_traced"])
def test_compaction_computes_at_full_float32_precision(monkeypatch, path):
    """On a GPU, float32 convolutions default to TF32 (~1e-3 relative error), which once failed
    the carried-constants check of an SFP ResNet-20 (error 0.0045 against a 1e-4 tolerance).
    Both compaction paths run under ``default_matmul_precision('highest')``, whatever the
    caller set, and the caller's setting is back afterwards."""
    import jaxprune.compaction.model as cm

    seen = []
    original = getattr(cm, path)

    def recording(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return original(*args, **kwargs)

    monkeypatch.setattr(cm, path, recording)
    if path == "compact_bundled":
        model, variables, x, _ = _setup("resnet20")
    else:  # any other Linen module: its traced program is compacted
        model = _TwoConvs()
        x = jnp.ones((2, 8, 8, 3))
        variables = model.init(jax.random.PRNGKey(0), x)
    graph = trace_linen(model, variables, x)
    masks = random_masks(graph, seed=3)
    with jax.default_matmul_precision("bfloat16"):
        compact(model, variables, masks, graph, sample_input=x)
        assert jax.config.jax_default_matmul_precision == "bfloat16"
    assert seen == ["highest"]


class _TwoConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3))(nn.relu(nn.Conv(6, (3, 3))(x)))
