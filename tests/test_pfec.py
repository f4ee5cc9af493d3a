"""PFEC (Li et al., ICLR 2017): Table 1's FLOPs and params from the architecture, layer numbering,
L1 selection, configs and the sensitivity analysis.

Counting convention that reproduces Table 1 (investigated here, see `jaxprune.methods.pfec`):

- kept filters per pruned layer ``int(N * (1 - p))`` (floor of the kept count). Flooring the
  pruned count instead (SFP's rule) gives ResNet-56-A 1.16e8 FLOPs (7.2%), not 1.12e8 (10.4%).
- FLOPs = conv + FC multiply-accumulates (``flops.count(..., 'conv_fc')``).
- params = conv/FC weights + FC bias; BatchNorm's scale and shift are NOT counted: with them
  dense ResNet-110 has 1.73e6 params, the table says 1.72e6 (and ResNet-56-B 7.36e5 -> 7.4e5,
  ResNet-110-A 1.69e6, ResNet-110-B 1.17e6 would not match either).
- With this convention every absolute FLOPs/params figure of the table matches to the printed
  precision, and all percentages but three, which our exact arithmetic puts 0.003-0.07 points
  above the printed value (the paper's last digit is one lower): ResNet-56-B params 13.77%
  (paper 13.7), ResNet-110-B FLOPs 38.66% (38.6) and params 32.45% (32.4). Searched and
  rejected as explanations: rounding the kept count (round / ceil), stage boundaries, counting
  BN params or running statistics, and any uniform per-stage kept count within +-2 of ours
  (none matches all four figures of the B rows). They are asserted to within 0.1 point.
- Only the first conv of each block is pruned, so the residual policy ('coupled' or
  'scatter') does not change the counts.
"""

import csv

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import flops, selection
from jaxprune.graph import trace_linen
from jaxprune.methods import pfec
from jaxprune.methods.pfec import PFECConfig, layer_numbers, pfec_masks, table1_cost
from jaxprune.models import get_model

_GRAPHS = {}


def graph_of(name, residual="coupled", size=32, classes=10):
    key = (name, residual, size, classes)
    if key not in _GRAPHS:
        model = get_model(name, num_classes=classes)
        x = jnp.zeros((1, size, size, 3))
        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
        _GRAPHS[key] = trace_linen(model, variables, x, residual=residual)
    return _GRAPHS[key]


def random_variables(model, x, seed=0):
    """Real random weights filled on the host (no XLA compilation for an init)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(rng.normal(0, 0.1, spec.shape), jnp.float32)
        return jnp.asarray(np.ones(spec.shape) if name in ("scale", "var")
                           else np.zeros(spec.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def index_masks(graph, config):
    """PFEC masks without weights: prune the first channels (counting needs only the counts)."""
    rates = pfec.resolve(config, graph)
    masks = {n: np.ones(g.size, np.float32) for n, g in graph.groups.items()}
    for n, rate in rates.items():
        masks[n][: selection.num_pruned(graph.groups[n].size, rate, "pfec")] = 0.0
    return masks


def printed(value, paper):
    """``value`` rounded to the significant digits of the paper's ``'2.06e8'``."""
    digits = len(paper.lower().split("e")[0].split(".")[-1]) if "." in paper else 0
    return float(f"{value:.{digits}e}")


def pct(pruned, dense):
    return 100.0 * (1.0 - pruned / dense)


# model, config, FLOPs, FLOPs pruned %, params, params pruned % (PFEC Table 1)
TABLE1 = [
    ("vgg16", "vgg16-A", "2.06e8", 34.2, "5.4e6", 64.0),
    ("resnet56", "resnet56-A", "1.12e8", 10.4, "7.7e5", 9.4),
    ("resnet56", "resnet56-B", "9.09e7", 27.6, "7.3e5", 13.7),
    ("resnet110", "resnet110-A", "2.13e8", 15.9, "1.68e6", 2.3),
    ("resnet110", "resnet110-B", "1.55e8", 38.6, "1.16e6", 32.4),
]
DENSE = {"vgg16": ("3.13e8", "1.5e7"), "resnet56": ("1.25e8", "8.5e5"),
         "resnet110": ("2.53e8", "1.72e6")}
# (config, column) -> our exact percentage rounds one digit above the printed one
LAST_DIGIT_HIGHER = {("resnet56-B", "params"), ("resnet110-B", "flops"),
                     ("resnet110-B", "params")}


@pytest.mark.parametrize("model", sorted(DENSE))
def test_dense_baselines(model):
    macs, params = table1_cost(graph_of(model))
    assert printed(macs, DENSE[model][0]) == float(DENSE[model][0])
    assert printed(params, DENSE[model][1]) == float(DENSE[model][1])


@pytest.mark.parametrize("model,config,fl,fl_pct,pa,pa_pct", TABLE1)
def test_table1(model, config, fl, fl_pct, pa, pa_pct):
    graph = graph_of(model)
    masks = index_masks(graph, config)
    dense_macs, dense_params = table1_cost(graph)
    macs, params = table1_cost(graph, masks)
    assert macs == flops.count(graph, masks, convention="conv_fc").macs
    assert printed(macs, fl) == float(fl)
    assert printed(params, pa) == float(pa)
    for column, ours, paper in (("flops", pct(macs, dense_macs), fl_pct),
                                ("params", pct(params, dense_params), pa_pct)):
        if (config, column) in LAST_DIGIT_HIGHER:
            assert round(ours, 1) == pytest.approx(paper + 0.1), (column, ours)
            assert paper < ours < paper + 0.1
        else:
            assert round(ours, 1) == paper, (column, ours)


def test_rounding_and_bn_conventions_that_do_not_match():
    graph = graph_of("resnet56")
    rates = pfec.resolve("resnet56-A", graph)
    sfp = {n: np.ones(g.size, np.float32) for n, g in graph.groups.items()}
    for n, rate in rates.items():
        sfp[n][: selection.num_pruned(graph.groups[n].size, rate, "sfp")] = 0.0
    assert printed(table1_cost(graph, sfp)[0], "1.12e8") != 1.12e8  # floor of the pruned count
    with_bn = flops.count(graph_of("resnet110"), None, "conv_fc").params
    assert printed(with_bn, "1.72e6") == 1.73e6  # BN params counted: not the table's 1.72e6


def test_residual_policy_does_not_change_counts():
    a = table1_cost(graph_of("resnet56"), index_masks(graph_of("resnet56"), "resnet56-B"))
    scatter = graph_of("resnet56", residual="scatter")
    assert table1_cost(scatter, index_masks(scatter, "resnet56-B")) == a


def test_layer_numbering():
    for depth in (56, 110):
        model = get_model(f"resnet{depth}")
        numbering = layer_numbers(graph_of(f"resnet{depth}"))
        assert len(numbering) == depth - 1 and numbering[1] == "stem"
        for b, (block, *_) in enumerate(model.block_names()):
            assert numbering[2 * b + 2] == f"{block}/conv1"
            assert numbering[2 * b + 3] == f"{block}/conv2"
    numbering = layer_numbers(graph_of("vgg16"))
    assert numbering == {i: f"conv{i}" for i in range(1, 14)}
    r34 = layer_numbers(graph_of("resnet34", size=224, classes=1000))
    assert len(r34) == 33 and not any("downsample" in m for m in r34.values())
    blocks = get_model("resnet34").block_names()
    assert all(r34[2 * b + 2] == f"{name}/conv1" for b, (name, *_) in enumerate(blocks))


def test_config_resolution_resnet56_b():
    rates = pfec.resolve("resnet56-B", graph_of("resnet56"))
    expected = {}
    for b in range(27):
        layer = 2 * b + 2
        if layer in (16, 18, 20, 34, 38, 54):
            continue
        stage = 0 if layer <= 18 else 1 if layer <= 36 else 2
        expected[f"layer{stage + 1}_{b % 9}/conv1"] = (0.6, 0.3, 0.1)[stage]
    assert rates == expected


def test_l1_selection_on_real_weights():
    model = get_model("resnet56")
    x = jnp.zeros((1, 32, 32, 3))
    variables = random_variables(model, x)
    graph = graph_of("resnet56")
    masks = pfec_masks(variables, graph, "resnet56-B")
    rates = pfec.resolve("resnet56-B", graph)
    for name, g in graph.groups.items():
        m = np.asarray(masks[name])
        if name not in rates:
            assert np.all(m == 1)
            continue
        block, conv = name.split("/")
        k = np.asarray(variables["params"][block][conv]["kernel"], np.float64)
        l1 = np.abs(k).reshape(-1, g.size).sum(0)
        keep = int(g.size * (1 - rates[name]))
        assert int(m.sum()) == keep
        assert set(np.flatnonzero(m == 0)) == set(np.argsort(l1, kind="stable")[: g.size - keep])


class Chain(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate((6, 5), start=1):
            x = nn.Conv(width, (3, 3), use_bias=False, name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        return nn.Dense(2, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_greedy_ignores_inputs_pruned_upstream():
    model = Chain()
    x = jnp.zeros((1, 5, 5, 2))
    variables = random_variables(model, x, seed=4)
    graph = trace_linen(model, variables, x)
    cfg = PFECConfig("chain", layer_rates=((1, 0.5), (2, 0.4)))
    k1 = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
    k2 = np.asarray(variables["params"]["conv2"]["kernel"], np.float64)
    gone1 = np.argsort(np.abs(k1).reshape(-1, 6).sum(0), kind="stable")[:3]
    live = np.setdiff1d(np.arange(6), gone1)
    independent = np.argsort(np.abs(k2).reshape(-1, 5).sum(0), kind="stable")[:2]
    greedy = np.argsort(np.abs(k2[:, :, live, :]).reshape(-1, 5).sum(0), kind="stable")[:2]
    for selection_rule, gone2 in (("independent", independent), ("greedy", greedy)):
        masks = pfec_masks(variables, graph, cfg, selection=selection_rule)
        assert set(np.flatnonzero(np.asarray(masks["conv1"]) == 0)) == set(gone1)
        assert set(np.flatnonzero(np.asarray(masks["conv2"]) == 0)) == set(gone2)


def test_resnet34_configs():
    """ImageNet ResNet-34: our dense conv+FC count is 3.66e9 vs the table's 3.64e9, so the
    reductions are compared to within 0.2 point (ours: 15.4 / 24.1 / 7.4% FLOPs, 7.6 / 10.7 /
    7.3% params vs 15.5 / 24.2 / 7.5% and 7.6 / 10.8 / 7.2%). The 0.6% gap in the dense figure
    is what running stage 1 at 55x55 instead of 56x56 gives (3.64e9); also checked here."""
    graph = graph_of("resnet34", size=224, classes=1000)
    dense_macs, dense_params = table1_cost(graph)
    assert printed(dense_macs, "3.66e9") == 3.66e9
    for config, fl_pct, pa_pct in (("resnet34-A", 15.5, 7.6), ("resnet34-B", 24.2, 10.8),
                                   ("resnet34-C", 7.5, 7.2)):
        masks = index_masks(graph, config)
        macs, params = table1_cost(graph, masks)
        assert abs(pct(macs, dense_macs) - fl_pct) < 0.2, config
        assert abs(pct(params, dense_params) - pa_pct) < 0.2, config
    # stage 1 at 55 x 55: the dense figure becomes the table's
    per = flops.count(graph, None, "conv_fc").per_layer
    at55 = sum(v * (55 * 55 / 56 / 56 if k.startswith("layer1_") else 1) for k, v in per.items())
    assert printed(at55, "3.64e9") == 3.64e9
    rates = pfec.resolve("resnet34-C", graph)
    assert rates == {"layer3_0/conv2": 0.2}
    assert "layer3_0/downsample" in graph.groups["layer3_0/conv2"].producers
    with pytest.raises(ValueError, match="coupled"):
        pfec.resolve("resnet34-C", graph_of("resnet34", residual="scatter", size=224,
                                            classes=1000))


def test_config_errors():
    graph = graph_of("resnet56")
    with pytest.raises(ValueError, match="unknown PFEC config 'resnet57-A'.*resnet56-A"):
        pfec_masks({}, graph, "resnet57-A")
    with pytest.raises(ValueError, match="rate of layer 3.*1.0"):
        PFECConfig("bad", layer_rates=((3, 1.0),))
    with pytest.raises(ValueError, match="-0.5"):
        PFECConfig("bad", stage_ends=(18, 36), stage_rates=(0.1, -0.5, 0.1))
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        pfec.resolve(PFECConfig("bad", layer_rates=((99, 0.5),)), graph)
    with pytest.raises(ValueError, match="layer 200 does not exist"):
        pfec.resolve(PFECConfig("bad", skip=(200,), stage_ends=(18, 36),
                                stage_rates=(0.1, 0.1, 0.1)), graph)
    with pytest.raises(ValueError, match="55 numbered convs; this model has 19"):
        pfec.resolve("resnet56-A", graph_of("resnet20"))
    with pytest.raises(ValueError, match="selection"):
        pfec_masks({}, graph, "resnet56-A", selection="random")


def test_sensitivity_table_csv_and_plot(tmp_path):
    model = Chain()
    x = jnp.zeros((1, 5, 5, 2))
    variables = random_variables(model, x, seed=2)
    graph = trace_linen(model, variables, x)

    def live_share(v):  # a stand-in for accuracy: share of non-zero conv weights
        ks = [np.asarray(v["params"][c]["kernel"]) for c in ("conv1", "conv2")]
        return sum(np.count_nonzero(k) for k in ks) / sum(k.size for k in ks)

    rates = (0.2, 0.5, 0.8)
    table = pfec.sensitivity(live_share, variables, graph, [1, "conv2"], rates)
    assert table.groups == ("conv1", "conv2") and table.baseline == 1.0
    total = 3 * 3 * 2 * 6 + 3 * 3 * 6 * 5
    for j, r in enumerate(rates):
        gone1 = 6 - int(6 * (1 - r))  # conv1 filters and conv2's matching inputs
        assert table.accuracy[0, j] == pytest.approx(1 - gone1 * (18 + 45) / total)
        gone2 = min(5 - int(5 * (1 - r)), 4)  # 5 * (1 - 0.8) = 0.999..: one is always kept
        assert table.accuracy[1, j] == pytest.approx(1 - gone2 * 54 / total)
    pfec.write_sensitivity_csv(table, str(tmp_path / "s.csv"))
    rows = list(csv.reader(open(tmp_path / "s.csv")))
    assert rows[0] == ["layer", "group", "rate", "accuracy"] and len(rows) == 1 + 2 * 4
    pfec.plot_sensitivity(table, str(tmp_path / "s.png"), title="chain")
    assert (tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        pfec.sensitivity(live_share, variables, graph, [9])
    with pytest.raises(ValueError, match="rate"):
        pfec.sensitivity(live_share, variables, graph, [1], rates=(1.0,))


def test_sensitivity_resumes_rows_already_done_and_reports_each_row(tmp_path):
    model = Chain()
    x = jnp.zeros((1, 5, 5, 2))
    variables = random_variables(model, x, seed=2)
    graph = trace_linen(model, variables, x)
    calls, prepared, saved = [], [], []

    def count(v):
        calls.append(1)
        return float(np.count_nonzero(np.asarray(v["params"]["conv1"]["kernel"])))

    rates = (0.2, 0.5)
    full = pfec.sensitivity(count, variables, graph, [1, "conv2"], rates)
    calls.clear()
    table = pfec.sensitivity(count, variables, graph, [1, "conv2"], rates,
                             done={"conv1": list(full.accuracy[0])}, prepare=prepared.append,
                             on_row=lambda *row: saved.append(row))
    assert len(calls) == 1 + len(rates)  # the baseline and conv2's rates only
    assert prepared == [None, "conv2"]
    assert [r[1] for r in saved] == ["conv2"]
    np.testing.assert_array_equal(table.accuracy, full.accuracy)
    with pytest.raises(ValueError, match="3 rates"):
        pfec.sensitivity(count, variables, graph, [1], (0.1, 0.2, 0.3), done={"conv1": [1.0]})


def test_stage_panels_of_cifar_resnets():
    assert pfec.stage_ends_of("resnet56") == (19, 37)
    assert pfec.stage_ends_of("resnet20") == (7, 13)
    assert pfec.stage_ends_of("vgg16") == ()


# ----------------------------------------------------------------------------- compact retraining


_HALF = {"config": {"name": "resnet20-half", "num_layers": 19, "stage_ends": (6, 12),
                    "stage_rates": (0.5, 0.5, 0.5)}}


def _pfec_tiny_config(tmp_path, name, **changes):
    from conftest import tiny_config_source

    from jaxprune import config as config_lib

    path = tmp_path / f"{name}.py"
    values = dict(method__name="pfec", method__rate=0.0, method__criterion="l1",
                  method__kwargs=_HALF)
    path.write_text(tiny_config_source(**{**values, **changes}))
    return config_lib.load_config(str(path))


def _max_rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def test_retraining_the_compact_model_equals_retraining_the_masked_one(tmp_path):
    """`compact_before_retraining`: the one-shot pruned filters are removed before retraining
    and the smaller model is retrained. Same widths and costs (of the original architecture),
    the compact starting model is exactly the compacted one-shot model, retraining follows the
    same curve to the same function as retraining the masked model, and `jaxprune compact`
    restores the run from its checkpoints.

    Two runs of different programs are equal to float rounding only, and a ReLU input within an
    ulp of zero (about one in a million activations per step here) flips with the summation
    order; SGD at a high LR on this 8-step toy amplifies such a flip chaotically (measured at LR
    0.04: 14% apart in the logits after 8 steps; CI saw 5% in a leaf at 0.05). So the run
    retrains at PFEC's own LR (0.001), where measured flips leave the logits within 0.5% and
    the losses within 6e-5 (4 seeds); a wrong channel, a lost step or a wrong LR would be far
    outside. The exact step-by-step equality is the next test's."""
    import json

    import jaxprune
    from jaxprune.compaction import compact
    from jaxprune.commands.compact import compact_run
    from jaxprune.experiment import RETRAIN_MODEL, run, setup
    from jaxprune.masks import binarize
    from jaxprune.train_step import create_train_state, prune_init

    res = {}
    for flag in (False, True):
        config = _pfec_tiny_config(tmp_path, f"c{flag}", optimizer__base_lr=0.001,
                                   compact_before_retraining=flag)
        res[flag] = run(config, tmp_path / f"run{flag}", progress=False)
    masked, small = res[False], res[True]
    assert small["dense"] == masked["dense"] and small["compact"] == masked["compact"]
    assert small["widths"] == masked["widths"] and small["macs_reduction_conv"] > 0.3
    # the saved starting model is the one-shot pruned model, compacted, bit for bit
    s = setup(config)
    state = create_train_state(s.model, s.graph, jax.random.PRNGKey(config.seed),
                               jnp.zeros((1,) + s.dataset.image_shape), s.optimizer)
    one_shot = prune_init(s.pruner, state)
    want = compact(s.model, one_shot.variables, binarize(one_shot.masks), s.graph).variables
    _, start, _ = jaxprune.load(tmp_path / "runTrue" / RETRAIN_MODEL)
    jax.tree.map(np.testing.assert_array_equal, start, want)
    _, va, _ = jaxprune.load(tmp_path / "runFalse" / "compact")
    model, vb, _ = jaxprune.load(tmp_path / "runTrue" / "compact")
    probe = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
    la, lb = (model.apply(v, probe, train=False) for v in (va, vb))
    assert _max_rel(la, lb) <= 0.03
    curves = [[json.loads(r)["train_loss"] for r in
               (tmp_path / f"run{f}" / "metrics.jsonl").read_text().splitlines()] for f in (False, True)]
    assert len(curves[0]) == 2 and curves[0][1] < curves[0][0]  # it trained
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3)
    assert (tmp_path / "runTrue" / RETRAIN_MODEL).is_dir()
    again = compact_run(tmp_path / "runTrue")
    assert again["compact"] == small["compact"] and again["compact_accuracy"] == small["compact_accuracy"]
    bad = _pfec_tiny_config(tmp_path, "bad", method__name="sfp", method__rate=0.4,
                            method__kwargs={}, compact_before_retraining=True)  # SFP re-selects
    with pytest.raises(ValueError, match="compact_before_retraining=True is not allowed"):
        run(bad, tmp_path / "bad", progress=False)


def test_a_compact_retraining_step_is_the_masked_step(tmp_path):
    """Each retraining step of the compact model computes the same step of the masked model,
    sliced: from the same state (the masked one, its params, BN statistics and momentum sliced
    by the compaction's surgery), on real batches gathered and augmented on the device as `fit`
    runs them, at the tiny config's LR 0.05. Re-synchronised at every step, so that a ReLU flip
    (see the previous test) cannot compound: one flip measured 0.46% of the update's L2 norm
    and 4e-5 of the logits; an agreeing step is at 1e-6; a wrong channel or moment is O(1)."""
    import functools

    from jaxprune import augment as augment_lib
    from jaxprune.batching import epoch_batches
    from jaxprune.compaction import slice_tree, surgery
    from jaxprune.experiment import compact_for_retraining, setup
    from jaxprune.masks import binarize
    from jaxprune.train_step import create_train_state, make_train_chunk, prune_init

    config = _pfec_tiny_config(tmp_path, "c", compact_before_retraining=True)
    s = setup(config)
    ds = s.dataset
    state = create_train_state(s.model, s.graph, jax.random.PRNGKey(config.seed),
                               jnp.zeros((1,) + ds.image_shape), s.optimizer)
    masked = prune_init(s.pruner, state)
    small, small_state, _ = compact_for_retraining(s, masked)  # its fresh state: the template
    axis_keep, _, _ = surgery(binarize(masked.masks), s.graph)
    aug = functools.partial(augment_lib.augment_batch, mean=ds.mean, std=ds.std, flip=False, pad=0)
    step_m, step_c = (make_train_chunk(m.model, m.graph, m.optimizer, m.pruner, steps=1,
                                       augment=aug) for m in (s, small))
    images, labels = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train, jnp.int32)
    order = jnp.asarray(epoch_batches(len(ds.x_train), config.batch_size, config.seed, 0), jnp.int32)
    probe = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)

    def sliced(st):
        return small_state.replace(params=slice_tree(st.params, axis_keep, ("params",)),
                                   batch_stats=slice_tree(st.batch_stats, axis_keep, ("batch_stats",)),
                                   opt_state=slice_tree(st.opt_state, axis_keep, match_suffix=True),
                                   step=st.step, rng=st.rng)

    def l2(a, b):
        return sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) ** 0.5

    for i in range(order.shape[0]):
        start = sliced(masked)
        masked, m_m, _ = step_m(masked, images, labels, order, jnp.int32(i))
        compact_next, m_c, _ = step_c(start, images, labels, order, jnp.int32(i))
        want = sliced(masked)
        np.testing.assert_allclose(m_c["loss"], m_m["loss"], rtol=1e-5)
        update = l2(want.params, start.params)
        assert update > 0 and l2(compact_next.params, want.params) <= 0.03 * update
        assert l2(compact_next.opt_state, want.opt_state) <= 0.03 * l2(want.opt_state, start.opt_state)
        la, lb = (small.model.apply(st.variables, probe, train=False) for st in (want, compact_next))
        assert _max_rel(la, lb) <= 1e-3
