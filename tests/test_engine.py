"""The training engine: device-resident data, chunked ``lax.scan`` steps, whole-set device
evaluation, bf16 compute. Each compared with the plain per-step path on the same batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import batching, evaluation, optim, parallel, train_step, training as tr
from tests.test_training import AUGMENT, PREPROCESS, ToyPrune, _batch, tiny  # noqa: F401


def test_chunk_steps_picks_the_largest_divisor():
    assert train_step.chunk_steps(390, 50) == 39  # 390 = 2 * 3 * 5 * 13
    assert train_step.chunk_steps(390, 0) == 390  # 0: the whole epoch
    assert train_step.chunk_steps(781, 50) == 11  # 781 = 11 * 71
    assert train_step.chunk_steps(7, 50) == 7
    assert train_step.chunk_steps(7, 3) == 1
    assert train_step.chunk_steps(12, 1) == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="steps_per_call"):
            train_step.chunk_steps(10, bad)


def _setup(tiny, epochs=2, steps=3):
    model, graph = tiny
    opt = optim.make_optimizer(optim.step_schedule(steps, base_lr=0.1, boundaries=(1,), factor=0.5))
    mesh = parallel.make_mesh(jax.devices()[:1])
    method = ToyPrune().pruner(graph, epochs, steps)  # the method as a Pruner
    train = _batch(16 * steps, seed=6)
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11), train[0], opt)
    return model, graph, opt, mesh, method, train, fresh


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _allclose(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_chunk_equals_stepping_one_by_one(tiny):
    """4 one-step chunks == 4 calls of the per-step program on host batches, bitwise (the same
    straight-line program); 2 chunks of 2 steps (a rolled loop, which XLA compiles otherwise)
    agree to float rounding (measured: 4e-8). Hard masking included; metrics stacked."""
    model, graph, opt, mesh, method, (x, y), fresh = _setup(tiny, steps=4)
    state0 = parallel.replicate(mesh, train_step.prune_init(method, fresh))
    order = batching.epoch_batches(len(y), 16, seed=2, epoch=0).astype(np.int32)

    step = train_step.make_train_step(model, graph, opt, method, mesh=mesh, augment=AUGMENT)
    one, per_step = state0, []
    for idx in order:
        one, m = step(one, x[idx], y[idx])
        per_step.append(jax.device_get(m))

    xd, yd = parallel.put_replicated(mesh, x, y)
    od = parallel.replicate(mesh, order)
    for k, same in ((1, _leaves_equal), (2, _allclose)):
        chunk = train_step.make_train_chunk(model, graph, opt, method, steps=k, mesh=mesh,
                                            augment=AUGMENT)
        pos = parallel.replicate(mesh, np.int32(0))
        st, ms = state0, []
        for _ in range(4 // k):
            st, m, pos = chunk(st, xd, yd, od, pos)
            ms.append(jax.device_get(m))
        assert int(pos) == 4 and int(st.step) == 4
        same(one, st)
        same(np.concatenate([m["loss"] for m in ms]), np.asarray([m["loss"] for m in per_step]))
        assert np.all(np.asarray(st.params["conv1"]["kernel"][..., 0]) == 0)  # hard channel
        assert chunk.jitted._cache_size() == 1  # one program whatever the position


def _fit(tiny, steps_per_call, guard="allow"):
    model, graph, opt, mesh, method, train, fresh = _setup(tiny)
    test = _batch(20, seed=7)
    with jax.transfer_guard_host_to_device(guard):
            return tr.fit(model, graph, method, fresh, opt, train, test, tr.FitOptions(
                epochs=2, batch_size=16, seed=3, augment=AUGMENT, preprocess=PREPROCESS,
                progress=False, mesh=mesh, steps_per_call=steps_per_call))


def test_fit_result_does_not_depend_on_the_chunk_size(tiny, monkeypatch):
    """One step per call gives the bits of the reference per-step loop (host batches through
    `make_train_step`, then the method's re-selection); a whole epoch per call (a rolled loop)
    agrees to float rounding and takes one dispatch per epoch."""
    calls = []
    real = train_step.make_train_chunk

    def counting(*a, **k):
        fn = real(*a, **k)

        def wrapped(*args):
            calls.append(fn.steps)
            return fn(*args)

        wrapped.steps = fn.steps
        return wrapped

    monkeypatch.setattr(train_step, "make_train_chunk", counting)
    whole, hist_whole = _fit(tiny, 0)
    assert calls == [3, 3]  # one dispatch per epoch
    calls.clear()
    single, hist_single = _fit(tiny, 1)
    assert calls == [1] * 6
    _allclose(whole, single, rtol=1e-4, atol=1e-6)  # 6 steps and 2 re-selections: measured 3e-5
    for a, b in zip(hist_whole, hist_single):
        assert a["test_accuracy"] == b["test_accuracy"]
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)

    model, graph, opt, mesh, method, (x, y), fresh = _setup(tiny)
    step = train_step.make_train_step(model, graph, opt, method, mesh=mesh, augment=AUGMENT)
    st = parallel.replicate(mesh, train_step.prune_init(method, fresh))
    for epoch in range(2):
        for idx in batching.epoch_batches(len(y), 16, seed=3, epoch=epoch):
            st, _ = step(st, x[idx], y[idx])
        st = train_step.prune_update(method, st)
    _leaves_equal(st, single)


def test_fit_makes_no_implicit_host_transfer(tiny, monkeypatch):
    """fit runs the steps under ``jax.transfer_guard_host_to_device('disallow')``: only explicit
    copies (the data sets once, each epoch's batch order) happen; a step that fed host data
    would fail loudly."""
    state, hist = _fit(tiny, 0)
    assert len(hist) == 2 and np.isfinite(hist[-1]["train_loss"])
    real = train_step.make_train_chunk

    def leaky(*a, **k):
        fn = real(*a, **k)
        return lambda state, x, y, order, pos: fn(state, np.asarray(x), y, order, pos)

    monkeypatch.setattr(train_step, "make_train_chunk", leaky)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        _fit(tiny, 0)


def test_evaluate_on_device_is_one_call(tiny):
    model, graph, opt, mesh, method, train, fresh = _setup(tiny)
    ev = evaluation.make_eval_fn(model, mesh, PREPROCESS)
    x, y = _batch(37, seed=4)
    d = evaluation.put_eval_data(mesh, x, y, 16)
    assert d.images.shape == (3, 16, 8, 8, 3) and d.n == 37 and int(np.sum(d.labels == -1)) == 11
    variables = parallel.replicate(mesh, fresh.variables)
    a = evaluation.evaluate(model, variables, d, None, 0, step=ev)
    b = evaluation.evaluate(model, fresh.variables, x, y, 37, preprocess=PREPROCESS)
    logits = np.asarray(jax.jit(model.apply)(fresh.variables, PREPROCESS(x)))
    assert a["accuracy"] == b["accuracy"] == float(np.mean(logits.argmax(1) == y))
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="at least one example"):
        evaluation.put_eval_data(mesh, x[:0], y[:0], 16)


def test_bfloat16_tracks_float32_and_keeps_float32_state(tmp_path):
    """config.dtype='bfloat16': bf16 activations, float32 params / optimizer state / BN
    statistics / masks; over 3 epochs of the tiny dense run (loss 2.0 -> 0.12) each epoch's
    training loss stays within 0.05 + 5% of the float32 run's (bf16 keeps 8 mantissa bits;
    measured: at most 0.036 apart)."""
    import json

    import ml_collections

    from jaxprune import experiment
    from jaxprune.commands.compact import restore_run
    from tests.conftest import tiny_config_source

    losses = {}
    for dtype in ("float32", "bfloat16"):
        ns: dict = {}
        exec(tiny_config_source(dtype=dtype, epochs=3, method__name="dense", method__rate=0.0), ns)
        cfg: ml_collections.ConfigDict = ns["get_config"]()
        experiment.run(cfg, tmp_path / dtype, progress=False)
        rows = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
        losses[dtype] = [r["train_loss"] for r in rows]
    assert experiment.setup(cfg).model.dtype == jnp.bfloat16
    _, state, _, _, _ = restore_run(tmp_path / "bfloat16")
    for tree in (state.params, state.batch_stats, state.opt_state, state.masks):
        floats = {np.asarray(x).dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {np.dtype(np.float32)}
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05, atol=0.05)
    assert losses["bfloat16"] != losses["float32"]  # it really ran in another precision


def test_runs_together_equal_runs_one_by_one(tiny):
    """3 seeds vectorised over a run axis (own init, own batch order each) == each trained
    alone, to float rounding (the vmapped convolutions are batched into one: measured
    differences ~1e-7), and hard-pruned channels stay exactly zero in every run."""
    model, graph, opt, mesh, method, (x, y), _ = _setup(tiny, steps=3)
    seeds = (0, 1, 2)
    states = [parallel.replicate(mesh, train_step.prune_init(method,
        train_step.create_train_state(model, graph, jax.random.PRNGKey(s), x, opt))) for s in seeds]
    orders = [batching.epoch_batches(len(y), 16, seed=s, epoch=0).astype(np.int32) for s in seeds]
    xd, yd = parallel.put_replicated(mesh, x, y)
    zero = parallel.replicate(mesh, np.int32(0))

    alone = train_step.make_train_chunk(model, graph, opt, method, steps=3, mesh=mesh, augment=AUGMENT)
    singles = [alone(st, xd, yd, parallel.replicate(mesh, o), zero) for st, o in zip(states, orders)]
    together = train_step.make_train_chunk(model, graph, opt, method, steps=3, mesh=mesh,
                                   augment=AUGMENT, runs=3)
    st, metrics, pos = together(train_step.stack_runs(states), xd, yd, parallel.replicate(mesh, np.stack(orders)), zero)
    assert int(pos) == 3 and metrics["loss"].shape == (3, 3)
    for r, (single, m, _) in enumerate(singles):
        mine = train_step.unstack_runs(st)[r]
        for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(mine), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"][:, r], m["loss"], rtol=1e-5)
        assert np.all(np.asarray(mine.params["conv1"]["kernel"][..., 0]) == 0)

    ev = evaluation.make_eval_fn(model, mesh, PREPROCESS)
    ev_runs = evaluation.make_eval_fn(model, mesh, PREPROCESS, runs=3)
    test = evaluation.put_eval_data(mesh, *_batch(37, seed=4), 16)
    correct, _, _ = ev_runs(st.variables, test)
    assert correct.shape == (3,)
    assert [int(c) for c in correct] == [int(ev(v.variables, test)[0]) for v in train_step.unstack_runs(st)]
    with pytest.raises(ValueError, match="run axis"):
        train_step.unstack_runs({"a": jnp.zeros((2, 1)), "b": jnp.zeros((3, 1))})
