"""Benchmark: XLA:CPU runs the convolutions of a loop body much slower than straight-line code.

ResNet-20 train step, batch 128, 5 steps, `jaxprune.perf.RECOMMENDED_CPU_FLAGS`: a plain jitted
`train_step` vs `make_train_step` (straight-line since this finding). Run with
`XLA_FLAGS=... taskset -c 1 python experiments/bench/loop_body_cpu.py`; record in
experiments/bench/records/loop_body_cpu.txt (the one-step lax.scan variant measured 3 img/s).
"""
import time, functools, jax, jax.numpy as jnp, numpy as np

from jaxprune import augment, batching, data, methods, optim, parallel, train_step as ts
from jaxprune.graph import trace_linen
from jaxprune.models import get_model
B, S = 128, 5
model = get_model("resnet20"); x1 = jnp.zeros((1, 32, 32, 3))
variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x1)
graph = trace_linen(model, variables, x1)
pr = methods.get_method("sfp", rate=0.0).pruner(graph, 1, S)
opt = optim.make_optimizer(0.01); mesh = parallel.make_mesh()
aug = functools.partial(augment.augment_batch, mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)
rs = np.random.RandomState(0); xh = rs.randint(0, 256, (S * B, 32, 32, 3)).astype(np.uint8); yh = rs.randint(0, 10, S * B).astype(np.int32)
st0 = parallel.replicate(mesh, ts.prune_init(pr, ts.create_train_state(model, graph, jax.random.PRNGKey(0), x1, opt)))
order = batching.epoch_batches(S * B, B, 0, 0).astype(np.int32)
# straight-line jit (old style)
sl = jax.jit(lambda s, x, y: ts.train_step(s, x, y, model=model, graph=graph, optimizer=opt, pruner=pr, augment=aug))
step = ts.make_train_step(model, graph, opt, pr, mesh=mesh, augment=aug)
chunk = ts.make_train_chunk(model, graph, opt, pr, steps=S, mesh=mesh, augment=aug)
xd, yd = parallel.put_replicated(mesh, xh, yh); od = parallel.replicate(mesh, order)
def t_sl():
    s = st0
    for idx in order: s, m = sl(s, xh[idx], yh[idx])
    return m["loss"]
def t_step():
    s = st0
    for idx in order: s, m = step(s, xh[idx], yh[idx])
    return m["loss"]
def t_chunk():
    s, m, _ = chunk(st0, xd, yd, od, parallel.replicate(mesh, np.int32(0)))
    return m["loss"]
for name, f in [("straight", t_sl), ("make_train_step", t_step), ("straight", t_sl), ("make_train_step", t_step)]:
    t = time.time(); jax.block_until_ready(f()); c = time.time() - t
    t = time.time(); jax.block_until_ready(f()); r = time.time() - t
    print(f"{name}: first {c:.1f}s, run {r:.2f}s = {S*B/r:.0f} img/s", flush=True)
