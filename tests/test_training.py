"""Training: optimizer and schedules against hand-computed values, hard/soft masking, the
N-device step against the 1-device step, exact evaluation, bitwise resume of `fit`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from jaxprune import augment, evaluation, optim, parallel, train_step, training as tr
from jaxprune.checkpoints import make_checkpoint_manager
from jaxprune.graph import trace_linen
from jaxprune.masks import apply_masks
from jaxprune.masks import init_masks
from jaxprune.pruner import MaskState, Pruner, next_count, zero_count, zero_penalty

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class TinyNet(nn.Module):
    """conv1(4) -> bn1 -> relu -> conv2(6) -> bn2 -> relu -> GAP -> fc(3)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = nn.relu(bn(name="bn1")(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)))
        x = nn.relu(bn(name="bn2")(nn.Conv(6, (3, 3), use_bias=False, name="conv2")(x)))
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True)
class NoPrune:
    """A method record whose pruner does no pruning at all."""

    name: str = "none"

    def penalty(self, variables, state):
        return zero_penalty(variables, state)

    def pruner(self, graph, total_epochs, steps_per_epoch=1):
        def init(variables):
            ones = init_masks(graph)
            return variables, MaskState(ones, dict(ones), zero_count())

        def update(variables, state):
            return variables, state._replace(count=next_count(state.count))

        return Pruner(init, update, lambda v, s: (v, s), self.penalty, total_epochs)


@dataclasses.dataclass(frozen=True)
class L2Penalty(NoPrune):
    """penalty = coef/2 * ||params||^2: must act exactly like weight decay ``coef``."""

    coef: float = 0.0

    def penalty(self, variables, state):
        sq = sum(jnp.sum(p**2) for p in jax.tree.leaves(variables["params"]))
        return 0.5 * self.coef * sq, {"sq_norm": sq}


class ToyState(NamedTuple):
    masks: dict
    hard: dict
    count: jax.Array
    calls: jax.Array


@dataclasses.dataclass(frozen=True)
class ToyPrune(NoPrune):
    """Hard-prunes conv1 channel 0 at init; every epoch soft-zeroes conv2's lowest-L2 filter and
    counts its calls in its state. ``crash_at``: raise at the end of that epoch."""

    name: str = "toy"
    crash_at: int = -1

    def pruner(self, graph, total_epochs, steps_per_epoch=1):
        def init(variables):
            ones = init_masks(graph)
            hard = dict(ones, conv1=ones["conv1"].at[0].set(0.0))
            params = apply_masks(variables["params"], hard, graph, prefix=("params",))
            return (dict(variables, params=params),
                    ToyState(dict(hard), hard, zero_count(), jnp.zeros((), jnp.int32)))

        def update(variables, state):
            epoch = int(state.count)
            if epoch == self.crash_at:
                raise RuntimeError(f"simulated crash in epoch {epoch}")
            norms = jnp.sqrt(jnp.sum(variables["params"]["conv2"]["kernel"] ** 2, axis=(0, 1, 2)))
            soft = jnp.ones(6).at[jnp.argmin(norms)].set(0.0)
            masks = dict(state.hard, conv2=soft)
            params = apply_masks(variables["params"], masks, graph, roles={"out"},
                                 prefix=("params",))
            return dict(variables, params=params), state._replace(
                masks=masks, count=next_count(state.count), calls=state.calls + 1)

        return Pruner(init, update, lambda v, s: (v, s), self.penalty, total_epochs)


@pytest.fixture(scope="module")
def tiny():
    model = TinyNet()
    x = np.zeros((1, 8, 8, 3), np.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
    graph = trace_linen(model, variables, x)
    assert set(graph.groups) == {"conv1", "conv2"}
    return model, graph


def _batch(n=16, seed=0):
    rs = np.random.RandomState(seed)
    return rs.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8), rs.randint(0, 3, n).astype(np.int32)


AUGMENT = functools.partial(augment.augment_batch, mean=MEAN, std=STD)
PREPROCESS = functools.partial(augment.normalize, mean=MEAN, std=STD)


# ----------------------------------------------------------------------------- optimizer

def test_make_optimizer_is_pytorch_nesterov_sgd():
    # PyTorch SGD by hand: d = g + wd p; buf = m buf + d; d = d + m buf; p -= lr d
    lr, m, wd = 0.1, 0.9, 0.01
    p, buf, ps = 1.5, 0.0, []
    for g in (0.5, -0.2, 0.3):
        d = g + wd * p
        buf = m * buf + d
        p -= lr * (d + m * buf)
        ps.append(p)
    opt = optim.make_optimizer(lr, momentum=m, nesterov=True, weight_decay=wd)
    params = {"w": jnp.asarray(1.5)}
    state = opt.init(params)
    for g, want in zip((0.5, -0.2, 0.3), ps):
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, updates)
        np.testing.assert_allclose(float(params["w"]), want, rtol=1e-6)


def test_make_optimizer_rejects_bad_values():
    with pytest.raises(ValueError, match="momentum"):
        optim.make_optimizer(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.make_optimizer(0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay"):
        optim.make_optimizer(0.1, weight_decay=-1.0)


# ----------------------------------------------------------------------------- schedules

def test_sfp_cifar_schedule_boundaries():
    spe = 10
    s = optim.sfp_cifar_schedule(spe)
    f32 = np.float32
    expected = {0: 0.01, 9: 0.01, 10: 0.1, 599: 0.1, 600: 0.1 * 0.2, 1199: 0.1 * 0.2,
                1200: 0.1 * 0.2**2, 1599: 0.1 * 0.2**2, 1600: 0.1 * 0.2**3, 1999: 0.1 * 0.2**3}
    for step, lr in expected.items():
        assert np.asarray(s(step)) == f32(lr), (step, float(s(step)), lr)
        assert np.asarray(jax.jit(s)(jnp.int32(step))) == f32(lr)
    assert f32(0.1 * 0.2**3) == f32(0.0008)


def test_step_schedule_imagenet_and_constant():
    s = optim.step_schedule(5)  # 0.1, x0.1 at epochs 30, 60, 90
    for step, lr in {0: 0.1, 149: 0.1, 150: 0.01, 299: 0.01, 300: 0.001, 450: 0.0001, 10**6: 0.0001}.items():
        np.testing.assert_allclose(np.asarray(s(step)), lr, rtol=1e-7)
    c = optim.constant_schedule(0.001)
    assert np.asarray(c(0)) == np.float32(0.001) and np.asarray(c(12345)) == np.float32(0.001)
    with pytest.raises(ValueError, match="sorted"):
        optim.step_schedule(5, boundaries=(60, 30))


# ----------------------------------------------------------------------------- masking

def _mask_leaves(state):
    """Every array slice that belongs to conv1 channels 0, 1 (the hard ones)."""
    p, bs = state.params, state.batch_stats
    trace = state.opt_state[1][0].trace
    return {
        "conv1.kernel": p["conv1"]["kernel"][..., :2],
        "bn1.scale": p["bn1"]["scale"][:2],
        "bn1.bias": p["bn1"]["bias"][:2],
        "conv2.kernel.in": p["conv2"]["kernel"][:, :, :2, :],
        "bn1.mean": bs["bn1"]["mean"][:2],
        "bn1.var": bs["bn1"]["var"][:2],
        "mom.conv1.kernel": trace["conv1"]["kernel"][..., :2],
        "mom.bn1.scale": trace["bn1"]["scale"][:2],
        "mom.conv2.kernel.in": trace["conv2"]["kernel"][:, :, :2, :],
    }


def test_hard_channels_stay_zero_soft_channels_learn(tiny):
    model, graph = tiny
    opt = optim.make_optimizer(0.1, weight_decay=5e-4)
    pruner = NoPrune().pruner(graph, total_epochs=1)
    images, labels = _batch()
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(1), images, opt, mesh=mesh)
    step = train_step.make_train_step(model, graph, opt, pruner, mesh=mesh, augment=AUGMENT)
    for _ in range(2):  # build up momentum everywhere first
        state, _ = step(state, images, labels)
    assert all(np.any(np.asarray(v) != 0) for v in _mask_leaves(state).values())

    # channels 0, 1: hard; channel 2: soft (mask 0, hard 1, filter zeroed); channel 3: kept
    hard = {"conv1": jnp.asarray([0.0, 0.0, 1.0, 1.0]), "conv2": jnp.ones(6)}
    masks = {"conv1": jnp.asarray([0.0, 0.0, 0.0, 1.0]), "conv2": jnp.ones(6)}
    params = apply_masks(state.params, masks, graph, roles={"out"}, prefix=("params",))
    pruned = state.replace(prune=state.prune._replace(hard=hard, masks=masks), params=params)
    assert np.all(np.asarray(pruned.params["conv1"]["kernel"][..., 2]) == 0)

    masked = plain = pruned
    plain_step = train_step.make_train_step(model, graph, opt, pruner, mesh=mesh, augment=AUGMENT,
                                    mask_hard=False)
    for _ in range(4):
        masked, metrics = step(masked, images, labels)
        plain, _ = plain_step(plain, images, labels)
    for name, leaf in _mask_leaves(masked).items():
        assert np.all(np.asarray(leaf) == 0), f"hard channel leaf {name} is not exactly zero"
    # control: without the masking, momentum and weight decay revive the hard channels
    assert np.any(np.asarray(plain.params["conv1"]["kernel"][..., :2]) != 0)
    # the soft channel came back to life (gradients, momentum, decay all act on it)
    assert np.any(np.asarray(masked.params["conv1"]["kernel"][..., 2]) != 0)
    assert np.any(np.asarray(masked.params["conv1"]["kernel"][..., 3]) != 0)
    assert int(masked.step) == 6
    assert set(metrics) == {"loss", "accuracy", "penalty"}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["penalty"]) == 0.0


def test_penalty_is_differentiated(tiny):
    """A penalty coef/2 ||p||^2 with no weight decay == weight decay coef with no penalty."""
    model, graph = tiny
    images, labels = _batch()
    x = PREPROCESS(images)
    mesh = parallel.make_mesh(jax.devices()[:1])
    results = []
    for method, wd in ((L2Penalty(coef=0.05), 0.0), (NoPrune(), 0.05)):
        opt = optim.make_optimizer(0.1, weight_decay=wd)
        state = train_step.create_train_state(model, graph, jax.random.PRNGKey(2), x, opt, mesh=mesh)
        step = train_step.make_train_step(model, graph, opt, method.pruner(graph, 1), mesh=mesh)
        for _ in range(2):
            state, metrics = step(state, x, labels)
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a.params, b.params)
    assert float(ma["penalty"]) > 0 and "sq_norm" in ma and float(mb["penalty"]) == 0


def test_integer_images_need_augment(tiny):
    model, graph = tiny
    opt = optim.make_optimizer(0.1)
    images, labels = _batch()
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), images, opt, mesh=mesh)
    step = train_step.make_train_step(model, graph, opt, NoPrune().pruner(graph, 1), mesh=mesh)
    with pytest.raises(TypeError, match="augment"):
        step(state, images, labels)


# ----------------------------------------------------------------------------- evaluation

def test_evaluate_partial_batch_matches_numpy(tiny):
    model, graph = tiny
    opt = optim.make_optimizer(0.1)
    images, labels = _batch(16, seed=3)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(3), images, opt, mesh=mesh)
    step = train_step.make_train_step(model, graph, opt, NoPrune().pruner(graph, 1), mesh=mesh,
                              augment=AUGMENT)
    state, _ = step(state, images, labels)  # non-trivial BN statistics
    test_x, test_y = _batch(37, seed=4)

    logits = np.asarray(jax.jit(model.apply)(state.variables, PREPROCESS(test_x)), np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    want_acc = float(np.mean(logits.argmax(1) == test_y))
    want_loss = float(-np.mean(logp[np.arange(37), test_y]))

    eval_step = evaluation.make_eval_fn(model, mesh, PREPROCESS)
    for bs in (16, 8, 64):  # 37 = 2*16 + 5, 4*8 + 5, and one batch larger than the data
        got = evaluation.evaluate(model, state.variables, test_x, test_y, bs, step=eval_step)
        assert got["accuracy"] == want_acc
        np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-6)
    # padding keeps one shape per batch size: no retrace per batch
    assert eval_step.jitted._cache_size() == 3
    with pytest.raises(TypeError, match="preprocess"):
        evaluation.evaluate(model, state.variables, test_x, test_y, 16, mesh=mesh)


# ----------------------------------------------------------------------------- multi-device

_MULTI_DEVICE_SCRIPT = textwrap.dedent(r"""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.test_training import TinyNet, ToyPrune, AUGMENT, PREPROCESS, _batch
    from jaxprune import evaluation, optim, parallel, train_step
    from jaxprune.graph import trace_linen

    assert jax.device_count() == 8, jax.devices()
    model = TinyNet()
    x0 = np.zeros((1, 8, 8, 3), np.float32)
    graph = trace_linen(model, jax.eval_shape(functools.partial(model.init, train=False),
                                              jax.random.PRNGKey(0), x0), x0)
    pruner = ToyPrune().pruner(graph, total_epochs=1)
    opt = optim.make_optimizer(0.1, weight_decay=5e-4)
    images, labels = _batch(32, seed=5)
    fresh = train_step.prune_init(
        pruner, train_step.create_train_state(model, graph, jax.random.PRNGKey(7), images, opt))
    out = {}
    for n in (8, 1):
        mesh = parallel.make_mesh(jax.devices()[:n])
        step = train_step.make_train_step(model, graph, opt, pruner, mesh=mesh, augment=AUGMENT)
        state = parallel.replicate(mesh, fresh)
        for i in range(3):
            state, metrics = step(state, images, labels)
        out[n] = jax.device_get((state.params, state.batch_stats, state.opt_state))
        devs = {len(l.sharding.device_set) for l in jax.tree.leaves(state.params)}
        assert devs == {n}, devs
        if n == 8:
            x, y = parallel.shard_batch(mesh, images, labels)
            assert len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape[0] == 4
            try:
                step(state, images[:12], labels[:12])
                raise SystemExit("no error for batch 12 on 8 devices")
            except ValueError as e:
                msg = str(e)
                assert "12" in msg and "8" in msg, msg
    for a, b in zip(jax.tree.leaves(out[8]), jax.tree.leaves(out[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out[8][0]["conv1"]["kernel"][..., 0]) == 0)
    # evaluation on 8 devices with a batch (500) and a set size (37) that 8 does not divide:
    # the batch is rounded to a device multiple and the last one padded; same result as 1 device
    ev_x, ev_y = _batch(37, seed=9)
    variables = {"params": out[1][0], "batch_stats": out[1][1]}
    res = {n: evaluation.evaluate(model, variables, ev_x, ev_y, 500, mesh=parallel.make_mesh(jax.devices()[:n]),
                          preprocess=PREPROCESS)
           for n in (8, 1)}
    assert res[8]["accuracy"] == res[1]["accuracy"], res
    np.testing.assert_allclose(res[8]["loss"], res[1]["loss"], rtol=1e-5)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(out[8]), jax.tree.leaves(out[1])))
    print("RESULT", json.dumps({"max_abs_diff": diff}))
""")


def test_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(REPO)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["max_abs_diff"] < 1e-4


def test_maybe_initialize_distributed_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        parallel.maybe_initialize_distributed()


# ----------------------------------------------------------------------------- fit / resume

def test_records_time_the_epoch_and_the_work_between_epochs(tiny):
    """``epoch_time_s`` times training, re-selection and evaluation; ``between_epochs_s`` the
    time from one epoch's timer stop to the next epoch's start (checkpoint save, records): here
    a metrics writer that takes 0.5 s, which ``epoch_time_s`` must not contain."""
    import time

    from conftest import untimed

    model, graph = tiny
    train, test = _batch(32, seed=6), _batch(16, seed=7)
    opt = optim.make_optimizer(optim.step_schedule(3, base_lr=0.1, boundaries=(1, 2), factor=0.5))
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11), train[0], opt)
    opts = dict(epochs=3, batch_size=16, seed=3, augment=AUGMENT, preprocess=PREPROCESS, progress=False,
                mesh=parallel.make_mesh(jax.devices()[:1]))
    fast = tr.fit(model, graph, ToyPrune().pruner(graph, 3), fresh, opt, train, test, tr.FitOptions(**opts))[1]
    slow = tr.fit(model, graph, ToyPrune().pruner(graph, 3), fresh, opt, train, test,
                  tr.FitOptions(metrics_writer=lambda r: time.sleep(0.5), **opts))[1]
    assert set(tr.TIMING_KEYS) == {"epoch_time_s", "between_epochs_s"}
    for hist in (fast, slow):
        assert "between_epochs_s" not in hist[0]  # nothing came before the run's first epoch
        assert all(r["epoch_time_s"] > 0 and r["between_epochs_s"] >= 0 for r in hist[1:])
    assert all(r["between_epochs_s"] >= 0.5 for r in slow[1:])
    assert all(s["epoch_time_s"] < f["epoch_time_s"] + 0.5 for f, s in zip(fast[1:], slow[1:]))
    assert untimed(slow) == untimed(fast)


def test_fit_resume_is_bitwise_identical(tiny, tmp_path):
    from conftest import untimed

    model, graph = tiny
    epochs, bs = 3, 16
    train = _batch(48, seed=6)
    test = _batch(20, seed=7)
    toy = functools.partial(ToyPrune().pruner, graph, epochs)
    crash = lambda epoch: ToyPrune(crash_at=epoch).pruner(graph, epochs)  # noqa: E731
    opt = optim.make_optimizer(optim.step_schedule(3, base_lr=0.1, boundaries=(1, 2), factor=0.5))
    mesh = parallel.make_mesh(jax.devices()[:1])
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11), train[0], opt)
    common = dict(epochs=epochs, batch_size=bs, seed=3, augment=AUGMENT, preprocess=PREPROCESS,
                  progress=False, mesh=mesh, config={"run": "test"})

    records = []
    full, hist_full = tr.fit(model, graph, toy(), fresh, opt, train, test, tr.FitOptions(
        checkpoint_manager=make_checkpoint_manager(tmp_path / "a"),
        metrics_writer=records.append, **dict(common, progress=True)))
    assert [r["epoch"] for r in hist_full] == [0, 1, 2] and records == hist_full

    mgr = make_checkpoint_manager(tmp_path / "b")
    with pytest.raises(RuntimeError, match="crash in epoch 2"):
        tr.fit(model, graph, crash(2), fresh, opt, train, test,
               tr.FitOptions(checkpoint_manager=mgr, **common))
    assert mgr.latest_step() == 2  # epochs 0 and 1 are on disk
    written = []
    resumed, hist_resumed = tr.fit(model, graph, toy(), fresh, opt, train, test,
                                   tr.FitOptions(checkpoint_manager=make_checkpoint_manager(tmp_path / "b"),
                                                 metrics_writer=written.append, **common))
    assert [r["epoch"] for r in written] == [2]  # only the missing epoch was trained

    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 9 and int(resumed.prune.calls) == 3 and int(resumed.prune.count) == 3
    assert np.all(np.asarray(resumed.params["conv1"]["kernel"][..., 0]) == 0)
    assert untimed(hist_resumed) == untimed(hist_full)
    # a finished run resumes to "nothing left to do"
    again, hist_again = tr.fit(model, graph, crash(0), fresh, opt, train, test,
                               tr.FitOptions(checkpoint_manager=make_checkpoint_manager(tmp_path / "b"),
                                             **common))
    assert untimed(hist_again) == untimed(hist_full)
    with pytest.raises(ValueError, match="total_epochs"):
        tr.fit(model, graph, toy(), fresh, opt, train, test,
               tr.FitOptions(**dict(common, epochs=2)))


def test_a_checkpoint_of_the_older_layout_resumes_exactly(tiny, tmp_path):
    """A checkpoint written before the pruning state was one typed field (``masks``, ``hard``
    and a ``method_state`` dict at the top of the train state) resumes under today's code: its
    masks, hard set and method state land in the pruner's state, the epoch count comes from the
    checkpoint's meta, and the continuation equals the uninterrupted run bitwise."""
    from conftest import untimed
    from tests.test_checkpoints import OldState  # the older layout, written out by hand
    from jaxprune.checkpoints import restore_checkpoint, save_checkpoint

    model, graph = tiny
    epochs, bs = 3, 16
    train, test = _batch(48, seed=6), _batch(20, seed=7)
    opt = optim.make_optimizer(optim.step_schedule(3, base_lr=0.1, boundaries=(1, 2), factor=0.5))
    mesh = parallel.make_mesh(jax.devices()[:1])
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11), train[0], opt)
    common = dict(epochs=epochs, batch_size=bs, seed=3, augment=AUGMENT, preprocess=PREPROCESS,
                  progress=False, mesh=mesh, steps_per_call=1)
    toy = ToyPrune().pruner(graph, epochs)
    full_mgr = make_checkpoint_manager(tmp_path / "full", max_to_keep=5)
    full, hist_full = tr.fit(model, graph, toy, fresh, opt, train, test,
                             tr.FitOptions(checkpoint_manager=full_mgr, **common))
    # the uninterrupted run's state after 2 epochs, written again in the older layout
    target = train_step.prune_init(toy, fresh)
    two, meta = restore_checkpoint(full_mgr, target, step=2)
    full_mgr.close()
    assert int(two.prune.count) == 2 and int(two.prune.calls) == 2
    old = OldState(step=two.step, params=two.params, batch_stats=two.batch_stats,
                        opt_state=two.opt_state, masks=two.prune.masks, hard=two.prune.hard,
                        method_state={"calls": two.prune.calls}, rng=two.rng)
    old_mgr = make_checkpoint_manager(tmp_path / "old")
    save_checkpoint(old_mgr, old, epoch=1, metrics=meta["metrics"], history=meta["history"])
    old_mgr.wait_until_finished()
    stored = old_mgr.item_metadata(2)["state"]
    assert {"masks", "hard", "method_state"} <= set(getattr(stored, "tree", stored))
    # restored alone: the older fields are today's pruning state
    back, back_meta = restore_checkpoint(old_mgr, target)
    assert back_meta["next_epoch"] == 2 and type(back.prune) is type(target.prune)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # resumed by fit: only the last epoch is trained, and it ends where the full run ended
    written = []
    resumed, hist_resumed = tr.fit(model, graph, toy, fresh, opt, train, test,
                                   tr.FitOptions(checkpoint_manager=old_mgr,
                                                 metrics_writer=written.append, **common))
    old_mgr.close()
    assert [r["epoch"] for r in written] == [2]
    assert int(resumed.prune.count) == 3 and int(resumed.prune.calls) == 3
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert untimed(hist_resumed) == untimed(hist_full)
