"""Pruning methods step by step against hand-computed expectations (numpy, float64).

Small models only: a two-conv Flax net (10 and 8 filters, 6x6 inputs) for the mask semantics,
ResNet-20 at 8x8 inputs for residual groups, compaction and HFP's targets.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import compaction, flops
from jaxprune import train_step as ts
from jaxprune.graph import trace_linen
from jaxprune.masks import HardMaskedState, apply_masks, hard_masked, init_masks
from jaxprune.methods import (GHFP, FixedMasks, HFP, METHODS, PFEC, SFP, Dense, PFECConfig,
                              get_method, pfec_masks)
from jaxprune.models import get_model
from jaxprune.pruner import MaskState, zero_count
from jaxprune.train_step import TrainState

P = 0.3
SIZES = {"conv1": 10, "conv2": 8}


class TwoConv(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for name, width in SIZES.items():
            x = nn.Conv(width, (3, 3), use_bias=False, name=name)(x)
            x = nn.BatchNorm(use_running_average=not train, name="bn" + name[-1])(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3, name="fc")(x)


def random_variables(model, x, seed=0):
    """Variables of ``model`` filled on the host (numpy): no XLA compilation for an init.

    Kernels ~ He-normal, BN scale 1 / bias 0 / mean 0 / var 1, other params small normal.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(spec.shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), spec.shape), jnp.float32)
        if name in ("scale", "var"):
            return jnp.ones(spec.shape, jnp.float32)
        if name in ("mean",):
            return jnp.zeros(spec.shape, jnp.float32)
        return jnp.asarray(rng.normal(0, 0.01, spec.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = TwoConv()
    x = jnp.ones((1, 6, 6, 2))
    variables = random_variables(model, x)
    # Distinct BN scales/biases so that masking them is visible; positive biases keep the
    # ReLU after a zeroed filter alive, so gradients reach it (a negative BN bias would not).
    params = dict(variables["params"])
    for bn in ("bn1", "bn2"):
        c = params[bn]["scale"].shape[0]
        params[bn] = {"scale": jnp.asarray(np.linspace(0.5, 1.5, c), jnp.float32),
                      "bias": jnp.asarray(np.linspace(0.05, 0.3, c), jnp.float32)}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    graph = trace_linen(model, variables, x)
    assert set(graph.groups) == set(SIZES)
    return model, variables, graph


def make_state(variables, graph, momentum=0.9):
    opt = optax.sgd(0.05, momentum=momentum)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=opt.init(variables["params"]),
                      prune=MaskState(init_masks(graph), init_masks(graph), zero_count()),
                      rng=jnp.zeros((2,), jnp.uint32))


class Ctx(NamedTuple):
    """What a test builds a method's pruner with."""

    graph: Any
    total_epochs: int
    steps_per_epoch: int = 1


def pruner_of(method, ctx):
    return method.pruner(ctx.graph, ctx.total_epochs, ctx.steps_per_epoch)


def init(method, state, ctx):
    """The train state after the method's pruner's ``init``."""
    return ts.prune_init(pruner_of(method, ctx), state)


def end_of_epoch(method, state, epoch, ctx):
    """The train state after the pruner's ``update`` at the end of epoch ``epoch`` (the
    state's count set to it; ``epoch`` may be traced)."""
    state = state.replace(prune=state.prune._replace(count=epoch))
    return ts.prune_update(pruner_of(method, ctx), state)


def finalize(method, state, ctx):
    """The train state after the pruner's ``finalize``."""
    return ts.prune_finalize(pruner_of(method, ctx), state)


def leaf_at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def assert_pruned_slices_zero(params, masks, graph):
    """Every param member slice (filters, BN entries, consumers' inputs) of a 0 channel is 0."""
    checked = 0
    for name, g in graph.groups.items():
        pruned = np.flatnonzero(np.asarray(masks[name]) == 0)
        for m in g.members:
            if m.path[0] != "params" or not len(pruned):
                continue
            leaf = np.asarray(leaf_at(params, m.path[1:]))
            assert np.all(np.take(leaf, m.index[pruned].reshape(-1), axis=m.axis) == 0), m.path
            checked += 1
    assert checked > 0


def assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def hard_masked_moments(state, graph):
    """The momentum after one `hard_masked` SGD update (zero gradients) with ``state.hard``."""
    tx = hard_masked(optax.sgd(0.05, momentum=0.9), graph)
    grads = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    _, out = tx.update(grads, HardMaskedState(state.opt_state), state.params, masks=state.hard)
    return out.inner[0].trace


def kernel(state, name):
    return np.asarray(state.params[name]["kernel"], np.float64)


def l2(state, name):
    k = kernel(state, name)
    return np.sqrt((k.reshape(-1, k.shape[-1]) ** 2).sum(0))


def lowest(score, n):
    return set(np.argsort(score, kind="stable")[:n].tolist())


def zeros_of(mask):
    return set(np.flatnonzero(np.asarray(mask) == 0).tolist())


def perturb(state, seed, scale=0.5):
    """A stand-in for an epoch of training: every conv kernel moves (host noise)."""
    rng = np.random.default_rng(seed)
    params = dict(state.params)
    for name in SIZES:
        k = np.asarray(params[name]["kernel"])
        noise = rng.normal(0, 1, k.shape) * scale * k.std()
        params[name] = {"kernel": jnp.asarray(k + noise, jnp.float32)}
    return state.replace(params=params)


_STEPS = {}


def sgd_steps(model, state, graph, steps=3, lr=0.05, seed=0):
    """Plain local SGD with UNMASKED gradients except on hard channels (design.md 7)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(16, 6, 6, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    if (model, graph) not in _STEPS:
        def loss_fn(params, batch_stats):
            logits, new = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        @jax.jit
        def step(params, batch_stats, hard):
            grads, new = jax.grad(loss_fn, has_aux=True)(params, batch_stats)
            grads = apply_masks(grads, hard, graph, prefix=("params",))
            params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
            return apply_masks(params, hard, graph, prefix=("params",)), new["batch_stats"]

        _STEPS[(model, graph)] = step
    step = _STEPS[(model, graph)]
    for _ in range(steps):
        params, batch_stats = step(state.params, state.batch_stats, state.hard)
        state = state.replace(params=params, batch_stats=batch_stats)
    return state


# ----------------------------------------------------------------------------- SFP


def test_sfp_init_prunes_int_np_lowest_l2_and_zeroes_only_filters(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=10)
    state = make_state(variables, graph)
    out = init(SFP(rate=P), state, ctx)
    for name, n in SIZES.items():
        expected = lowest(l2(state, name), int(n * P))
        assert zeros_of(out.masks[name]) == expected
        k = kernel(out, name)
        for j in range(n):
            if j in expected:
                assert np.all(k[..., j] == 0)
            else:
                np.testing.assert_array_equal(k[..., j], kernel(state, name)[..., j])
        np.testing.assert_array_equal(out.hard[name], np.ones(n))
        bn = "bn" + name[-1]  # official code: BN is left alone
        np.testing.assert_array_equal(out.params[bn]["scale"], state.params[bn]["scale"])
    # conv2's input slices are untouched by a soft selection
    assert np.count_nonzero(kernel(out, "conv2")) > 0


def test_sfp_mask_bn_also_zeroes_bn(tiny):
    _, variables, graph = tiny
    state = make_state(variables, graph)
    out = init(SFP(rate=P, mask_bn=True), state, Ctx(graph, 10))
    for name in SIZES:
        pruned = sorted(zeros_of(out.masks[name]))
        bn = out.params["bn" + name[-1]]
        assert np.all(np.asarray(bn["scale"])[pruned] == 0)
        assert np.all(np.asarray(bn["bias"])[pruned] == 0)
        kept = [j for j in range(SIZES[name]) if j not in pruned]
        assert np.all(np.asarray(bn["scale"])[kept] != 0)


def test_sfp_reselects_every_epoch_on_current_weights(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=10)
    method = SFP(rate=P)
    state = init(method, make_state(variables, graph), ctx)
    for epoch in range(4):
        state = perturb(state, epoch)  # pruned filters grow back from zero
        before = {name: l2(state, name) for name in SIZES}
        state = end_of_epoch(method, state, epoch, ctx)
        for name, n in SIZES.items():
            expected = lowest(before[name], int(n * P))
            assert zeros_of(state.masks[name]) == expected, (epoch, name)
            assert all(np.all(kernel(state, name)[..., j] == 0) for j in expected)


def test_sfp_pruned_filters_receive_updates_and_can_return(tiny):
    model, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=10)
    method = SFP(rate=P)
    state = init(method, make_state(variables, graph), ctx)
    pruned = sorted(zeros_of(state.masks["conv1"]))
    trained = sgd_steps(model, state, graph, steps=3)
    k = kernel(trained, "conv1")
    assert all(np.any(k[..., j] != 0) for j in pruned)  # soft: gradients reach them
    # One of them grows large (as training may make it): it escapes the next selection.
    back = pruned[0]
    params = dict(trained.params)
    params["conv1"] = {"kernel": trained.params["conv1"]["kernel"].at[..., back].set(1.0)}
    trained = trained.replace(params=params)
    expected = lowest(l2(trained, "conv1"), int(10 * P))
    after = end_of_epoch(method, trained, 0, ctx)
    assert back not in zeros_of(after.masks["conv1"])
    assert zeros_of(after.masks["conv1"]) == expected


def test_asfp_rate_per_epoch_follows_formula(tiny):
    _, variables, graph = tiny
    total = 16
    ctx = Ctx(graph, total_epochs=total)
    method = get_method("asfp", rate=0.5)
    k = math.log(4.0) / (total / 8)
    state = init(method, make_state(variables, graph), ctx)
    for name in SIZES:
        assert zeros_of(state.masks[name]) == set()  # P_0 = 0
    for epoch in range(total):
        state = end_of_epoch(method, perturb(state, epoch), epoch, ctx)
        # the full rate from the epoch index 0.95 T on (the public ASFP code), else the formula
        rate = 0.5 if epoch >= 0.95 * total else 0.5 * (1.0 - math.exp(-k * (epoch + 1)))
        for name, n in SIZES.items():
            assert len(zeros_of(state.masks[name])) == int(n * rate), (epoch, name)
    # P_t = 0.75 P at t = T / 8
    assert 0.5 * (1 - math.exp(-k * total / 8)) == pytest.approx(0.375)
    final = finalize(method, state, ctx)
    for name, n in SIZES.items():
        assert len(zeros_of(final.masks[name])) == int(n * 0.5)


def test_asfp_reaches_the_full_count_at_95_percent():
    from jaxprune import schedules

    s = schedules.asfp_rate(0.3, 200)
    assert s(190) < 0.3 and s(191) == 0.3 and s(200) == 0.3  # epoch index 190 = 0.95 T
    assert int(10 * s(190)) == 2 and int(10 * s(191)) == 3  # int(N P_t) one short without it
    assert float(jax.jit(s)(jnp.float32(191))) == pytest.approx(0.3)
    assert schedules.asfp_rate(0.3, 200, full_from=None)(200) < 0.3


def test_srfp_decays_selected_filters_then_zeroes(tiny):
    _, variables, graph = tiny
    total = 10
    ctx = Ctx(graph, total_epochs=total)
    method = get_method("srfp", rate=P, alpha0=0.8, decay_rate=0.2, zero_fraction=0.2)
    state = make_state(variables, graph)
    out = init(method, state, ctx)  # t = 0: alpha_0
    expected = lowest(l2(state, "conv1"), 3)
    m = np.asarray(out.masks["conv1"])
    assert set(np.flatnonzero(m != 1).tolist()) == expected
    np.testing.assert_allclose(m[sorted(expected)], 0.8, rtol=1e-6)
    np.testing.assert_allclose(kernel(out, "conv1")[..., sorted(expected)],
                               0.8 * kernel(state, "conv1")[..., sorted(expected)], rtol=1e-5)
    state = out
    for epoch in range(total):
        before = state
        state = end_of_epoch(method, state, epoch, ctx)
        t = epoch + 1
        alpha = 0.0 if t >= total - 2 else 0.8 * math.exp(-0.2 * t)  # last round(0.2 T) = 2
        sel = lowest(l2(before, "conv1"), 3)
        m = np.asarray(state.masks["conv1"])
        np.testing.assert_allclose(m[sorted(sel)], alpha, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(kernel(state, "conv1")[..., sorted(sel)],
                                   alpha * kernel(before, "conv1")[..., sorted(sel)],
                                   rtol=1e-5, atol=1e-7)
        if alpha > 0:
            assert np.all(kernel(state, "conv1")[..., sorted(sel)] != 0)  # decayed, not zeroed
    final = finalize(method, state, ctx)
    assert set(np.unique(np.asarray(final.masks["conv1"])).tolist()) <= {0.0, 1.0}


def test_end_of_epoch_is_jittable_with_traced_epoch(tiny):
    _, variables, graph = tiny
    total = 8
    ctx = Ctx(graph, total_epochs=total)
    for method in (get_method("asfp", rate=0.5), get_method("ghfp", rate=0.5, soft="asfp")):
        state = init(method, make_state(variables, graph), ctx)
        step = jax.jit(lambda s, e, m=method: end_of_epoch(m, s, e, ctx))
        host = traced = state
        for epoch in range(total):
            host = end_of_epoch(method, perturb(host, epoch), epoch, ctx)
            traced = step(perturb(traced, epoch), jnp.int32(epoch))
            for name in SIZES:
                np.testing.assert_allclose(traced.masks[name], host.masks[name], rtol=1e-6)
                np.testing.assert_array_equal(traced.hard[name], host.hard[name])
        assert step._cache_size() == 1  # the counts change, the compilation does not


@pytest.mark.parametrize("final_bn", ["zero", "keep"])
def test_sfp_finalize_is_hard_and_matches_compaction(final_bn):
    """``final_bn='zero'``: every slice of the pruned channels is zero. ``'keep'`` (the official
    code): only their filters are, their BN is the trained one, and the compact model carries
    the BN constants. Either way the compact model equals the masked one."""
    model = get_model("resnet20")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
    variables = random_variables(model, x[:1])
    graph = trace_linen(model, variables, x[:1], residual="scatter")
    ctx = Ctx(graph, total_epochs=2)
    method = SFP(rate=0.4, final_bn=final_bn)
    state = make_state(variables, graph)
    state = init(method, state, ctx)
    state = end_of_epoch(method, perturb_all(state, 1), 0, ctx)
    # momentum that finalize must clear on the pruned channels
    state = state.replace(opt_state=jax.tree_util.tree_map(jnp.ones_like, state.opt_state))
    final = finalize(method, state, ctx)
    assert method.pruned_groups(graph) == tuple(graph.conv_groups())
    for name, g in graph.groups.items():
        m = np.asarray(final.masks[name])
        np.testing.assert_array_equal(m, np.asarray(final.hard[name]))
        assert set(np.unique(m).tolist()) <= {0.0, 1.0}
        assert int((m == 0).sum()) == int(g.size * 0.4)
    masked = {"params": final.params, "batch_stats": final.batch_stats}
    if final_bn == "zero":
        # every slice of the pruned channels is zero: the masked model is the compacted one
        assert method.final_roles is None
        assert_pruned_slices_zero(final.params, final.hard, graph)
        # the optimizer state is not the method's: the train step's hard_masked clears it
        assert_same_tree(final.opt_state, state.opt_state)
        trace = hard_masked_moments(final, graph)
        assert_pruned_slices_zero(trace, final.hard, graph)
        small = compaction.compact(model, masked, final.masks, graph)
    else:
        assert method.final_roles == ("out",)
        np.testing.assert_array_equal(  # the BN of the pruned channels is untouched
            final.params["layer1_0"]["bn1"]["bias"], state.params["layer1_0"]["bn1"]["bias"])
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), final.batch_stats, state.batch_stats))
        dead = np.flatnonzero(np.asarray(final.masks["layer1_0/conv1"]) == 0)
        assert not np.any(np.asarray(final.params["layer1_0"]["conv1"]["kernel"])[..., dead])
        assert np.all(np.asarray(state.params["layer1_0"]["conv2"]["kernel"])[:, :, dead]
                      == np.asarray(final.params["layer1_0"]["conv2"]["kernel"])[:, :, dead])
        small = compaction.compact(model, masked, final.masks, graph, keep_constants=True,
                                   sample_input=x)
        assert jax.tree_util.tree_leaves(small.variables["carry"])
    want = jax.jit(model.apply)(masked, x)
    got = jax.jit(small.model.apply)(small.variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    cost = flops.count(graph, final.masks)
    assert cost.macs < flops.count(graph).macs


def perturb_all(state, seed):
    rng = np.random.default_rng(seed)
    return state.replace(params=jax.tree_util.tree_map(
        lambda l: jnp.asarray(np.asarray(l) + 0.1 * rng.normal(size=l.shape)
                              * (np.asarray(l).std() + 1e-3), jnp.float32), state.params))


def test_sfp_coupled_groups_score_all_producers():
    """Coupled residual groups: L2 over every producer's filter, int(N*P) per group."""
    model = get_model("resnet20")
    x = jnp.ones((1, 8, 8, 3))
    variables = random_variables(model, x, seed=1)
    graph = trace_linen(model, variables, x, residual="coupled")
    state = make_state(variables, graph)
    out = init(SFP(rate=P), state, Ctx(graph, 10))
    multi = [g for g in graph.groups.values() if len(g.producers) > 1]
    assert multi
    for g in multi:
        sq = np.zeros(g.size)
        for m in g.filters():
            leaf = np.asarray(leaf_at(variables, m.path), np.float64)
            for c in range(g.size):
                sq[c] += (np.take(leaf, m.index[c], axis=m.axis) ** 2).sum()
        assert zeros_of(out.masks[g.name]) == lowest(np.sqrt(sq), int(g.size * P))


def test_sfp_exclude_patterns_and_predicate(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, 10)
    state = make_state(variables, graph)
    for exclude in (("conv2",), ("conv[2]",), lambda p: p == "conv2"):
        out = init(SFP(rate=P, exclude=exclude), state, ctx)
        assert zeros_of(out.masks["conv2"]) == set()
        assert len(zeros_of(out.masks["conv1"])) == 3
    with pytest.raises(ValueError, match="conv9"):
        init(SFP(rate=P, exclude=("conv9",)), state, ctx)
    with pytest.raises(ValueError, match="rate"):
        SFP(rate=1.0)
    with pytest.raises(ValueError, match="criterion"):
        SFP(criterion="l3")


def test_sfp_imagenet_option_skips_projection_groups():
    model = get_model("resnet18", num_classes=10)
    x = jnp.ones((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    graph = trace_linen(model, variables, x, residual="scatter")
    groups = SFP(exclude=("*/downsample",)).pruned_groups(graph)
    assert groups and not any("downsample" in p for n in groups for p in graph.groups[n].producers)
    assert len(groups) == len(graph.conv_groups()) - 3  # three projection convs


def test_fpgm_criterion(tiny):
    _, variables, graph = tiny
    state = make_state(variables, graph)
    out = init(SFP(rate=P, criterion="fpgm"), state, Ctx(graph, 10))
    k = kernel(state, "conv1").reshape(-1, 10).T
    dist = np.sqrt(((k[:, None, :] - k[None, :, :]) ** 2).sum(-1)).sum(1)
    assert zeros_of(out.masks["conv1"]) == lowest(dist, 3)


# ----------------------------------------------------------------------------- GHFP


@pytest.mark.parametrize("shape", ["cubic", "linear"])
def test_ghfp_hard_share_follows_schedule_and_hard_stays_hard(tiny, shape):
    _, variables, graph = tiny
    total, rate = 10, 0.5
    ctx = Ctx(graph, total_epochs=total)
    method = GHFP(soft=SFP(rate=rate), shape=shape)
    state = init(method, make_state(variables, graph), ctx)
    for name in SIZES:
        assert zeros_of(state.hard[name]) == set()  # h = 0 before training
    prev_hard = {name: set() for name in SIZES}
    for epoch in range(total):
        state = perturb(state, epoch)
        # hard filters stay zero under training (the trainer masks them); make them large in
        # the scores anyway to prove they are not re-selected by score
        before = {name: l2(state, name) for name in SIZES}
        state = end_of_epoch(method, state, epoch, ctx)
        u = min(1.0, (epoch + 1) / (0.9 * total))
        h = 1 - (1 - u) ** 3 if shape == "cubic" else u
        for name, n in SIZES.items():
            pruned = zeros_of(state.masks[name])
            hard = zeros_of(state.hard[name])
            size = int(n * rate)
            assert len(pruned) == size
            assert len(hard) == max(math.floor(h * size), len(prev_hard[name]))
            assert prev_hard[name] <= hard <= pruned  # hard never comes back
            # the soft rest of S_t is the lowest-L2 non-hard channels
            free = [c for c in range(n) if c not in prev_hard[name]]
            order = sorted(free, key=lambda c: (before[name][c], c))
            assert pruned == prev_hard[name] | set(order[:size - len(prev_hard[name])])
            # the new hard ones are the lowest of S_t after the old hard ones
            assert hard == prev_hard[name] | set(order[:len(hard) - len(prev_hard[name])])
            # hard channels: every slice zero (filters, BN, next layer's input)
            idx = sorted(hard)
            assert np.all(kernel(state, name)[..., idx] == 0)
            assert np.all(np.asarray(state.params["bn" + name[-1]]["scale"])[idx] == 0)
            prev_hard[name] = hard
    assert all(len(prev_hard[name]) == int(n * rate) for name, n in SIZES.items())
    final = finalize(method, state, ctx)
    for name, n in SIZES.items():
        np.testing.assert_array_equal(final.masks[name], final.hard[name])
        assert zeros_of(final.hard[name]) == prev_hard[name]


def test_ghfp_soft_channels_can_return_hard_cannot(tiny):
    model, variables, graph = tiny
    total = 10
    ctx = Ctx(graph, total_epochs=total)
    method = get_method("ghfp", rate=0.5)
    state = init(method, make_state(variables, graph), ctx)
    state = end_of_epoch(method, perturb(state, 0), 2, ctx)  # h = 1 - (2/3)^3 = 0.70 -> 3 of 5
    hard = zeros_of(state.hard["conv1"])
    soft = zeros_of(state.masks["conv1"]) - hard
    assert len(hard) == 3 and len(soft) == 2
    trained = sgd_steps(model, state, graph, steps=2)
    k = kernel(trained, "conv1")
    assert all(np.all(k[..., j] == 0) for j in hard)  # hard: gradients masked
    assert all(np.any(k[..., j] != 0) for j in soft)  # soft: trained normally
    params = dict(trained.params)
    big = params["conv1"]["kernel"]
    for j in list(soft) + list(hard):
        big = big.at[..., j].set(1.0)  # even a large hard filter stays hard
    params["conv1"] = {"kernel": big}
    after = end_of_epoch(method, trained.replace(params=params), 3, ctx)
    assert not (soft & zeros_of(after.masks["conv1"]))  # the soft ones came back
    assert hard <= zeros_of(after.hard["conv1"])


def test_ghfp_with_srfp_soft_part(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=10)
    method = get_method("ghfp", rate=0.5, soft="srfp", alpha0=0.5, decay_rate=0.1)
    state = init(method, make_state(variables, graph), ctx)
    state = end_of_epoch(method, perturb(state, 0), 1, ctx)  # t = 2: alpha = 0.5 e^-0.2
    m = np.asarray(state.masks["conv1"])
    hard = zeros_of(state.hard["conv1"])
    soft = set(np.flatnonzero((m != 0) & (m != 1)).tolist())
    assert len(hard) == math.floor((1 - (1 - 2 / 9) ** 3) * 5) == 2
    assert len(soft) == 3
    np.testing.assert_allclose(m[sorted(soft)], 0.5 * math.exp(-0.2), rtol=1e-6)


def _author_counts(n, rate, total, epoch):
    """The GHFP first author's per-layer (pruned, hard) counts after epoch ``epoch``, written out
    from pruning_resnet_soft_hard.py (its ``--rate`` is the keep ratio; the selection before
    training uses the epoch-0 values; the full rate from epoch 19/20 T on)."""
    keep = 1.0 - rate
    lam = 1.0 - (1.0 - (epoch + 1.0) / (total + 1e-7)) ** 3
    comp = 1.0 - (1 - keep) * (1.0 - (1.0 - (epoch + 1.0) / (total + 1e-7)) ** 3)
    if epoch >= total * 19 / 20:
        comp = keep
    return int(n * (1 - comp)), int(n * (1 - comp) * lam)


def test_asfp_cubic_rate_hand_values():
    from jaxprune import schedules

    cubic = schedules.asfp_rate(0.4, 200, shape="cubic")
    exp = schedules.asfp_rate(0.4, 200)
    # after epoch 49 of 200 (t = 50) in a 64-filter layer: 14 filters (cubic) vs 24 (exp)
    assert cubic(50) == pytest.approx(0.4 * (1 - 0.75 ** 3)) and int(64 * cubic(50)) == 14
    assert int(64 * exp(50)) == 24
    assert cubic(0) == cubic(1) == pytest.approx(0.4 * (1 - 0.995 ** 3))  # before training: epoch 0
    assert cubic(191) == 0.4 and cubic(190) < 0.4  # the full rate from epoch 0.95 T on
    traced = jax.jit(cubic)
    for t in (0, 1, 50, 120, 190, 191):
        assert float(traced(jnp.float32(t))) == pytest.approx(cubic(t), rel=1e-6)
    with pytest.raises(ValueError, match="ASFP rate shape='square' is not allowed; expected one of"):
        schedules.asfp_rate(0.4, 200, shape="square")


def test_srfp_zero_epoch_hand_values():
    from jaxprune.schedules import srfp_decay, srfp_zero_epoch

    # T - round(zero_fraction T), halves up: 10 - 2, 20 - 3, 10 - round(2.5) = 10 - 3, 7 - 0
    assert [srfp_zero_epoch(10, 0.15), srfp_zero_epoch(20, 0.15), srfp_zero_epoch(10, 0.25),
            srfp_zero_epoch(7, 0.0)] == [8, 17, 7, 7]
    s = srfp_decay(0.5, 0.1, 10, 0.25)
    assert s(6) > 0 and s(7) == 0.0
    assert SFP(rate=0.3, decay=True, zero_fraction=0.25).alpha_at(7, 10) == 0.0
    assert SFP(rate=0.3, decay=True, zero_fraction=0.25).alpha_at(6, 10) == 0.5 * math.exp(-3 / 7 * 6)
    # c=None: c = 3 / t_zero, picked by the schedule itself (t_zero = 7 here)
    auto = srfp_decay(0.5, None, 10, 0.25)
    assert auto(6) == 0.5 * math.exp(-3 / 7 * 6) and auto(7) == 0.0
    assert float(jax.jit(auto)(jnp.float32(2))) == pytest.approx(0.5 * math.exp(-3 / 7 * 2))


def test_srfp_author_decay_hand_values():
    from jaxprune import schedules

    total, alpha0, sigma = 200, 0.8, 1e-5
    c = -math.log(sigma / (alpha0 + 0.01 * sigma)) / total  # the author's alpha_decay
    s = schedules.srfp_decay_author(alpha0, total)
    assert s(0) == s(1) == alpha0  # before training and after epoch 0: exp(0)
    assert s(11) == pytest.approx(alpha0 * math.exp(-c * 10))  # after epoch 10
    assert s(180) == pytest.approx(alpha0 * math.exp(-c * 179)) and s(180) > 0
    assert s(181) == 0.0  # epoch 180 >= 0.9 T
    assert float(jax.jit(s)(jnp.float32(11))) == pytest.approx(s(11), rel=1e-6)
    method = SFP(rate=0.3, decay=True, alpha0=alpha0, decay_form="author")
    assert method.alpha_at(11, total) == s(11)


@pytest.mark.parametrize("rate, total", [(0.4, 200), (0.3, 200), (0.4, 16), (0.5, 4)])
def test_ghfp_author_counts_match_the_authors_formulas(resnet20_scatter, rate, total):
    _, _, graph = resnet20_scatter
    method = GHFP.author(rate)
    assert method.soft.name == "asfp" and method.end == 1.0 and method.hard_count == "layer"
    checked = set()
    for t in range(total + 1):  # t = 0: the selection before training (the author's epoch 0)
        pruned, hard = method.counts_at(graph, t, total)
        for name, count in pruned.items():
            n = graph.groups[name].size
            assert (count, hard[name]) == _author_counts(n, rate, total, max(t - 1, 0)), (t, name)
            checked.add(n)
    assert checked == {16, 32, 64}
    # the methods.md reading differs: hard = floor(h * int(N P_t)), nothing hard before training
    reading = GHFP(soft=SFP(rate=rate, asymptotic=True, rate_shape="cubic"), end=1.0)
    assert all(v == 0 for v in reading.counts_at(graph, 0, total)[1].values())
    if total == 4:  # harden_at_init is visible: 64 filters, u = 1/4: P_0 = 0.5 g, h_0 = g
        g = 1 - 0.75 ** 3
        assert method.counts_at(graph, 0, total)[1]["layer3_0/conv1"] == int(64 * 0.5 * g * g) == 10


def test_ghfp_author_variant_selects_and_hardens_by_its_counts(tiny):
    _, variables, graph = tiny
    total, rate = 10, 0.5
    ctx = Ctx(graph, total_epochs=total)
    method = get_method("ghfp", rate=rate, soft="asfp", rate_shape="cubic", end=1.0,
                        hard_count="layer", harden_at_init=True)
    assert method == GHFP.author(rate)
    state = init(method, make_state(variables, graph), ctx)
    prev_hard = {name: zeros_of(state.hard[name]) for name in SIZES}
    for name, n in SIZES.items():
        assert (len(zeros_of(state.masks[name])), len(prev_hard[name])) == _author_counts(n, rate, total, 0)
    for epoch in range(total):
        before = {name: l2(perturb(state, epoch), name) for name in SIZES}
        state = end_of_epoch(method, perturb(state, epoch), epoch, ctx)
        for name, n in SIZES.items():
            n_pruned, n_hard = _author_counts(n, rate, total, epoch)
            hard, pruned = zeros_of(state.hard[name]), zeros_of(state.masks[name])
            assert len(pruned) == max(n_pruned, len(prev_hard[name]))
            assert len(hard) == max(n_hard, len(prev_hard[name]))
            assert prev_hard[name] <= hard <= pruned
            free = [c for c in range(n) if c not in prev_hard[name]]
            order = sorted(free, key=lambda c: (before[name][c], c))
            assert hard == prev_hard[name] | set(order[:len(hard) - len(prev_hard[name])])
            prev_hard[name] = hard
    assert all(len(prev_hard[name]) == int(n * rate) for name, n in SIZES.items())


def test_ghfp_and_soft_options_are_validated():
    with pytest.raises(ValueError, match="^hard_count='all' is not allowed; expected one of selected, layer$"):
        GHFP(hard_count="all")
    with pytest.raises(ValueError, match="rate_shape='cubic' needs a growing rate"):
        SFP(rate=0.3, rate_shape="cubic")
    with pytest.raises(ValueError, match="decay_form='author' needs decayed filters"):
        SFP(rate=0.3, decay_form="author")
    with pytest.raises(ValueError, match="^rate_shape='x' is not allowed; expected one of exp, cubic$"):
        SFP(rate=0.3, asymptotic=True, rate_shape="x")


@pytest.mark.parametrize("build, message", [
    (lambda: SFP(rate=float("nan")), "SFP rate=nan is not allowed; expected a number in [0, 1)"),
    (lambda: SFP(rate=0.3, decay=True, alpha0=float("nan")), "alpha0=nan is not allowed"),
    (lambda: SFP(rate=0.3, decay=True, decay_rate=float("inf")),
     "decay_rate=inf is not allowed; expected a finite number >= 0"),
    (lambda: GHFP(end=0.0), "end=0.0 is not allowed; expected a number in (0, 1]"),
    (lambda: GHFP(shape="square"), "ramp shape='square' is not allowed; expected one of"),
    (lambda: HFP(macs_reduction=0.5, lam=float("inf")), "lam=inf is not allowed"),
    (lambda: HFP(macs_reduction=0.5, temperature=0.0),
     "temperature=0.0 is not allowed; expected a finite number > 0"),
    (lambda: HFP(macs_reduction=0.5, tolerance=1.0), "tolerance=1.0 is not allowed"),
    (lambda: HFP(target_macs=float("nan")), "target_macs=nan is not allowed"),
    (lambda: HFP(macs_reduction=0.5, convention="flops"), "convention='flops' is not allowed"),
])
def test_method_hyperparameters_are_refused_in_one_line_naming_the_value(build, message):
    """Non-finite and out-of-range hyperparameters are refused where the method is built,
    through `jaxprune.validate` (one line: the name, the value and what is allowed)."""
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- HFP


@pytest.fixture(scope="module")
def resnet20_scatter():
    model = get_model("resnet20")
    x = jnp.ones((1, 8, 8, 3))
    variables = random_variables(model, x)
    # trained-looking BN scales: spread, some negative
    rng = np.random.default_rng(7)

    def scales(path, leaf):
        if path[-1].key != "scale":
            return leaf
        v = rng.uniform(0.05, 1.0, leaf.shape) * np.where(rng.random(leaf.shape) < 0.1, -1, 1)
        return jnp.asarray(v, jnp.float32)

    variables = {"params": jax.tree_util.tree_map_with_path(scales, variables["params"]),
                 "batch_stats": variables["batch_stats"]}
    graph = trace_linen(model, variables, x, residual="scatter")
    return model, variables, graph


def test_hfp_final_masks_meet_both_targets(resnet20_scatter):
    _, variables, graph = resnet20_scatter
    ctx = Ctx(graph, total_epochs=4)
    dense = flops.count(graph, None, "conv_fc")
    method = get_method("hfp", macs_reduction=0.5, params_reduction=0.4)
    state = init(method, make_state(variables, graph), ctx)
    # tau's selection (float32) meets the targets on the current scores
    at_tau = flops.count(graph, state.masks, "conv_fc")
    assert at_tau.macs <= 0.5 * dense.macs * (1 + 1e-4)
    assert at_tau.params <= 0.6 * dense.params * (1 + 1e-4)
    final = finalize(method, state, ctx)
    cost = flops.count(graph, final.masks, "conv_fc")
    macs_share, params_share = cost.macs / dense.macs, cost.params / dense.params
    assert 0.5 - 0.005 <= macs_share <= 0.5
    assert 0.6 - 0.005 <= params_share <= 0.6
    alloc = method.allocation(final.masks, graph)
    assert all(kept >= 1 for kept, _ in alloc.values())
    assert any(kept < total for kept, total in alloc.values())
    assert {n: t for n, (_, t) in alloc.items()} == graph.group_sizes()
    for name in graph.groups:
        np.testing.assert_array_equal(final.masks[name], final.hard[name])
    assert_pruned_slices_zero(final.params, final.hard, graph)
    report = method.cost_report(final.masks, graph)
    assert report["macs"] == cost.macs and report["params"] == cost.params
    # only a MACs target: met to within one channel, params free
    only = HFP(macs_reduction=0.5).final_masks(variables["params"], graph)[0]
    assert 0.495 <= flops.count(graph, only, "conv_fc").macs / dense.macs <= 0.5


def test_hfp_penalty_pushes_bn_scales_down_and_vanishes_under_target(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=4)
    method = HFP(macs_reduction=0.5, params_reduction=0.4)
    state = init(method, make_state(variables, graph), ctx)
    ms = state.prune
    pr = pruner_of(method, ctx)

    def penalty(params, prune_state):
        return pr.penalty({"params": params, "batch_stats": state.batch_stats}, prune_state)[0]

    pen, grad = jax.jit(penalty), jax.jit(jax.grad(penalty))
    value = pen(state.params, ms)
    assert value > 0  # the smoothed counts exceed the targets around tau
    grads = grad(state.params, ms)
    checked = 0
    for name in method.gated_groups(graph):
        for m in graph.groups[name].members:
            if m.role == "vector" and m.path[-1] == "scale":
                g = np.asarray(leaf_at(grads, m.path[1:]))
                s = np.asarray(leaf_at(state.params, m.path[1:]))
                assert np.all(g * np.sign(s) >= 0)  # descent shrinks |gamma|
                checked += int(np.sum(g * np.sign(s) > 0))
    assert checked > 0
    # non-BN parameters get no gradient from the penalty
    assert float(jnp.abs(grads["conv1"]["kernel"]).sum()) == 0.0
    step = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, state.params, grads)
    assert pen(step, ms) < value
    # under target (a high threshold counts few channels): zero penalty, zero gradient
    under = ms._replace(tau=jnp.float32(5.0))
    macs, params = method.soft_cost(state.params, under, graph)
    budget = method.budget(graph)
    assert macs < budget.target_macs and params < budget.target_params
    assert float(pen(state.params, under)) == 0.0
    assert all(float(jnp.abs(l).sum()) == 0
               for l in jax.tree_util.tree_leaves(grad(state.params, under)))
    # update re-targets on the same scores: same tau; params untouched
    nxt = end_of_epoch(method, state, 0, ctx)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), nxt.params, state.params))
    np.testing.assert_allclose(nxt.prune.tau, ms.tau, rtol=1e-6)


def test_hfp_validation(resnet20_scatter):
    _, variables, graph = resnet20_scatter
    with pytest.raises(ValueError, match="target"):
        HFP()
    with pytest.raises(ValueError, match="macs_reduction"):
        HFP(macs_reduction=1.2)
    with pytest.raises(ValueError, match="not both"):
        HFP(macs_reduction=0.5, target_macs=10)
    with pytest.raises(ValueError, match="unreachable"):
        init(HFP(target_params=10), make_state(variables, graph), Ctx(graph, 2))


# ----------------------------------------------------------------------------- PFEC, dense


def test_pfec_method_is_one_shot_hard(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, 5)
    cfg = PFECConfig("tiny", layer_rates=((1, 0.35), (2, 0.5)))
    method = get_method("pfec", config=cfg)
    state = make_state(variables, graph)
    state = state.replace(opt_state=jax.tree_util.tree_map(jnp.ones_like, state.opt_state))
    out = init(method, state, ctx)
    for name, rate in (("conv1", 0.35), ("conv2", 0.5)):
        n = SIZES[name]
        k = kernel(state, name)
        l1 = np.abs(k.reshape(-1, n)).sum(0)
        assert zeros_of(out.masks[name]) == lowest(l1, n - int(n * (1 - rate)))
        np.testing.assert_array_equal(out.masks[name], out.hard[name])
    assert len(zeros_of(out.masks["conv1"])) == 4  # keeps int(10 * 0.65) = 6
    pruned = sorted(zeros_of(out.masks["conv1"]))
    assert np.all(kernel(out, "conv2")[:, :, pruned, :] == 0)  # next layer's inputs too
    assert_same_tree(out.opt_state, state.opt_state)  # not the method's: hard_masked clears it
    mom = hard_masked_moments(out, graph)["conv1"]["kernel"]
    assert np.all(np.asarray(mom)[..., pruned] == 0)
    assert np.all(np.asarray(mom)[..., [i for i in range(10) if i not in pruned]] != 0)
    for after in (end_of_epoch(method, out, 0, ctx), finalize(method, out, ctx)):
        assert after.params is out.params and after.batch_stats is out.batch_stats
        assert after.masks is out.masks and after.hard is out.hard


def test_dense_method(tiny):
    _, variables, graph = tiny
    ctx = Ctx(graph, 3)
    method = get_method("dense", rate=0.0, criterion="l2", exclude=())
    assert isinstance(method, Dense)
    state = finalize(method, end_of_epoch(method, init(method, make_state(variables, graph), ctx),
                                                0, ctx), ctx)
    for name, n in SIZES.items():
        np.testing.assert_array_equal(state.masks[name], np.ones(n))
    assert float(pruner_of(method, ctx).penalty(state.variables, state.prune)[0]) == 0.0


# ----------------------------------------------------------------------------- registry


def test_registry():
    assert set(METHODS) == {"dense", "sfp", "asfp", "srfp", "asrfp", "ghfp", "hfp", "pfec"}
    assert get_method("sfp", rate=0.4).name == "sfp"
    a = get_method("asrfp", rate=0.4)
    assert (a.asymptotic, a.decay, a.name) == (True, True, "asrfp")
    g = get_method("ghfp", rate=0.3, soft="asfp", shape="linear", end=0.8)
    assert g.soft.asymptotic and g.shape == "linear" and g.end == 0.8
    assert isinstance(get_method("pfec", config="resnet56-B"), PFEC)
    assert get_method({"name": "sfp", "rate": 0.2, "criterion": "l2", "exclude": (),
                       "residual": "scatter", "kwargs": {"mask_bn": True}}).mask_bn
    with pytest.raises(ValueError, match=r"^method='obd' is not allowed; expected one of dense, .*pfec"):
        get_method("obd")
    with pytest.raises(ValueError, match=r"1\.5"):
        get_method("sfp", rate=1.5)
    with pytest.raises(ValueError, match="-0.1"):
        get_method("ghfp", rate=-0.1)
    with pytest.raises(ValueError, match="bogus"):
        get_method("sfp", rate=0.3, bogus=1)
    with pytest.raises(ValueError, match="rate"):
        get_method("dense", rate=0.3)
    with pytest.raises(ValueError, match="soft variant"):
        get_method("ghfp", soft="xfp")
    with pytest.raises(ValueError, match="unknown PFEC config 'resnet20-A'"):
        get_method("pfec", config="resnet20-A")
    with pytest.raises(ValueError, match="macs_reduction"):
        get_method("hfp", macs_reduction=1.0)


def test_fixed_masks_keep_the_final_hard_selection_through_training(tiny):
    model, variables, graph = tiny
    ctx = Ctx(graph, total_epochs=2)
    final = finalize(SFP(rate=P), init(SFP(rate=P), make_state(variables, graph), ctx), ctx)
    ft = FixedMasks(final.masks, final.hard)
    assert ft.name == "finetune"
    state = init(ft, final, ctx)
    assert state.params is final.params and state.batch_stats is final.batch_stats
    assert state.masks == final.masks and state.hard == final.hard
    trained = sgd_steps(model, state, graph, steps=3)
    for after in (end_of_epoch(ft, trained, 0, ctx), finalize(ft, trained, ctx)):
        assert after.params is trained.params and after.batch_stats is trained.batch_stats
        assert after.masks == trained.masks and after.hard == trained.hard
    assert_pruned_slices_zero(trained.params, final.hard, graph)
    kept = np.flatnonzero(np.asarray(final.hard["conv1"]) == 1)
    assert np.any(kernel(trained, "conv1")[..., kept] != kernel(final, "conv1")[..., kept])
    pen, metrics = pruner_of(ft, ctx).penalty(trained.variables, trained.prune)
    assert float(pen) == 0.0 and metrics == {}


# ----------------------------------------------------------------------------- width policies


@pytest.mark.parametrize("method_name, kwargs, residual", [
    ("sfp", dict(rate=0.4), "scatter"),
    ("sfp", dict(rate=0.4), "coupled"),
    ("ghfp", dict(rate=0.3), "scatter"),
    ("asfp", dict(rate=0.4), "coupled"),
])
def test_rounded_final_selection_keeps_compact_equal_to_masked(method_name, kwargs, residual):
    model = get_model("resnet20")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = random_variables(model, x[:1], seed=11)
    graph = trace_linen(model, variables, x[:1], residual=residual)
    ctx = Ctx(graph, total_epochs=3)
    exact = get_method(method_name, **kwargs)
    rounded = get_method(method_name, width={"round_to": 8}, **kwargs)
    finals = {}
    for tag, method in (("exact", exact), ("rounded", rounded)):
        state = init(method, make_state(variables, graph), ctx)
        for epoch in range(3):
            state = end_of_epoch(method, state, epoch, ctx)
        finals[tag] = finalize(method, state, ctx)
    names = exact.soft.pruned_groups(graph) if method_name == "ghfp" else exact.pruned_groups(graph)
    for name in names:
        size = graph.groups[name].size
        k_exact = int(np.sum(np.asarray(finals["exact"].masks[name])))
        k_round = int(np.sum(np.asarray(finals["rounded"].masks[name])))
        assert k_round >= k_exact and 1 <= k_round <= size
        assert k_round % 8 == 0 or k_round == size, (name, k_round)
    final = finals["rounded"]
    masks = {n: (np.asarray(m) > 0).astype(np.float32) for n, m in final.masks.items()}
    res = compaction.compact(model, final.variables, masks, graph)
    want = model.apply(apply_masks(final.variables, masks, graph), x)
    got = res.model.apply(res.variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the compact model has exactly the rounded widths: its size is the masked count
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(res.variables["params"]))
    assert n_params == flops.count(graph, masks).params


def test_pfec_with_rounded_widths(resnet20_scatter):
    model, variables, graph = resnet20_scatter
    cfg = PFECConfig("r20", 19, (7, 13), (0.3, 0.3, 0.3))
    exact = pfec_masks(variables, graph, cfg)
    up = pfec_masks(variables, graph, cfg, width=8)
    for name in exact:
        ke, ku = int(np.sum(np.asarray(exact[name]))), int(np.sum(np.asarray(up[name])))
        size = graph.groups[name].size
        assert ku >= ke and (ku % 8 == 0 or ku == size)
        if ku == ke:
            np.testing.assert_array_equal(exact[name], up[name])
        else:  # rounding up keeps the exact selection's filters plus the next-best ones
            assert np.all(np.asarray(up[name]) >= np.asarray(exact[name]))


def test_width_policy_rejects_methods_without_it():
    from jaxprune.config import base_config
    from jaxprune.factories import make_method

    c = base_config()
    c.method.name = "dense"
    c.method.round_to = 8
    with pytest.raises(ValueError, match="round_to=8: method 'dense'"):
        make_method(c)


# ResNet-20's groups have 16/32/64 channels: steps of 8 channels are too coarse to land both
# targets within 0.5 points (measured: 0.53 points under the MACs target), steps of 4 are not.
@pytest.mark.parametrize("round_to, slack", [(4, 0.005), (8, 0.01)])
def test_hfp_with_rounded_widths_still_meets_both_targets(resnet20_scatter, round_to, slack):
    _, variables, graph = resnet20_scatter
    ctx = Ctx(graph, total_epochs=4)
    dense = flops.count(graph, None, "conv_fc")
    method = get_method("hfp", macs_reduction=0.5, params_reduction=0.4, width=round_to)
    final = finalize(method, init(method, make_state(variables, graph), ctx), ctx)
    cost = flops.count(graph, final.masks, "conv_fc")
    macs_share, params_share = cost.macs / dense.macs, cost.params / dense.params
    assert 0.5 - slack <= macs_share <= 0.5, macs_share
    assert 0.6 - slack <= params_share <= 0.6, params_share
    for name in method.gated_groups(graph):
        kept, size = int(np.sum(np.asarray(final.masks[name]))), graph.groups[name].size
        assert kept >= 1 and (kept % round_to == 0 or kept == size), (name, kept)


def test_bench_widths_table_composition_and_latency_policy(tmp_path):
    """The table sums the producer's and the consumers' conv times at each width (a fake
    timer makes the expected values exact); a run config reading it picks the argmin."""
    from jaxprune import width_bench
    from jaxprune.config import base_config
    from jaxprune.factories import make_method

    model = get_model("resnet20")
    x = jnp.zeros((1, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    graph = trace_linen(model, variables, x)
    calls = []

    def fake(spec, cin, cout):  # a width of 24 is "fast", everything else costs MACs
        calls.append((spec["input_shape"], cin, cout))
        return 0.001 if 24 in (cin, cout) else float(cin * cout)

    g = graph.producer_to_group()["layer2_1/conv1"]
    table = width_bench.bench_widths(model, variables, graph, (4, 8, 8, 3), step=8, groups=[g],
                                     timer=fake)
    # layer2_1/conv1: 32 -> w, consumer layer2_1/conv2: w -> 32
    assert table[g] == {8: 2 * 32 * 8.0, 16: 2 * 32 * 16.0, 24: 0.002, 32: 2 * 32 * 32.0}
    assert len(calls) == 8  # 4 widths x (producer, consumer), each signature timed once
    path = width_bench.save_table(tmp_path / "t.json", table, {"model": "resnet20"})
    c = base_config()
    c.method.name = "sfp"
    c.method.rate = 0.5
    c.method.width_table = str(path)
    method = make_method(c)
    assert method.width.kept(32, 16, g) == 24 and method.width.kept(32, 25, g) == 32
    counts = method.final_counts(graph)
    assert counts[g] == 32 - 24


def test_time_conv_measures_a_real_conv():
    from jaxprune import width_bench

    spec = dict(input_shape=(2, 6, 6, 3), features=4, kernel_size=(3, 3), strides=1,
                padding="SAME", groups=1)
    assert 0 < width_bench.time_conv(spec, 3, 4, repeats=2) < 10
    assert width_bench.candidate_widths(20, 8) == [8, 16, 20]
