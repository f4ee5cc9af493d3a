"""Reshapes that split or merge a narrowed channel axis (a GroupNorm's groups, attention heads)
run narrow in a compact program: `jaxprune.graph.narrow.reshape` against the full-width
reference (`full_width`: zero-filled operands, results sliced), and `reshape_blocks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.graph.links import reshape_blocks
from jaxprune.graph.narrow import full_width, reshape, take


def test_reshape_blocks_pairs_runs_of_equal_size():
    assert reshape_blocks([2, 12], [2, 3, 4]) == [([0], [0]), ([1], [1, 2])]
    assert reshape_blocks([1, 4, 4, 8], [1, 4, 4, 2, 4]) == [([], []), ([1], [1]), ([2], [2]),
                                                            ([3], [3, 4])]
    assert reshape_blocks([5, 3, 2, 4], [5, 24]) == [([0], [0]), ([1, 2, 3], [1])]
    assert reshape_blocks([6, 4], [4, 6]) == [([0, 1], [0, 1])]  # regrouped: one block


def _eqn(shape_in, shape_out):
    x = jnp.arange(np.prod(shape_in), dtype=jnp.float32).reshape(shape_in)
    jaxpr = jax.make_jaxpr(lambda a: jnp.reshape(a, shape_out))(x)
    (eqn,) = jaxpr.jaxpr.eqns
    return eqn, x


def test_a_group_split_on_kept_channels_of_every_group_runs_narrow():
    """[2, 8] -> [2, 2, 4] keeping channels 1 and 3 of each group of 4: positions 1, 3, 5, 7."""
    eqn, x = _eqn((2, 8), (2, 2, 4))
    kin = ((None, np.array([1, 3, 5, 7])),)
    kout = ((None, None, np.array([1, 3])),)
    got = reshape(eqn, [take(x, kin[0])], kin, kout)
    assert got is not None and got[0].shape == (2, 2, 2)
    np.testing.assert_array_equal(got[0], full_width(eqn, [take(x, kin[0])], kin, kout)[0])
    np.testing.assert_array_equal(got[0][1], [[9, 11], [13, 15]])  # hand: row 1 is 8..15


def test_a_merge_of_kept_heads_runs_narrow_and_moves_to_the_result_keep():
    """[3, 2, 4] -> [3, 8]: heads 0 and 1 kept with head dims 0, 2 (a product: 0, 2, 4, 6);
    the result keeps positions 0, 2, 6 (and the zero at 4's place is dropped)."""
    eqn, x = _eqn((3, 2, 4), (3, 8))
    kin = ((None, None, np.array([0, 2])),)
    kout = ((None, np.array([0, 2, 6])),)
    xs = take(x, kin[0])
    got = reshape(eqn, [xs], kin, kout)
    np.testing.assert_array_equal(got[0], full_width(eqn, [xs], kin, kout)[0])
    np.testing.assert_array_equal(got[0][0], [0, 2, 6])


def test_a_split_whose_keep_is_no_product_is_zero_filled_exactly():
    """Positions 1 and 4 of [8] -> [2, 4] are not the same channels of both groups: the parts
    keep their union (channels 0 and 1 of each group) and the missing positions are zeros."""
    eqn, x = _eqn((8,), (2, 4))
    kin = ((np.array([1, 4]),),)
    kout = ((None, np.array([0, 1])),)
    got = reshape(eqn, [take(x, kin[0])], kin, kout)
    np.testing.assert_array_equal(got[0], full_width(eqn, [take(x, kin[0])], kin, kout)[0])
    np.testing.assert_array_equal(got[0], [[0, 1], [4, 0]])


def test_a_regrouping_reshape_falls_back_to_full_width():
    eqn, x = _eqn((6, 4), (4, 6))
    assert reshape(eqn, [take(x, ((np.array([0, 1]), None)))], ((np.array([0, 1]), None),),
                   ((None, None),)) is None
