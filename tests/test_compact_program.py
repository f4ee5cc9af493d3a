"""Compaction of models the library has not special-cased (an unseen zoo): their traced program
is re-evaluated without the pruned channels (`jaxprune.compaction.program`).

For each model, rate (0.1 / 0.5 / 0.9) and residual policy: the compact outputs equal the
hard-masked dense model's (relative error <= 1e-5, inference mode), every pruned leaf shrinks
by exactly the pruned count, and unprunable channels carry their reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

from tests.compact_checks import assert_pruned_tensors_shrink
from jaxprune.compaction import compact
from jaxprune.compaction import ExportedModel, ProgramModel
from jaxprune.graph import trace_linen
from jaxprune.masks import apply_masks
from jaxprune.models import gather_channels
from jaxprune.pruner import nnx_variables, trace_nnx


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-12, np.max(np.abs(b))))


class SEGroupedConcat(nn.Module):
    """Grouped and depthwise convs, a squeeze-excitation gate, concatenated branches, a channel
    slice and a channel pad, BatchNorm and a flatten into the classifier."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(16, (3, 3))(x)))
        g = nn.Conv(16, (3, 3), feature_group_count=4)(x)  # grouped
        d = nn.Conv(16, (3, 3), feature_group_count=16)(nn.Conv(16, (1, 1))(g))  # depthwise
        s = jnp.mean(d, axis=(1, 2), keepdims=True)  # squeeze over space
        s = nn.sigmoid(nn.Conv(16, (1, 1))(nn.relu(nn.Conv(4, (1, 1))(s))))
        d = d * s
        b = nn.Conv(8, (3, 3))(x)
        y = jnp.concatenate([d, b[..., :6], jnp.pad(b[..., 6:], ((0, 0),) * 3 + ((1, 1),))], -1)
        y = nn.relu(nn.Conv(12, (3, 3), strides=2)(y))
        return nn.Dense(10)(y.reshape(y.shape[0], -1))


class NormsAndResidual(nn.Module):
    """A residual stream, a LayerNorm'd conv and a GroupNorm'd conv (those two are refused)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        for i in range(2):
            h = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(
                nn.Conv(12, (3, 3), name=f"a{i}")(x)))
            x = x + nn.Conv(8, (3, 3), name=f"b{i}")(h)
        x = nn.LayerNorm()(nn.Conv(8, (3, 3), name="ln_conv")(x))
        x = nn.GroupNorm(num_groups=2)(nn.Conv(8, (3, 3), name="gn_conv")(x))
        return nn.Dense(5)(x.mean((1, 2)))


class UNet(nn.Module):
    """Encoder-decoder with skip concatenations, nearest upsampling and a transposed conv."""

    @nn.compact
    def __call__(self, x):
        e1 = nn.relu(nn.Conv(8, (3, 3))(x))
        e2 = nn.relu(nn.Conv(16, (3, 3), strides=2)(e1))
        m = nn.relu(nn.Conv(16, (3, 3))(e2))
        u = jax.image.resize(m, (m.shape[0], m.shape[1] * 2, m.shape[2] * 2, m.shape[3]), "nearest")
        d1 = nn.relu(nn.Conv(8, (3, 3))(jnp.concatenate([u, e1], -1)))
        t = nn.ConvTranspose(8, (2, 2), strides=(2, 2))(e2)
        return nn.Conv(3, (1, 1))(jnp.concatenate([d1, t], -1))


class ChannelMoves(nn.Module):
    """A branch of 6 channels moved into an 8-channel stream (with zero slots) by a one-hot
    matmul, as the bundled compact models do (`jaxprune.models.gather_channels`)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        b = nn.Conv(6, (3, 3), name="branch")(nn.relu(x))
        x = x + gather_channels(b, [3, 6, 0, 1, 6, 5, 2, 4])  # 6: a zero channel
        return nn.Dense(4)(nn.relu(x).mean((1, 2)))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Conv(8, (3, 3), name="c2")(nn.relu(nn.Conv(8, (3, 3), name="c1")(x))), None


class ScanRemat(nn.Module):
    """An `nn.scan` of residual blocks (stacked params) and an `nn.remat` block."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = blocks(name="blocks")(x, None)
        x, _ = nn.remat(_Block)(name="remat")(x, None)
        return nn.Dense(4)(x.mean((1, 2)))


class NNXRes(nnx.Module):
    """An NNX model with BatchNorm and residual adds."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.a = nnx.Conv(8, 12, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(12, rngs=rngs)
        self.b = nnx.Conv(12, 8, (3, 3), rngs=rngs)
        self.c = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        x = x + self.b(nnx.relu(self.bn(self.a(x))))
        return self.fc(nnx.relu(self.c(x)).mean((1, 2)))


def _perturbed(variables, seed=0):
    """Non-trivial BN statistics and biases (init has mean 0, var 1, bias 0)."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [a + 0.2 * jnp.abs(jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _masks(graph, rate, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, g in graph.groups.items():
        n_keep = max(1, g.size - int(round(rate * g.size)))
        m = np.zeros(g.size, np.float32)
        m[rng.choice(g.size, n_keep, replace=False)] = 1
        out[name] = m
    return out


def _linen(model, shape=(2, 8, 8, 3)):
    x = jax.random.normal(jax.random.key(1), shape)
    variables = _perturbed(model.init(jax.random.key(0), x))
    return model, variables, x


LINEN = {"se_grouped_concat": SEGroupedConcat, "norms_residual": NormsAndResidual, "unet": UNet,
         "scan_remat": ScanRemat, "channel_moves": ChannelMoves}


def _check_compact(model, variables, x, graph, rate, apply_dense):
    masks = _masks(graph, rate)
    res = compact(model, variables, masks, graph, sample_input=x)
    assert isinstance(res.model, ProgramModel)
    out = jax.jit(res.model.apply)(res.variables, x)
    ref = apply_dense(apply_masks(variables, masks, graph), x)
    assert rel_err(out, ref) <= 1e-5
    assert_pruned_tensors_shrink(res.variables, variables, graph, masks)
    return res, masks


@pytest.mark.parametrize("residual", ["coupled", "scatter"])
@pytest.mark.parametrize("name", sorted(LINEN))
def test_unseen_linen_models_compact_exactly_at_three_rates(name, residual):
    model, variables, x = _linen(LINEN[name]())
    graph = trace_linen(model, variables, x, residual=residual)
    assert graph.groups, graph.summary()
    for rate in (0.1, 0.5, 0.9):
        _check_compact(model, variables, x, graph, rate,
                       lambda v, a: model.apply(v, a, **({"train": False} if name in (
                           "se_grouped_concat", "norms_residual") else {})))


def test_unprunable_channels_are_reported_with_the_reason():
    model, variables, x = _linen(NormsAndResidual())
    g = trace_linen(model, variables, x)
    assert "summed over" in g.unprunable["ln_conv"] and "splits the channel axis" in g.unprunable["gn_conv"]
    model, variables, x = _linen(SEGroupedConcat())
    g = trace_linen(model, variables, x)
    # the 4-group conv prunes input (and output) j of every group together: groups of 4
    # channels of 4 positions each, one per conv group
    lead = g.groups["Conv_0"].filters()[0]
    assert "Conv_0" not in g.unprunable and lead.index.tolist() == [[j, j + 4, j + 8, j + 12]
                                                                   for j in range(4)]
    assert g.groups["Conv_1"].size == 4


@pytest.mark.parametrize("residual", ["coupled", "scatter"])
def test_nnx_model_compacts_exactly(residual):
    model = NNXRes(nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = _perturbed(nnx_variables(model))
    from jaxprune.pruner import nnx_update

    nnx_update(model, variables)
    graph = trace_nnx(model, x, residual=residual)
    from jaxprune.pruner import nnx_apply

    apply = nnx_apply(model)
    for rate in (0.1, 0.5, 0.9):
        _check_compact(model, variables, x, graph, rate, apply)


@pytest.fixture(scope="module")
def se_compact():
    model, variables, x = _linen(SEGroupedConcat())
    graph = trace_linen(model, variables, x, residual="scatter")
    res, masks = _check_compact(model, variables, x, graph, 0.5,
                                lambda v, a: model.apply(v, a, train=False))
    return model, variables, x, graph, res, masks


def test_compact_program_runs_at_other_batch_sizes_and_trains(se_compact):
    model, variables, x, graph, res, masks = se_compact
    x5 = jax.random.normal(jax.random.key(7), (5, 8, 8, 3))
    ref = model.apply(apply_masks(variables, masks, graph), x5, train=False)
    assert rel_err(res.model.apply(res.variables, x5), ref) <= 1e-5
    # train mode (batch statistics, mutable) is compacted from the model's own program too
    out, upd = res.model.apply(res.variables, x5, train=True, mutable=["batch_stats"])
    r_out, r_upd = model.apply(apply_masks(variables, masks, graph), x5, train=True,
                               mutable=["batch_stats"])
    from jaxprune.compaction import slice_tree

    assert rel_err(out, r_out) <= 1e-5
    want = slice_tree({"batch_stats": r_upd["batch_stats"]}, res.axis_keep)
    for a, b in zip(jax.tree_util.tree_leaves(upd), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5
    # gradients flow and match the masked model's on the kept slices
    loss = lambda p, v, fn: jnp.sum(fn({**v, "params": p}, x5) ** 2)  # noqa: E731
    g_small = jax.grad(loss)(res.variables["params"], res.variables,
                             lambda v, a: res.model.apply(v, a))
    masked = apply_masks(variables, masks, graph)
    g_dense = jax.grad(loss)(masked["params"], masked,
                             lambda v, a: model.apply(v, a, train=False))
    g_dense = slice_tree({"params": g_dense}, res.axis_keep)["params"]
    for a, b in zip(jax.tree_util.tree_leaves(g_small), jax.tree_util.tree_leaves(g_dense)):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-4


def test_export_and_save_load_round_trip(se_compact, tmp_path):
    import jax.export

    from jaxprune import load
    from jaxprune.artifact import save_compact

    model, variables, x, graph, res, masks = se_compact
    want = res.model.apply(res.variables, x)
    exp = jax.export.deserialize(res.model.export(res.variables, x).serialize())
    assert rel_err(exp.call(res.variables, x), want) <= 1e-6
    path = save_compact(tmp_path / "m", res.model, res.variables, {"method": "test"},
                        input_shape=(8, 8, 3), batch_size=2)
    m2, v2, meta = load(path)
    assert isinstance(m2, ExportedModel) and meta["method"] == "test"
    assert rel_err(m2.apply(v2, x), want) <= 1e-6
    x3 = jax.random.normal(jax.random.key(3), (3, 8, 8, 3))  # padded to 4, run in 2 chunks
    assert rel_err(m2.apply(v2, x3), res.model.apply(res.variables, x3)) <= 1e-5


def test_generic_compaction_refuses_what_it_cannot_do():
    model, variables, x = _linen(UNet())
    g = trace_linen(model, variables, x)
    masks = _masks(g, 0.5)
    with pytest.raises(ValueError, match="pass sample_input="):
        compact(model, variables, masks, g)
    with pytest.raises(ValueError, match="keep_constants=True needs a bundled model"):
        compact(model, variables, masks, g, keep_constants=True, sample_input=x)
    with pytest.raises(TypeError, match="Linen module or an NNX model, got int"):
        compact(3, variables, masks, g, sample_input=x)


class _PlusOne(nn.Module):
    """A pruned branch that emits a constant (x + 1) into a full-width stream: zero filling
    cannot reproduce it, and the check says so."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        x = x + (nn.Conv(8, (3, 3), use_bias=False, name="br")(x) + 1.0)
        return nn.Dense(3)(x.mean((1, 2)))


def test_a_constant_from_a_pruned_branch_is_refused():
    model, variables, x = _linen(_PlusOne())
    g = trace_linen(model, variables, x, residual="scatter")
    masks = {n: np.ones(gg.size, np.float32) for n, gg in g.groups.items()}
    masks["br"][:4] = 0
    with pytest.raises(ValueError, match="differs from the masked model"):
        compact(model, variables, masks, g, sample_input=x)
