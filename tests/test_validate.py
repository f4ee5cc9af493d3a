"""`jaxprune.validate` (one-line boundary checks), the registry-derived names the config and
the factories use, and the small pieces of the experiment layer: `FitOptions`,
`checkpoints.restore_weights`, `factories.data_spec`, `pretrained.variables_target`."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import validate


def test_refuse_is_one_line_naming_value_and_allowed():
    with pytest.raises(ValueError) as e:
        validate.refuse("config.x", [1, 2], "a positive integer")
    assert str(e.value) == "config.x=[1, 2] is not allowed; expected a positive integer"


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999, np.float32(0.25), jnp.asarray(0.3), 0])
def test_rate_accepts_static_numbers_in_the_half_open_unit_interval(value):
    assert validate.rate(value) == pytest.approx(float(value))
    assert isinstance(validate.rate(value), float)


@pytest.mark.parametrize("value", [1.0, -0.1, math.nan, math.inf, True, "0.3", None])
def test_rate_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"^pruning rate=.* is not allowed; expected a"):
        validate.rate(value, "pruning rate")


def test_rate_refuses_a_traced_value_as_not_static():
    with pytest.raises(ValueError, match=r"static number in \[0, 1\) \(not traced\)"):
        jax.jit(lambda r: validate.rate(r))(0.3)


def test_fraction_endpoints():
    assert validate.fraction(1.0, "end", closed_low=False, closed_high=True) == 1.0
    with pytest.raises(ValueError, match=r"end=0\.0 is not allowed; expected a number in \(0, 1\]"):
        validate.fraction(0.0, "end", closed_low=False, closed_high=True)
    with pytest.raises(ValueError, match=r"a=1\.0 is not allowed; expected a number in \[0, 1\)"):
        validate.fraction(1.0, "a")
    assert validate.fraction(0.0, "a") == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        validate.fraction(math.nan, "a", closed_high=True)


def test_integer_and_float_checks():
    assert validate.positive_int(3, "n") == 3 and validate.non_negative_int(0, "n") == 0
    assert validate.positive_int(np.int64(2), "n") == 2
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"n={bad!r} is not allowed; expected a positive integer"):
            validate.positive_int(bad, "n")
    with pytest.raises(ValueError, match="n=-1 is not allowed; expected a non-negative integer"):
        validate.non_negative_int(-1, "n")
    assert validate.finite_float(2, "c", minimum=0.0) == 2.0
    with pytest.raises(ValueError, match=r"c=-0\.5 is not allowed; expected a finite number >= 0"):
        validate.finite_float(-0.5, "c", minimum=0.0)
    with pytest.raises(ValueError, match="c=inf is not allowed; expected a finite number$"):
        validate.finite_float(math.inf, "c")


def test_one_of_lists_the_registry_in_its_order():
    assert validate.one_of("b", {"a": 1, "b": 2}, "k") == "b"
    with pytest.raises(ValueError, match="^k='z' is not allowed; expected one of a, b$"):
        validate.one_of("z", {"a": 1, "b": 2}, "k")


def test_config_names_come_from_the_registries():
    """A criterion registered at run time is accepted by the config; an unknown one is refused
    with the registry's names (no copied list)."""
    from jaxprune import config as config_lib
    from jaxprune import criteria

    cfg = config_lib.base_config()
    cfg.method.criterion = "mine"
    with pytest.raises(ValueError, match=r"config.method.criterion='mine' is not allowed; "
                                         r"expected one of l1, l2, fpgm, bn_scale$"):
        config_lib.validate(cfg)
    original = criteria.CRITERIA
    try:
        criteria.CRITERIA = {**original, "mine": criteria.CRITERIA["l1"]}
        config_lib.validate(cfg)
    finally:
        criteria.CRITERIA = original
    cfg.method.criterion = "l1"
    cfg.method.residual = "sideways"
    with pytest.raises(ValueError, match="method.residual='sideways' .* one of coupled, scatter$"):
        config_lib.validate(cfg)


def test_method_name_lists_are_derived():
    from jaxprune.factories import soft_methods, width_methods
    from jaxprune.methods import METHODS

    assert soft_methods() == ("sfp", "asfp", "srfp", "asrfp", "ghfp")
    assert set(width_methods()) == set(METHODS) - {"dense"}


def test_fit_options_defaults_and_frozen():
    from jaxprune.training import FitOptions

    o = FitOptions(epochs=2, batch_size=8)
    assert (o.seed, o.augment, o.checkpoint_manager, o.progress, o.run_init, o.run_finalize,
            o.steps_per_call) == (0, None, None, True, True, True, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.epochs = 3  # type: ignore[misc]
    assert dataclasses.replace(o, seed=4).seed == 4


def test_data_spec_without_reading_data():
    from jaxprune import config as config_lib
    from jaxprune.factories import data_spec

    cfg = config_lib.base_config()
    want = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
            "digits": ((16, 16, 3), 10), "imagenet2012": ((224, 224, 3), 1000)}
    for name, spec in want.items():
        cfg.dataset = name
        assert data_spec(cfg) == spec
    cfg.dataset, cfg.image_size = "digits", 8
    assert data_spec(cfg) == ((8, 8, 3), 10)


def test_variables_target_is_abstract_and_matches_init():
    from jaxprune import config as config_lib
    from jaxprune.models import get_model
    from jaxprune.pretrained import variables_target

    cfg = config_lib.base_config()
    cfg.model, cfg.dataset = "resnet20", "cifar100"
    target = variables_target(cfg)
    real = get_model("resnet20", num_classes=100).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 32, 32, 3)), train=False)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))
    assert jax.tree.structure(target) == jax.tree.structure(real)
    assert [x.shape for x in jax.tree.leaves(target)] == [x.shape for x in jax.tree.leaves(real)]


def test_restore_weights_reads_only_the_weights(tmp_path):
    """Only params and batch stats come back (the optimizer state, masks and method state are
    not read), equal to what was saved; a wrong target shape is refused naming the leaf; an
    unreadable newest step falls back to the older one, reported."""
    from jaxprune import checkpoints as ck
    from tests.test_checkpoints import small_state

    mgr = ck.make_checkpoint_manager(tmp_path / "run", max_to_keep=5)
    for epoch in range(2):
        ck.save_checkpoint(mgr, small_state(epoch + 1.0), epoch=epoch, metrics={})
    mgr.close()
    want = small_state(2.0)
    target = {"params": jax.eval_shape(lambda: want.params), "batch_stats": {}}
    got, step = ck.restore_weights(tmp_path / "run", target)
    assert step == 2 and set(got) == {"params", "batch_stats"}
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype),
                       target)
    with pytest.raises(ValueError, match=r"leaf 'params/conv/kernel' has shape \(3, 3, 2, 4\) on "
                                         r"disk but the target expects \(3, 3, 2, 5\)"):
        ck.restore_weights(tmp_path / "run", bad)
    for f in (tmp_path / "run" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"garbage")
    warnings = []
    got, step = ck.restore_weights(tmp_path / "run", target, warn=warnings.append)
    assert step == 1 and len(warnings) == 1 and "step 2" in warnings[0]
    np.testing.assert_array_equal(np.asarray(got["params"]["conv"]["kernel"]),
                                  np.asarray(small_state(1.0).params["conv"]["kernel"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ck.restore_weights(tmp_path / "none", target)
