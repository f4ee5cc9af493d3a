"""Selection rules against hand-computed counts and hand-picked channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import selection as sel

RATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
# Worked by hand: SFP prunes floor(N * P); PFEC keeps floor(N * (1 - P)).
SFP_PRUNED = {
    16: [1, 3, 4, 6, 8, 9, 11, 12, 14],
    32: [3, 6, 9, 12, 16, 19, 22, 25, 28],
    64: [6, 12, 19, 25, 32, 38, 44, 51, 57],
}
PFEC_KEPT = {
    16: [14, 12, 11, 9, 8, 6, 4, 3, 1],
    32: [28, 25, 22, 19, 16, 12, 9, 6, 3],
    64: [57, 51, 44, 38, 32, 25, 19, 12, 6],
}


@pytest.mark.parametrize("size", [16, 32, 64])
def test_num_pruned_sfp_vs_pfec_rounding(size):
    for rate, sfp, pfec_kept in zip(RATES, SFP_PRUNED[size], PFEC_KEPT[size]):
        assert sel.num_pruned(size, rate, "sfp") == sfp, (size, rate)
        assert sel.num_pruned(size, rate, "pfec") == size - pfec_kept, (size, rate)


def test_num_pruned_keeps_at_least_one_channel():
    assert sel.num_pruned(3, 0.9, "pfec") == 2  # would keep int(0.3) = 0
    assert sel.num_pruned(1, 0.5, "pfec") == 0
    assert sel.num_pruned(3, 0.9, "sfp") == 2
    assert sel.num_pruned(10, 0.0, "pfec") == 0


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), 1.5, True])
def test_num_pruned_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        sel.num_pruned(16, rate)


def test_num_pruned_rejects_bad_rounding_and_size():
    with pytest.raises(ValueError, match=r"'floor'.*sfp, pfec"):
        sel.num_pruned(16, 0.5, "floor")
    with pytest.raises(ValueError, match="0"):
        sel.num_pruned(0, 0.5)


def _scores():
    return {
        "a": jnp.asarray([0.3, 0.1, 0.4, 0.2]),
        "b": jnp.asarray([5.0, 1.0, 3.0]),
        "c": jnp.asarray([2.0, 2.0, 2.0, 2.0, 1.0, 9.0]),
    }


def _zeros(mask):
    return [i for i, v in enumerate(np.asarray(mask)) if v == 0]


def test_prune_by_rate_prunes_lowest_and_breaks_ties_by_index():
    masks = sel.prune_by_rate(_scores(), 0.5)
    assert all(m.dtype == jnp.float32 for m in masks.values())
    assert set(np.unique(np.concatenate([np.asarray(m) for m in masks.values()]))) <= {0.0, 1.0}
    assert _zeros(masks["a"]) == [1, 3]
    assert _zeros(masks["b"]) == [1]  # int(1.5) = 1
    assert _zeros(masks["c"]) == [0, 1, 4]  # 1.0, then ties 2.0 at 0..3 by index


def test_prune_by_rate_rounding_and_group_subset():
    masks = sel.prune_by_rate(_scores(), 0.5, rounding="pfec", groups=["b"])
    assert _zeros(masks["b"]) == [1, 2]  # keeps int(1.5) = 1
    np.testing.assert_array_equal(masks["a"], np.ones(4))
    np.testing.assert_array_equal(masks["c"], np.ones(6))
    with pytest.raises(ValueError, match=r"'z'.*\['a', 'b', 'c'\]"):
        sel.prune_by_rate(_scores(), 0.5, groups=["z"])


def test_prune_by_count():
    masks = sel.prune_by_count(_scores(), {"a": 3, "c": 0})
    assert _zeros(masks["a"]) == [0, 1, 3]
    np.testing.assert_array_equal(masks["b"], np.ones(3))
    np.testing.assert_array_equal(masks["c"], np.ones(6))
    with pytest.raises(ValueError, match="'a'"):
        sel.prune_by_count(_scores(), {"a": 4})  # would prune every channel
    with pytest.raises(ValueError, match="'q'"):
        sel.prune_by_count(_scores(), {"q": 1})


def test_prune_by_rates_skip_semantics():
    rates = {"a": 0.5, "b": 0.5}
    masks = sel.prune_by_rates(_scores(), rates, skip=["b"])
    assert _zeros(masks["a"]) == [1, 3]
    np.testing.assert_array_equal(masks["b"], np.ones(3))  # skip wins over rates
    np.testing.assert_array_equal(masks["c"], np.ones(6))  # not in rates
    # default rounding is PFEC: b keeps int(3 * 0.5) = 1
    assert _zeros(sel.prune_by_rates(_scores(), rates)["b"]) == [1, 2]
    assert _zeros(sel.prune_by_rates(_scores(), rates, rounding="sfp")["b"]) == [1]


def test_prune_by_rates_unknown_names():
    with pytest.raises(ValueError, match=r"rates.*'x'.*valid groups.*'a', 'b', 'c'"):
        sel.prune_by_rates(_scores(), {"a": 0.5, "x": 0.1})
    with pytest.raises(ValueError, match=r"skip.*'y'.*valid groups"):
        sel.prune_by_rates(_scores(), {"a": 0.5}, skip=("y",))


def test_global_threshold_raw_scores_picks_globally_smallest():
    scores = {"a": jnp.asarray([0.1, 0.5, 0.9]), "b": jnp.asarray([5.0, 1.0, 3.0])}
    masks = sel.prune_by_global_threshold(scores, 0.5, normalize=False)
    # 3 of 6: 0.1, 0.5 and 0.9 are smallest but 0.9 is a's last channel -> 1.0 of b instead
    assert _zeros(masks["a"]) == [0, 1]
    assert _zeros(masks["b"]) == [1]


def test_global_threshold_normalizations():
    scores = {"a": jnp.asarray([0.1, 0.5, 0.9]), "b": jnp.asarray([5.0, 1.0, 3.0])}
    # max: a -> [.111, .556, 1], b -> [1, .2, .6]; 3 smallest: a0, b1, a1
    masks = sel.prune_by_global_threshold(scores, 0.5, normalize="max")
    assert _zeros(masks["a"]) == [0, 1] and _zeros(masks["b"]) == [1]
    masks = sel.prune_by_global_threshold(scores, 0.34, normalize=True)  # int(2.04) = 2
    assert _zeros(masks["a"]) == [0] and _zeros(masks["b"]) == [1]
    # l2: a / 1.034 -> [.097, .483, .870], b / 5.916 -> [.845, .169, .507];
    # 3 smallest: a0 (.097), b1 (.169), a1 (.483) -- b2 (.507) is the 4th
    masks = sel.prune_by_global_threshold(scores, 0.5, normalize="l2")
    assert _zeros(masks["a"]) == [0, 1] and _zeros(masks["b"]) == [1]
    with pytest.raises(ValueError, match=r"'l1'.*'max', 'l2'"):
        sel.prune_by_global_threshold(scores, 0.5, normalize="l1")


def test_global_threshold_keeps_one_per_group():
    scores = {"a": jnp.asarray([0.01, 0.02, 0.03]), "b": jnp.asarray([100.0, 200.0, 300.0])}
    masks = sel.prune_by_global_threshold(scores, 0.6, normalize=False)  # 3 pruned
    assert _zeros(masks["a"]) == [0, 1] and _zeros(masks["b"]) == [0]
    masks = sel.prune_by_global_threshold(scores, 0.9, normalize=False)  # 5 -> capped at 4
    assert _zeros(masks["a"]) == [0, 1] and _zeros(masks["b"]) == [0, 1]


def test_global_threshold_matches_numpy_reference_and_group_subset():
    rng = np.random.default_rng(0)
    scores = {n: jnp.asarray(rng.uniform(size=s), jnp.float32) for n, s in [("a", 7), ("b", 12), ("c", 5)]}
    masks = sel.prune_by_global_threshold(scores, 0.4, groups=["a", "b"], normalize=False)
    np.testing.assert_array_equal(masks["c"], np.ones(5))
    flat = np.concatenate([np.asarray(scores["a"]), np.asarray(scores["b"])])
    protected = {int(np.argmax(scores["a"])), 7 + int(np.argmax(scores["b"]))}
    candidates = [i for i in np.argsort(flat, kind="stable") if i not in protected]
    pruned = set(candidates[: int(19 * 0.4)])
    got = np.concatenate([np.asarray(masks["a"]), np.asarray(masks["b"])])
    assert {i for i in range(19) if got[i] == 0} == pruned


def test_global_order_by_hand_numpy_and_jax_alike():
    # a = [3, 1] (best a0 at position 0), b = [2, 5, 0] (best b1 at position 3):
    # unprotected by score: b2 (0), a1 (1), b0 (2); then the protected by score: a0 (3), b1 (5)
    scores = {"a": np.array([3.0, 1.0]), "b": np.array([2.0, 5.0, 0.0])}
    order = sel.global_order(scores, ["a", "b"])
    assert isinstance(order, np.ndarray) and order.tolist() == [4, 1, 2, 0, 3]
    got = sel.global_order({n: jnp.asarray(v, jnp.float32) for n, v in scores.items()}, ["a", "b"])
    assert isinstance(got, jax.Array) and got.tolist() == [4, 1, 2, 0, 3]
    # ties go to the lower position; only the groups named are ordered, in the order named
    assert sel.global_order({"a": np.array([1.0, 1.0, 2.0]), "z": np.array([0.0])}, ["a"]).tolist() == [0, 1, 2]
    assert sel.global_order(scores, ["b", "a"]).tolist() == [2, 4, 0, 3, 1]


def test_global_order_keeps_host_precision():
    # 1 + 2^-40 and 1 + 2^-41 differ in float64 but are both 1.0 in float32: numpy in keeps them apart
    a = np.array([1.0 + 2.0**-40, 1.0 + 2.0**-41, 2.0])
    assert sel.global_order({"a": a}, ["a"]).tolist() == [1, 0, 2]
    assert sel.global_order({"a": jnp.asarray(a, jnp.float32)}, ["a"]).tolist() == [0, 1, 2]


def test_prune_first_by_hand_and_with_a_traced_count():
    order = np.array([4, 1, 2, 0, 3])
    masks = sel.prune_first(order, 3, ["a", "b"], [2, 3])  # positions 4, 1, 2 pruned
    assert masks["a"].tolist() == [1.0, 0.0] and masks["b"].tolist() == [0.0, 1.0, 0.0]
    assert masks["a"].dtype == np.float32 and isinstance(masks["a"], np.ndarray)
    fn = jax.jit(lambda k: sel.prune_first(jnp.asarray(order), k, ["a", "b"], [2, 3]))
    for k in range(6):
        want = sel.prune_first(order, k, ["a", "b"], [2, 3])
        got = fn(jnp.int32(k))
        assert all(np.array_equal(got[n], want[n]) for n in want), k
    assert fn._cache_size() == 1  # one trace for every count


def test_jit_does_not_recompile_when_scores_change():
    traces = {"rate": 0, "rates": 0, "global": 0}

    def by_rate(s):
        traces["rate"] += 1
        return sel.prune_by_rate(s, 0.5)

    def by_rates(s):
        traces["rates"] += 1
        return sel.prune_by_rates(s, {"a": 0.5, "c": 0.3}, skip=["c"])

    def by_global(s):
        traces["global"] += 1
        return sel.prune_by_global_threshold(s, 0.5, normalize="l2")

    fns = {"rate": jax.jit(by_rate), "rates": jax.jit(by_rates), "global": jax.jit(by_global)}
    eager = {"rate": by_rate, "rates": by_rates, "global": by_global}
    rng = np.random.default_rng(0)
    for _ in range(3):
        scores = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in _scores().items()}
        for key, fn in fns.items():
            got = fn(scores)
            ref = eager[key](scores)
            for name in ref:
                np.testing.assert_array_equal(got[name], ref[name])
    assert traces == {"rate": 1 + 3, "rates": 1 + 3, "global": 1 + 3}  # 1 trace each + eager calls


def test_traced_rate_is_refused():
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda r: sel.prune_by_rate(_scores(), r))(0.5)


def test_keep_hard_and_hard_first():
    masks = {"a": jnp.asarray([1.0, 0.5, 0.0, 1.0]), "b": jnp.ones(3)}
    hard = {"a": jnp.asarray([0.0, 1.0, 1.0, 1.0])}
    out = sel.keep_hard(masks, hard)
    np.testing.assert_array_equal(out["a"], [0.0, 0.5, 0.0, 1.0])
    np.testing.assert_array_equal(out["b"], np.ones(3))
    scores = sel.hard_first({"a": jnp.asarray([0.1, 0.5, 0.2, 0.9])}, {"a": jnp.asarray([1.0, 1.0, 1.0, 0.0])})
    assert _zeros(sel.prune_by_rate(scores, 0.5)["a"]) == [0, 3]


def test_grow_hard_takes_lowest_of_selected_and_keeps_old_hard():
    scores = {"a": jnp.asarray([0.5, 0.1, 0.4, 0.3, 0.9, 0.2])}
    selected = {"a": jnp.asarray([0.0, 0.0, 1.0, 0.0, 1.0, 0.0])}  # S = {0, 1, 3, 5}
    hard = {"a": jnp.asarray([0.0, 1.0, 1.0, 1.0, 1.0, 1.0])}  # 0 already hard
    # floor(0.5 * 4) = 2: the old hard channel 0 first, then the lowest score in S (1)
    out = sel.grow_hard(scores, selected, hard, 0.5)
    assert _zeros(out["a"]) == [0, 1]
    # fraction 0.75 -> 3: then channel 5 (0.2)
    assert _zeros(sel.grow_hard(scores, selected, hard, 0.75)["a"]) == [0, 1, 5]
    # old hard outside S stays hard; fraction 0 hardens nothing new
    hard2 = {"a": jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 1.0])}
    assert _zeros(sel.grow_hard(scores, selected, hard2, 0.0)["a"]) == [4]
    # jittable with a traced fraction, one trace for all fractions
    traces = []
    fn = jax.jit(lambda h: (traces.append(1), sel.grow_hard(scores, selected, hard, h))[1])
    assert _zeros(fn(jnp.float32(0.75))["a"]) == [0, 1, 5]
    assert _zeros(fn(jnp.float32(1.0))["a"]) == [0, 1, 3, 5]
    assert len(traces) == 1


def test_grow_hard_with_counts_and_nan_scores():
    scores = {"a": jnp.asarray([0.5, 0.1, jnp.nan, 0.3, 0.9, 0.2])}
    selected = {"a": jnp.asarray([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])}  # S = {0, 1, 2, 3}
    hard = {"a": jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])}  # 5 hard (outside S)
    # k = 2: the NaN channel (lowest), then 0.1; the old hard 5 stays
    assert _zeros(sel.grow_hard(scores, selected, hard, counts={"a": 2})["a"]) == [1, 2, 5]
    fn = jax.jit(lambda k: sel.grow_hard(scores, selected, hard, counts={"a": k}))
    assert _zeros(fn(jnp.int32(3))["a"]) == [1, 2, 3, 5]
    assert _zeros(fn(jnp.int32(0))["a"]) == [5]
    with pytest.raises(ValueError, match="exactly one of fraction= and counts="):
        sel.grow_hard(scores, selected, hard, 0.5, counts={"a": 1})
    with pytest.raises(ValueError, match="exactly one of fraction= and counts="):
        sel.grow_hard(scores, selected, hard)


def test_ranks_pruned_count_and_traced_counts_select_like_static_ones():
    s = jnp.asarray([0.3, 0.1, 0.3, jnp.nan, 0.2])
    np.testing.assert_array_equal(sel.ranks(s), [3, 1, 4, 0, 2])  # NaN lowest, ties by index
    # int(N P) on the host (float64) and traced (float32), capped at N - 1
    assert sel.pruned_count(10, 0.35) == 3 and isinstance(sel.pruned_count(10, 0.35), int)
    assert sel.pruned_count(4, 0.99) == 3
    traced = jax.jit(lambda r: sel.pruned_count(10, r))
    assert int(traced(jnp.float32(0.35))) == 3 and int(traced(jnp.float32(0.0))) == 0
    assert int(jax.jit(lambda r: sel.pruned_count(4, r))(jnp.float32(0.99))) == 3
    traces = []
    fn = jax.jit(lambda n: (traces.append(1), sel.prune_by_count({"g": s}, {"g": n}))[1])
    for n in range(5):
        want = sel.prune_by_count({"g": s}, {"g": n})["g"]
        np.testing.assert_array_equal(fn(jnp.int32(n))["g"], want)
        assert _zeros(want) == sorted([3, 1, 4, 0, 2].index(r) for r in range(n))
    assert len(traces) == 1


# ----------------------------------------------------------------------------- width policies


def test_rounded_counts_never_below_selected_never_zero_never_above_size():
    from jaxprune.selection import WidthPolicy

    for n in (1, 2, 4, 8, 16):
        up, down = WidthPolicy(n), WidthPolicy(n, "down")
        for size in range(1, 70):
            for kept in range(1, size + 1):
                u, d = up.kept(size, kept), down.kept(size, kept)
                assert kept <= u <= size and (u % n == 0 or u == size)
                assert 1 <= d <= size and (d % n == 0 or d == size or d == kept)
                assert d <= kept or d == min(n, size)
                if kept % n == 0:
                    assert u == d == kept
    with pytest.raises(ValueError, match="round_to=0"):
        WidthPolicy(0)
    with pytest.raises(ValueError, match="direction='sideways'"):
        WidthPolicy(8, "sideways")


def test_latency_table_choice_is_the_argmin_at_or_above_the_selected_count():
    from jaxprune.selection import WidthPolicy

    table = {"g": {8: 3.0, 12: 1.0, 16: 2.0, 24: 0.5, 32: 4.0}}
    p = WidthPolicy(latency=table)
    for kept in range(1, 33):
        options = {w: t for w, t in table["g"].items() if w >= kept}
        want = min(options, key=lambda w: (options[w], w)) if options else kept
        assert p.kept(32, kept, "g") == want
    assert p.kept(32, 5, "other") == 5  # no table: exact
    ties = WidthPolicy(latency={"g": {8: 1.0, 16: 1.0}})
    assert ties.kept(16, 3, "g") == 8  # a tie goes to the narrower width
    assert hash(p) == hash(WidthPolicy(latency=table))  # hashable: methods are static jit args


def test_prune_by_rate_with_width_keeps_the_best_filters():
    from jaxprune.selection import WidthPolicy

    scores = {"a": jnp.arange(16.0), "b": jnp.arange(32.0)[::-1]}
    m = sel.prune_by_rate(scores, 0.4, width=WidthPolicy(8))
    assert int(m["a"].sum()) == 16 and int(m["b"].sum()) == 24  # 10 -> 16, 20 -> 24
    np.testing.assert_array_equal(np.asarray(m["b"])[:24], 1.0)  # the 24 highest scores
