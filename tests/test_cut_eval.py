"""`jaxprune.cut_eval`: evaluation with a cached prefix equals the plain evaluation."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import augment, evaluation
from jaxprune.cut_eval import CutEvaluator, cut_for, top_level_order
from jaxprune.graph import trace_linen
from jaxprune.masks import apply_masks
from jaxprune.models import get_model
from conftest import random_masks, random_variables


@pytest.fixture(scope="module")
def setup():
    model = get_model("resnet20")
    x = jnp.zeros((1, 8, 8, 3))
    variables = random_variables(model, x, seed=3)
    graph = trace_linen(model, variables, x)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (70,)).astype(np.int32)
    pre = functools.partial(augment.normalize, mean=(0.5,) * 3, std=(0.25,) * 3)
    return model, variables, graph, images, labels, pre


def test_top_level_order_and_cut_choice(setup):
    model, variables, graph, *_ = setup
    order = top_level_order(model, variables, jnp.zeros((1, 8, 8, 3)))
    assert order[:3] == ["stem", "stem_bn", "layer1_0"] and order[-1] == "fc" and len(order) == 12
    g = graph.groups[graph.producer_to_group()["layer2_1/conv1"]]
    assert cut_for([m.path for m in g.members], order) == "layer2_1"
    assert cut_for([("params", "nowhere", "kernel")], order) is None


def test_cached_prefix_accuracy_equals_plain_evaluation(setup):
    model, variables, graph, images, labels, pre = setup
    ev = CutEvaluator(model, variables, images, labels, pre, batch_size=32)  # 70 = 32+32+6 padded
    order = top_level_order(model, variables, jnp.zeros((1, 8, 8, 3)))
    masks = random_masks(graph, seed=1)
    for producer in ("layer1_0/conv1", "layer2_2/conv1", "layer3_1/conv1"):
        group = graph.producer_to_group()[producer]
        only = {k: (v if k == group else jnp.ones_like(v)) for k, v in masks.items()}
        masked = apply_masks(variables, only, graph)
        want = evaluation.evaluate(model, masked, images, labels, 35, preprocess=pre)["accuracy"]
        ev.set_cut(cut_for([m.path for m in graph.groups[group].members], order))
        assert ev.accuracy(masked) == want
    ev.set_cut(None)
    plain = evaluation.evaluate(model, variables, images, labels, 70, preprocess=pre)["accuracy"]
    assert ev.accuracy(variables) == plain


def test_bad_cut_and_batch_are_refused(setup):
    model, variables, graph, images, labels, pre = setup
    with pytest.raises(ValueError, match="batch_size=0"):
        CutEvaluator(model, variables, images, labels, pre, batch_size=0)
    ev = CutEvaluator(model, variables, images, labels, pre, batch_size=70)
    with pytest.raises(ValueError, match="conv1.*never called"):
        ev.set_cut("conv1")
