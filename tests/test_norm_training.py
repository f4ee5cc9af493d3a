"""Training with masked normalisation: SFP and HFP train a ConvNeXt-style LayerNorm model and a
ViT-style model (CLS token, attention heads, MLP) for a few epochs on the digits, traced with
``norms='masked'``; the final compact model's test accuracy equals the masked model's exactly
and its outputs equal the masked model's (within 1e-5 of the largest logit)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import evaluation, optim, parallel, train_step
from jaxprune import training as tr
from jaxprune.compaction import compact
from jaxprune.graph import trace_linen
from jaxprune.masked_norm import masked_apply
from jaxprune.masks import apply_masks, binarize
from jaxprune.methods import HFP, SFP


class DigitsConvNeXt(nn.Module):
    """A patchify stem with a LayerNorm, one ConvNeXt block (depthwise 3x3, LayerNorm, MLP 4x,
    layer scale, residual) and a LayerNorm'd head."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="ln0")(nn.Conv(16, (2, 2), strides=2, name="stem")(x))
        h = nn.LayerNorm(name="ln")(nn.Conv(16, (3, 3), feature_group_count=16, name="dw")(x))
        h = nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(h)))
        x = x + h * self.param("gamma", nn.initializers.constant(0.5), (16,))
        return nn.Dense(10, name="head")(nn.LayerNorm(name="ln_out")(x.mean((1, 2))))


class DigitsViT(nn.Module):
    """2x2 patches, a CLS token, one pre-LN block (2 heads, MLP 2x) and a LayerNorm'd head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(16, (2, 2), strides=2, name="patch")(x)
        b = x.shape[0]
        x = x.reshape(b, -1, 16)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, 16))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, 16)), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], 16))
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(h)))
        return nn.Dense(10, name="head")(nn.LayerNorm(name="ln_f")(x[:, 0]))


@pytest.fixture(scope="module")
def digits():
    from jaxprune.data import load_digits_dataset

    ds = load_digits_dataset(image_size=8, channels=1)
    norm = lambda a: (np.asarray(a, np.float32) - ds.mean[0]) / ds.std[0]  # noqa: E731
    return norm(ds.x_train), ds.y_train, norm(ds.x_test), ds.y_test


def _method(name, vit):
    """SFP at rate 0.5 (0.3 for the ViT, whose residual width is one group), HFP removing 20%
    of the params (10% for the ViT, where only the residual width is gated: LayerNorm scales)."""
    if name == "sfp":
        return SFP(rate=0.3 if vit else 0.5, final_bn="zero")
    return HFP(params_reduction=0.1 if vit else 0.2, lam=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sfp", "hfp"])
@pytest.mark.parametrize("model_cls", [DigitsConvNeXt, DigitsViT], ids=["convnext", "vit"])
def test_training_with_masked_norms_gives_a_compact_model_equal_to_the_masked_one(
        digits, model_cls, method):
    x_train, y_train, x_test, y_test = digits
    model = model_cls()
    graph = trace_linen(model, model.init(jax.random.PRNGKey(0), x_test[:1]), x_test[:1],
                        norms="masked")
    assert graph.normalised
    vit = model_cls is DigitsViT
    epochs, bs = (5, 16) if vit else (3, 32)
    steps = -(-len(x_train) // bs)
    pruner = _method(method, vit).pruner(graph, epochs, steps)
    if vit:  # a transformer: Adam (SGD barely moves it in a few epochs)
        opt = optax.adam(3e-3)
    else:
        opt = optim.make_optimizer(optim.step_schedule(epochs, base_lr=0.05, boundaries=(),
                                                       factor=1.0))
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), x_train[:1], opt)
    state, hist = tr.fit(model, graph, pruner, state, opt, (x_train, y_train), (x_test, y_test),
                         tr.FitOptions(epochs=epochs, batch_size=bs, progress=False, mesh=mesh))
    assert len(hist) == epochs
    masks = binarize(state.masks)
    pruned = {n for n, m in masks.items() if float(np.min(np.asarray(m))) == 0.0}
    assert pruned & set(graph.normalised)  # normalised channels were pruned
    masked_vars = apply_masks(state.variables, masks, graph)
    masked = evaluation.evaluate(model, masked_vars, x_test, y_test, 360, graph=graph,
                                 masks=masks)
    assert masked["accuracy"] > 0.3  # it learned (10 classes)
    res = compact(model, state.variables, masks, graph, sample_input=x_test[:8])
    logits = np.asarray(jax.jit(res.model.apply)(res.variables, x_test))
    assert float(np.mean(np.argmax(logits, -1) == y_test)) == masked["accuracy"]
    ref = np.asarray(jax.jit(lambda v, x, m: masked_apply(model.apply, graph)(v, x, masks=m))(
        masked_vars, x_test, masks))
    err = float(np.max(np.abs(logits - ref)))
    kept = {n: int(m.sum()) for n, m in res.kept.items()}
    print(f"{model_cls.__name__} {method}: masked accuracy {masked['accuracy']:.4f}, "
          f"max |compact - masked| {err:.3g}, kept {kept}")
    assert err <= 1e-5 * max(1.0, float(np.max(np.abs(ref))))
