"""Multi-process training: 2 processes on this machine joined by ``jax.distributed`` (CPU
collectives through gloo), one CPU device each, train the tiny model with `fit` to the same
result as 1 process with 2 devices; the checkpoint is written once and either can restore it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = textwrap.dedent(r"""
    import functools, json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, sys.argv[1])
    out_dir, ckpt_dir = sys.argv[2], sys.argv[3]
    from jaxprune import optim, parallel, train_step, training as tr
    distributed = parallel.maybe_initialize_distributed()
    import numpy as np
    from tests.test_training import TinyNet, ToyPrune, AUGMENT, PREPROCESS, _batch
    from jaxprune.checkpoints import make_checkpoint_manager, restore_checkpoint
    from jaxprune.graph import trace_linen

    assert jax.device_count() == 2, jax.devices()
    model = TinyNet()
    x0 = np.zeros((1, 8, 8, 3), np.float32)
    graph = trace_linen(model, jax.eval_shape(functools.partial(model.init, train=False),
                                              jax.random.PRNGKey(0), x0), x0)
    pruner = ToyPrune().pruner(graph, 2, 3)
    opt = optim.make_optimizer(0.1)
    train, test = _batch(48, seed=6), _batch(20, seed=7)
    fresh = train_step.create_train_state(model, graph, jax.random.PRNGKey(11), train[0], opt)
    mgr = make_checkpoint_manager(ckpt_dir, async_save=True)
    state, hist = tr.fit(model, graph, pruner, fresh, opt, train, test, tr.FitOptions(
        epochs=2, batch_size=16, seed=3, augment=AUGMENT, preprocess=PREPROCESS,
        progress=False, checkpoint_manager=mgr, steps_per_call=1))
    restored, meta = restore_checkpoint(mgr, train_step.prune_init(pruner, fresh))
    mgr.close()
    same = all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)))
    params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v).tolist()
              for path, v in jax.tree_util.tree_leaves_with_path(state.params)}
    with open(f"{out_dir}/p{jax.process_index()}.json", "w") as f:
        json.dump({"params": params, "history": hist, "restored_equal": same,
                   "processes": jax.process_count(), "distributed": distributed}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    base = dict(os.environ, JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        base.pop(k, None)
    one = tmp_path / "one"
    two = tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # reference: one process, two (simulated) devices
    ref = subprocess.run([sys.executable, "-c", _SCRIPT, str(REPO), str(one), str(one / "ckpt")],
                         env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, str(REPO), str(two), str(two / "ckpt")],
                              env=dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    r = json.loads((one / "p0.json").read_text())
    a, b = (json.loads((two / f"p{i}.json").read_text()) for i in range(2))
    assert (r["processes"], a["processes"], b["processes"]) == (1, 2, 2) and a["distributed"]
    assert a["params"] == b["params"]  # both processes hold the same (replicated) state
    for k, v in r["params"].items():
        np.testing.assert_allclose(a["params"][k], v, rtol=1e-5, atol=1e-6)
    assert [e["test_accuracy"] for e in a["history"]] == [e["test_accuracy"] for e in r["history"]]
    # written once, by the 2 processes together, restorable by either
    assert a["restored_equal"] and b["restored_equal"]
    steps = sorted(p.name for p in (two / "ckpt").iterdir() if p.name.isdigit())
    assert steps == ["1", "2"]
