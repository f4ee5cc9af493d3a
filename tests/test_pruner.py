"""jaxprune.pruner: the methods in a user's own loop (flax.training.train_state.TrainState and
jaxprune.masks.hard_masked) do what jaxprune's own train step does, step by step."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from jaxprune import train_step as ts_lib
from jaxprune.graph import trace_linen
from jaxprune.masks import hard_masked
from jaxprune.methods import SFP, get_method
from test_training import TinyNet  # conv(4)-BN-ReLU-conv(6)-BN-ReLU-GAP-fc(3)

EPOCHS, STEPS = 4, 2


@functools.lru_cache(maxsize=None)
def _setup():
    model = TinyNet()
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(EPOCHS * STEPS, 4, 8, 8, 3)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, size=(EPOCHS * STEPS, 4)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), xs[0])
    graph = trace_linen(model, variables, xs[0])
    return model, variables, graph, xs, ys


OPT = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9, nesterov=True))
METHODS = {"sfp": dict(rate=0.4), "asfp": dict(rate=0.4), "ghfp": dict(rate=0.5),
           "hfp": dict(macs_reduction=0.4, params_reduction=0.3)}


def _jaxprune_loop(method, model, variables, graph, xs, ys, record=None):
    pr = method.pruner(graph, EPOCHS, STEPS)
    state = ts_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"], opt_state=OPT.init(variables["params"]),
                              prune=None, rng=jnp.zeros((2,), jnp.uint32))
    state = ts_lib.prune_init(pr, state)  # the pruner's first selection fills ``prune``
    step = jax.jit(functools.partial(ts_lib.train_step, model=model, graph=graph, optimizer=OPT,
                                     pruner=pr))
    for e in range(EPOCHS):
        for k in range(STEPS):
            state, _ = step(state, xs[e * STEPS + k], ys[e * STEPS + k])
        state = ts_lib.prune_update(pr, state)
        if record is not None:
            record.append((state.masks, state.hard))
    return ts_lib.prune_finalize(pr, state)


def _user_loop(method, model, variables, graph, xs, ys, record=None):
    """What a user writes: a flax TrainState, their optimizer wrapped in hard_masked, the
    method's penalty added to their loss."""
    pr = method.pruner(graph, total_epochs=EPOCHS, steps_per_epoch=STEPS)
    variables, ps = pr.init(variables)
    tx = hard_masked(OPT, graph)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
    batch_stats = variables["batch_stats"]

    @jax.jit
    def step(state, batch_stats, ps, x, y):
        def loss_fn(params):
            logits, upd = state.apply_fn({"params": params, "batch_stats": batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            pen, _ = pr.penalty({"params": params, "batch_stats": batch_stats}, ps)
            return ce + pen, upd["batch_stats"]

        grads, new_bs = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params, masks=ps.hard)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), new_bs

    for e in range(EPOCHS):
        for k in range(STEPS):
            state, batch_stats = step(state, batch_stats, ps, xs[e * STEPS + k], ys[e * STEPS + k])
        variables, ps = pr.update({"params": state.params, "batch_stats": batch_stats}, ps)
        state, batch_stats = state.replace(params=variables["params"]), variables["batch_stats"]
        if record is not None:
            record.append((ps.masks, ps.hard))
    return pr.finalize({"params": state.params, "batch_stats": batch_stats}, ps)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_user_loop_prunes_like_jaxprunes_own(name):
    model, variables, graph, xs, ys = _setup()
    method = get_method(name, **METHODS[name])
    ours = _jaxprune_loop(method, model, variables, graph, xs, ys)
    got_vars, got = _user_loop(method, model, variables, graph, xs, ys)
    assert type(got) is type(ours.prune)  # the method's own typed state
    assert int(got.count) == EPOCHS
    for g in graph.groups:
        np.testing.assert_array_equal(np.asarray(got.masks[g]), np.asarray(ours.masks[g]), err_msg=g)
        np.testing.assert_array_equal(np.asarray(got.hard[g]), np.asarray(ours.hard[g]), err_msg=g)
    assert any(not np.asarray(m).all() for m in got.hard.values())  # it did prune
    assert jax.tree_util.tree_structure(got_vars) == jax.tree_util.tree_structure(ours.variables)
    for a, b in zip(jax.tree_util.tree_leaves(got_vars), jax.tree_util.tree_leaves(ours.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_pruner_names_a_bad_variables_tree():
    _, variables, graph, _, _ = _setup()
    pr = get_method("sfp", rate=0.3).pruner(graph, total_epochs=2)
    with pytest.raises(ValueError, match="'params' collection"):
        pr.init(variables["params"])


def _nnx_loop(method, model, graph, xs, ys):
    """What an NNX user writes: their model and nnx.Optimizer, hard_masked inside it."""
    from flax import nnx

    from jaxprune.pruner import nnx_update, nnx_variables

    pr = method.pruner(graph, total_epochs=EPOCHS, steps_per_epoch=STEPS)
    variables, ps = pr.init(nnx_variables(model))
    nnx_update(model, variables)
    optimizer = nnx.Optimizer(model, hard_masked(OPT, graph), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, ps, x, y):
        def loss_fn(model):
            ce = optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()
            return ce + pr.penalty(nnx_variables(model), ps)[0]

        optimizer.update(model, nnx.grad(loss_fn)(model), masks=ps.hard)

    for e in range(EPOCHS):
        for k in range(STEPS):
            step(model, optimizer, ps, xs[e * STEPS + k], ys[e * STEPS + k])
        variables, ps = pr.update(nnx_variables(model), ps)
        nnx_update(model, variables)
    return pr.finalize(nnx_variables(model), ps)


@pytest.mark.parametrize("name", ["sfp", "ghfp"])
def test_an_nnx_loop_prunes_like_jaxprunes_own(name):
    """The NNX twin of `TinyNet` (SmallNNXCNN with the same widths and weights) trained in an NNX
    loop ends with the masks and weights of jaxprune's own loop on the Linen model."""
    from flax import nnx

    from jaxprune.models import SmallNNXCNN
    from jaxprune.pruner import nnx_variables, trace_nnx

    model, _, _, xs, ys = _setup()
    twin = SmallNNXCNN(rngs=nnx.Rngs(0), num_classes=3, features=(4, 6))
    variables = nnx_variables(twin)
    graph = trace_nnx(twin, xs[0])
    assert graph.group_sizes() == trace_linen(model, variables, xs[0]).group_sizes()
    method = get_method(name, **METHODS[name])
    ours = _jaxprune_loop(method, model, variables, trace_linen(model, variables, xs[0]), xs, ys)
    got_vars, got = _nnx_loop(method, twin, graph, xs, ys)
    for g in graph.groups:
        np.testing.assert_array_equal(np.asarray(got.masks[g]), np.asarray(ours.masks[g]), err_msg=g)
        np.testing.assert_array_equal(np.asarray(got.hard[g]), np.asarray(ours.hard[g]), err_msg=g)
    assert jax.tree_util.tree_structure(got_vars) == jax.tree_util.tree_structure(ours.variables)
    for a, b in zip(jax.tree_util.tree_leaves(got_vars), jax.tree_util.tree_leaves(ours.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _fpgm_lowest(kernel, n):
    """Indices of the ``n`` filters with the smallest summed distance to the others (numpy)."""
    f = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1]).T
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)).sum(1)
    return sorted(np.argsort(d, kind="stable")[:n].tolist())


def test_a_user_composes_ghfp_over_asfp_with_fpgm_scores():
    """Two methods composed by the user (GHFP's gradual hardening over ASFP, FPGM scores) run in
    the user's own loop (flax TrainState + hard_masked, no jaxprune train state) and select what
    jaxprune's own loop selects; the first re-selection is checked against numpy FPGM."""
    from jaxprune.methods import GHFP, SFP

    model, variables, graph, xs, ys = _setup()
    method = GHFP(soft=SFP(rate=0.5, asymptotic=True, criterion="fpgm"), end=0.5)
    pr = method.pruner(graph, total_epochs=EPOCHS, steps_per_epoch=STEPS)
    v0, ps0 = pr.init(variables)
    assert int(ps0.count) == 0
    v1, ps1 = pr.update(v0, ps0)
    assert int(ps1.count) == 1
    # after 1 of 4 epochs ASFP's rate is P_1 = 0.5 (1 - exp(-ln4 / (4/8))) = 0.46875: int(N P_1)
    # lowest FPGM filters are selected, floor(h_0 |S|) of them hard (h_0 = cubic ramp at 1/2)
    h0 = 1 - (1 - 1 / (0.5 * EPOCHS)) ** 3
    for name, size in (("conv1", 4), ("conv2", 6)):
        n = int(size * 0.5 * (1 - np.exp(-np.log(4) / (EPOCHS / 8))))
        kernel = variables["params"][name]["kernel"]
        assert zeros(ps1.masks[name]) == _fpgm_lowest(kernel, n), name
        assert len(zeros(ps1.hard[name])) == int(np.floor(h0 * n)), name
    ours_epochs, got_epochs = [], []
    builtin = get_method("ghfp", soft="asfp", rate=0.5, criterion="fpgm", end=0.5)  # a config's
    assert builtin == method
    ours = _jaxprune_loop(builtin, model, variables, graph, xs, ys, ours_epochs)
    got_vars, got = _user_loop(method, model, variables, graph, xs, ys, got_epochs)
    assert int(got.count) == EPOCHS and len(got_epochs) == len(ours_epochs) == EPOCHS
    for e, ((om, oh), (gm, gh)) in enumerate(zip(ours_epochs, got_epochs)):  # every epoch
        for g in graph.groups:
            np.testing.assert_array_equal(np.asarray(gm[g]), np.asarray(om[g]), err_msg=f"{e} {g}")
            np.testing.assert_array_equal(np.asarray(gh[g]), np.asarray(oh[g]), err_msg=f"{e} {g}")
    for g in graph.groups:
        np.testing.assert_array_equal(np.asarray(got.masks[g]), np.asarray(ours.masks[g]), err_msg=g)
        np.testing.assert_array_equal(np.asarray(got.hard[g]), np.asarray(ours.hard[g]), err_msg=g)
        assert len(zeros(got.hard[g])) == int(graph.groups[g].size * 0.5)
    for a, b in zip(jax.tree_util.tree_leaves(got_vars), jax.tree_util.tree_leaves(ours.variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def zeros(mask):
    return np.flatnonzero(np.asarray(mask) == 0).tolist()


@dataclasses.dataclass(frozen=True)
class L1Rule:
    """A soft selection rule of the user's own: SFP's counts and decay, its own L1 scores
    (``sum |w|`` over each filter, written here, not jaxprune's criterion)."""

    base: SFP

    @property
    def soft_roles(self):
        return self.base.soft_roles

    def check(self, graph, total_epochs):
        self.base.check(graph, total_epochs)

    def pruned_groups(self, graph):
        return self.base.pruned_groups(graph)

    def rate_at(self, t, total_epochs):
        return self.base.rate_at(t, total_epochs)

    def counts_at(self, graph, names, t, total_epochs):
        return self.base.counts_at(graph, names, t, total_epochs)

    def alpha_at(self, t, total_epochs):
        return self.base.alpha_at(t, total_epochs)

    def final_counts(self, graph):
        return self.base.final_counts(graph)

    def scores(self, variables, graph, names):
        return {n: jnp.sum(jnp.abs(variables["params"][n]["kernel"]), axis=(0, 1, 2)) for n in names}


def test_ghfp_hardens_any_soft_rule():
    """GHFP is a gradual-hardening wrapper over any soft rule (`SoftRule`), not only SFP's: over
    a rule of the user's own it selects and hardens, epoch by epoch, what it does over SFP with
    jaxprune's L1 criterion."""
    from jaxprune.methods import GHFP
    from jaxprune.methods.sfp import SoftRule

    model, variables, graph, xs, ys = _setup()
    asfp = SFP(rate=0.5, asymptotic=True)
    assert isinstance(L1Rule(asfp), SoftRule) and not isinstance(object(), SoftRule)
    with pytest.raises(ValueError, match="soft must be a soft selection rule"):
        GHFP(soft=object())
    theirs, ours = [], []
    _, got = _user_loop(GHFP(soft=L1Rule(asfp), end=0.5), model, variables, graph, xs, ys, theirs)
    _, want = _user_loop(GHFP(soft=SFP(rate=0.5, asymptotic=True, criterion="l1"), end=0.5),
                         model, variables, graph, xs, ys, ours)
    for e, ((gm, gh), (wm, wh)) in enumerate(zip(theirs + [(got.masks, got.hard)],
                                                 ours + [(want.masks, want.hard)])):
        for g in graph.groups:
            np.testing.assert_array_equal(np.asarray(gm[g]), np.asarray(wm[g]), err_msg=f"{e} {g}")
            np.testing.assert_array_equal(np.asarray(gh[g]), np.asarray(wh[g]), err_msg=f"{e} {g}")
    assert 0 < sum(len(zeros(m)) for m in theirs[1][1].values()) < sum(len(zeros(m)) for m in got.hard.values())
