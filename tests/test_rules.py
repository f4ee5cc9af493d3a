"""The per-primitive rule registry (`jaxprune.graph.rules`): one rule per primitive serves both
the trace (which channels flow where) and the compaction of a traced program (how it runs narrow).

Each primitive below sits between two convolutions of a tiny model: the trace must keep the
first conv prunable through it, and the compacted program must equal the hard-masked dense
model, running the primitive itself on the narrowed channels.
"""

from __future__ import annotations

import contextlib

import jax
import jax.extend.random as jrandom
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jcore
from jax.interpreters import mlir
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.compaction import compact_program
from jaxprune.graph import RULES, register_rule, rule_for, trace
from jaxprune.graph import links, narrow
from jaxprune.masks import apply_masks

WIDTH = 8
KEEP = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)  # 4 of 8 channels of the first conv
DN = ("NHWC", "HWIO", "NHWC")


def _variables():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"params": {"c1": {"kernel": jax.random.normal(k1, (3, 3, 3, WIDTH))},
                       "c2": {"kernel": jax.random.normal(k2, (3, 3, WIDTH, 4))}}}


def _model(between):
    """conv -> ``between`` -> conv -> spatial mean: the first conv's channels pass ``between``."""

    def fn(v, x):
        h = lax.conv_general_dilated(x, v["params"]["c1"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=DN)
        h = between(h)
        y = lax.conv_general_dilated(h, v["params"]["c2"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=DN)
        return y.mean(axis=(1, 2))

    return fn


def _as_int(op):
    """``op`` on the integer part of the activations (a quantised path)."""
    return lambda h: op(jnp.round(h * 4).astype(jnp.int32)).astype(jnp.float32)


def _threefry(h):
    """Random bits keyed by position: a mask drawn per channel, as dropout draws one."""
    shape = h.shape
    c1 = lax.broadcasted_iota(jnp.uint32, shape, 3) + lax.broadcasted_iota(jnp.uint32, shape, 1)
    c2 = lax.broadcasted_iota(jnp.uint32, shape, 2)
    bits, _ = jrandom.threefry2x32_p.bind(jnp.uint32(7), jnp.uint32(11), c1, c2)
    return h * (bits & 1).astype(h.dtype)


def _one_device_mesh(kind):
    return jax.make_mesh((1,), ("d",), axis_types=(kind,))


# a stand-in for `mesh_cast` (this JAX has no such primitive; older ones emit it): an identity
# with a `dst_sharding` parameter, looked up by name like the real one
_mesh_cast = jcore.Primitive("mesh_cast")
_mesh_cast.def_impl(lambda x, *, dst_sharding: x)
_mesh_cast.def_abstract_eval(lambda x, *, dst_sharding: x)
mlir.register_lowering(_mesh_cast, mlir.lower_fun(lambda x, *, dst_sharding: x,
                                                  multiple_results=False))

RECONCILED = {
    # primitive: (the op between the convs, a mesh context, whether its sharding partitions
    # the channel axis, so that it must run at full width)
    "sharding_constraint": (lambda h: lax.with_sharding_constraint(
        h, NamedSharding(_one_device_mesh(AxisType.Auto), P("d"))), None, False),
    "device_put": (lambda h: jax.device_put(h, jax.devices()[0]), None, False),
    "mesh_cast": (lambda h: _mesh_cast.bind(h, dst_sharding=None), None, False),
    "reshard": (lambda h: jax.sharding.reshard(h, P("d")), AxisType.Explicit, False),
    "population_count": (_as_int(lax.population_count), None, False),
    "shift_left": (_as_int(lambda i: lax.shift_left(i, 1)), None, False),
    "shift_right_logical": (_as_int(lambda i: lax.shift_right_logical(i, 1)), None, False),
    "shift_right_arithmetic": (_as_int(lambda i: lax.shift_right_arithmetic(i, 1)), None, False),
    "threefry2x32": (_threefry, None, False),
}


def _eqns(jaxpr, name):
    """Every equation of primitive ``name`` in ``jaxpr`` and its sub-jaxprs."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            out.append(eqn)
        for p in ("jaxpr", "call_jaxpr"):
            sub = eqn.params.get(p)
            if sub is not None:
                out.extend(_eqns(getattr(sub, "jaxpr", sub), name))
    return out


def _trace_and_compact(fn, x):
    variables = _variables()
    graph = trace(fn, variables, x)
    masks = {"c1": KEEP}
    program, small = compact_program(fn, variables, masks, graph, (x,))
    ref = fn(apply_masks(variables, masks, graph), x)
    return graph, program, small, ref


@pytest.mark.parametrize("name", sorted(RECONCILED))
def test_reconciled_primitive_traces_and_compacts_narrow_and_exact(name):
    between, mesh_kind, _ = RECONCILED[name]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
    fn = _model(between)
    ctx = jax.sharding.set_mesh(_one_device_mesh(mesh_kind)) if mesh_kind else contextlib.nullcontext()
    with ctx:
        assert _eqns(jax.make_jaxpr(fn)(_variables(), x).jaxpr, name), f"no {name} in the program"
        graph, program, small, ref = _trace_and_compact(fn, x)
        assert "c1" in graph.groups and graph.groups["c1"].size == WIDTH, graph.summary()
        assert small["params"]["c1"]["kernel"].shape[-1] == int(KEEP.sum())
        got = program(small, x)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
        # the primitive itself ran on the kept channels, not at full width
        eqns = _eqns(jax.make_jaxpr(program)(small, x).jaxpr, name)
    assert eqns and all(e.outvars[0].aval.shape[-1] == int(KEEP.sum()) for e in eqns), name
    assert rule_for(name).narrow is not None


def test_a_sharding_that_partitions_a_pruned_axis_runs_at_full_width_and_exact():
    # a placement's kept count need not divide the mesh: such a primitive keeps the dense width
    mesh = _one_device_mesh(AxisType.Auto)
    fn = _model(lambda h: lax.with_sharding_constraint(h, NamedSharding(mesh, P(None, None, None, "d"))))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
    graph, program, small, ref = _trace_and_compact(fn, x)
    np.testing.assert_array_equal(np.asarray(program(small, x)), np.asarray(ref))
    eqns = _eqns(jax.make_jaxpr(program)(small, x).jaxpr, "sharding_constraint")
    assert eqns and all(e.outvars[0].aval.shape[-1] == WIDTH for e in eqns)


def test_every_elementwise_rule_narrows_elementwise():
    # one registry: a primitive traced as elementwise is compacted as elementwise
    for name, rule in RULES.items():
        if rule.link in (links.elementwise, links.copy):
            assert rule.narrow in (narrow.elementwise, narrow.sharded), name
        if rule.bodies:
            assert name in ("scan", "cond", "while")


# ----------------------------------------------------------------------------- register_rule

_scale2 = jcore.Primitive("jaxprune_test_scale2")
_scale2.def_impl(lambda x: 2 * x)
_scale2.def_abstract_eval(lambda x: x)
mlir.register_lowering(_scale2, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))


@pytest.fixture
def registered():
    yield
    register_rule("jaxprune_test_scale2", None)


def test_an_unknown_primitive_loses_its_channels(registered):
    x = jnp.ones((1, 6, 6, 3))
    graph = trace(_model(_scale2.bind), _variables(), x)
    assert "c1" not in graph.groups and "jaxprune_test_scale2" in graph.unprunable["c1"]


@pytest.mark.parametrize("how", ["elementwise", "pairs"])
def test_a_registered_rule_traces_and_compacts(registered, how):
    rule = "elementwise" if how == "elementwise" else (
        lambda eqn: [(0, a, 0, a) for a in range(4)])
    register_rule("jaxprune_test_scale2", rule)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
    graph, program, small, ref = _trace_and_compact(_model(_scale2.bind), x)
    assert graph.groups["c1"].size == WIDTH
    np.testing.assert_allclose(np.asarray(program(small, x)), np.asarray(ref), rtol=1e-6, atol=1e-6)
    eqns = _eqns(jax.make_jaxpr(program)(small, x).jaxpr, "jaxprune_test_scale2")
    # 'elementwise' runs narrow; axis pairs say where channels go, not how to compute narrow
    want = int(KEEP.sum()) if how == "elementwise" else WIDTH
    assert eqns and all(e.outvars[0].aval.shape[-1] == want for e in eqns)


def test_removing_a_registered_rule_restores_the_builtin():
    builtin = rule_for("add")
    register_rule("add", lambda eqn: [])
    try:
        assert rule_for("add").registered and rule_for("add") is not builtin
    finally:
        register_rule("add", None)
    assert rule_for("add") is builtin
    register_rule("jaxprune_test_scale2", "elementwise")
    register_rule("jaxprune_test_scale2", None)
    assert rule_for("jaxprune_test_scale2") is None
    # re-registering a built-in elementwise primitive keeps what it was (a kernel's dtype copy
    # is still that kernel, a placement still checks its sharding)
    for name, link, narrow_rule in (("convert_element_type", links.copy, narrow.elementwise),
                                    ("device_put", links.copy, narrow.sharded)):
        register_rule(name, "elementwise")
        try:
            rule = rule_for(name)
            assert rule.registered and (rule.link, rule.narrow) == (link, narrow_rule)
        finally:
            register_rule(name, None)
        assert not rule_for(name).registered


@pytest.mark.parametrize("bad", [("", "elementwise"), ("x", "linear"), (3, "elementwise")])
def test_register_rule_refuses_bad_arguments(bad):
    with pytest.raises(ValueError, match="primitive must be|rule must be"):
        register_rule(*bad)
