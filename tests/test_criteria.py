"""Criteria against float64 numpy references on hand-built groups."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import criteria
from jaxprune.graph import Group, Member


def _idx(values):
    return np.asarray(values, dtype=np.int64).reshape(len(values), -1)


def _setup():
    rng = np.random.default_rng(0)
    k1 = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO, 4 filters
    k2 = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    ka = rng.normal(size=(1, 1, 2, 3)).astype(np.float32)  # residual producers, 3 channels
    kb = rng.normal(size=(1, 1, 5, 3)).astype(np.float32)
    dense = rng.normal(size=(6, 4)).astype(np.float32)  # 'out' along axis 0, 2 rows per channel
    variables = {
        "params": {
            "conv1": {"kernel": jnp.asarray(k1)},
            "bn1": {"scale": jnp.asarray([0.5, -2.0, 1.0, 0.0]), "bias": jnp.ones(4)},
            "conv2": {"kernel": jnp.asarray(k2)},
            "conva": {"kernel": jnp.asarray(ka)},
            "bna": {"scale": jnp.asarray([1.0, -3.0, 0.25])},
            "convb": {"kernel": jnp.asarray(kb)},
            "bnb": {"scale": jnp.asarray([2.0, 0.5, -1.0])},
            "fc": {"kernel": jnp.asarray(dense)},
        },
        "batch_stats": {"bn1": {"mean": jnp.zeros(4), "var": jnp.ones(4)}},
    }
    g1 = Group(
        name="conv1",
        size=4,
        members=(
            Member(("params", "conv1", "kernel"), 3, _idx(range(4)), "out"),
            Member(("params", "bn1", "scale"), 0, _idx(range(4)), "vector"),
            Member(("params", "bn1", "bias"), 0, _idx(range(4)), "vector"),
            Member(("batch_stats", "bn1", "mean"), 0, _idx(range(4)), "vector"),
            Member(("params", "conv2", "kernel"), 2, _idx(range(4)), "in"),
        ),
        producers=("conv1",),
        kind="conv",
    )
    perm = [2, 0, 1]  # group channel c is convb's filter perm[c]
    g_res = Group(
        name="conva",
        size=3,
        members=(
            Member(("params", "conva", "kernel"), 3, _idx(range(3)), "out"),
            Member(("params", "bna", "scale"), 0, _idx(range(3)), "vector"),
            Member(("params", "convb", "kernel"), 3, _idx(perm), "out"),
            Member(("params", "bnb", "scale"), 0, _idx(perm), "vector"),
        ),
        producers=("conva", "convb"),
        kind="conv",
    )
    g_fc = Group(
        name="fc",
        size=3,
        members=(
            Member(("params", "fc", "kernel"), 0, np.array([[4, 5], [0, 1], [2, 3]]), "out"),
        ),
        producers=("fc",),
        kind="dense",
    )
    graph = SimpleNamespace(groups={"conv1": g1, "conva": g_res, "fc": g_fc})
    filters = {  # float64 reference filters: {group: [per producer [C, D]]}
        "conv1": [np.stack([k1[..., c].ravel() for c in range(4)]).astype(np.float64)],
        "conva": [
            np.stack([ka[..., c].ravel() for c in range(3)]).astype(np.float64),
            np.stack([kb[..., perm[c]].ravel() for c in range(3)]).astype(np.float64),
        ],
        "fc": [
            np.stack(
                [dense[[4, 5]].ravel(), dense[[0, 1]].ravel(), dense[[2, 3]].ravel()]
            ).astype(np.float64)
        ],
    }
    return variables, graph, filters


def test_l1_l2_match_numpy_including_coupled_and_multirow_members():
    variables, graph, filters = _setup()
    l1 = criteria.l1_norm(variables, graph)
    l2 = criteria.l2_norm(variables, graph)
    assert list(l1) == ["conv1", "conva", "fc"]
    for name, parts in filters.items():
        ref_l1 = sum(np.abs(p).sum(axis=1) for p in parts)
        ref_l2 = np.sqrt(sum((p**2).sum(axis=1) for p in parts))
        assert l1[name].dtype == jnp.float32 and l1[name].shape == (graph.groups[name].size,)
        np.testing.assert_allclose(l1[name], ref_l1, rtol=1e-5)
        np.testing.assert_allclose(l2[name], ref_l2, rtol=1e-5)


def test_l1_of_tiny_kernel_by_hand():
    kernel = jnp.asarray([[1.0, -2.0], [-3.0, 4.0]])  # dense [in=2, out=2]
    group = Group("d", 2, (Member(("params", "d", "kernel"), 1, _idx([0, 1]), "out"),), ("d",), "dense")
    graph = SimpleNamespace(groups={"d": group})
    variables = {"params": {"d": {"kernel": kernel}}}
    np.testing.assert_allclose(criteria.l1_norm(variables, graph)["d"], [4.0, 6.0])
    np.testing.assert_allclose(criteria.l2_norm(variables, graph)["d"], [np.sqrt(10), np.sqrt(20)], rtol=1e-6)


def _fpgm_brute_force(parts):
    total = 0.0
    for w in parts:
        sums = np.zeros(w.shape[0])
        for i in range(w.shape[0]):
            for j in range(w.shape[0]):
                if i != j:
                    sums[i] += np.linalg.norm(w[i] - w[j])
        total = total + sums
    return total


def test_fpgm_matches_brute_force_loop():
    variables, graph, filters = _setup()
    scores = criteria.fpgm(variables, graph)
    for name, parts in filters.items():
        np.testing.assert_allclose(scores[name], _fpgm_brute_force(parts), rtol=1e-5)


def test_fpgm_geometric_median_filter_scores_lowest_and_is_accurate_far_from_origin():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(1, 1, 8, 1))
    offsets = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 3.0])  # collinear; median at 0.0 (index 2)
    kernel = (100.0 + base * 0.01 * offsets).astype(np.float32)  # large, close filters
    group = Group("c", 6, (Member(("params", "c", "kernel"), 3, _idx(range(6)), "out"),), ("c",), "conv")
    graph = SimpleNamespace(groups={"c": group})
    scores = criteria.fpgm({"params": {"c": {"kernel": jnp.asarray(kernel)}}}, graph)["c"]
    ref = _fpgm_brute_force([np.stack([kernel[..., c].ravel() for c in range(6)]).astype(np.float64)])
    assert int(jnp.argmin(scores)) == 2
    np.testing.assert_allclose(scores, ref, rtol=2e-3)


def test_bn_scale_sums_abs_gamma_over_the_groups_scales():
    variables, graph, _ = _setup()
    graph = SimpleNamespace(groups={k: graph.groups[k] for k in ("conv1", "conva")})
    scores = criteria.bn_scale(variables, graph)
    np.testing.assert_allclose(scores["conv1"], [0.5, 2.0, 1.0, 0.0])
    # bna: [1, 3, 0.25]; bnb permuted by [2, 0, 1]: [1, 2, 0.5]
    np.testing.assert_allclose(scores["conva"], [2.0, 5.0, 0.75])


def test_bn_scale_without_bn_names_the_group():
    variables, graph, _ = _setup()
    with pytest.raises(ValueError, match="'fc'"):
        criteria.bn_scale(variables, graph)


def test_group_without_filters_is_an_error():
    group = Group("v", 2, (Member(("params", "bn", "scale"), 0, _idx([0, 1]), "vector"),), (), "conv")
    graph = SimpleNamespace(groups={"v": group})
    with pytest.raises(ValueError, match="'v'"):
        criteria.l1_norm({"params": {"bn": {"scale": jnp.ones(2)}}}, graph)


@pytest.mark.parametrize("name", sorted(criteria.CRITERIA))
def test_criteria_jit_equal_eager(name):
    variables, graph, _ = _setup()
    if name == "bn_scale":
        graph = SimpleNamespace(groups={k: graph.groups[k] for k in ("conv1", "conva")})
    fn = criteria.get_criterion(name)
    eager = fn(variables, graph)
    jitted = jax.jit(lambda v: fn(v, graph))(variables)
    for key in eager:
        np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-5)


def test_bfloat16_params_give_float32_scores():
    variables, graph, filters = _setup()
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
    scores = criteria.l2_norm(variables, graph)
    assert all(s.dtype == jnp.float32 for s in scores.values())
    np.testing.assert_allclose(
        scores["conv1"], np.sqrt((filters["conv1"][0] ** 2).sum(axis=1)), rtol=2e-2
    )


def test_registry_and_get_criterion():
    assert criteria.CRITERIA == {
        "l1": criteria.l1_norm,
        "l2": criteria.l2_norm,
        "fpgm": criteria.fpgm,
        "bn_scale": criteria.bn_scale,
    }
    assert criteria.get_criterion("fpgm") is criteria.fpgm
    with pytest.raises(ValueError, match=r"'l3'.*bn_scale, fpgm, l1, l2"):
        criteria.get_criterion("l3")
