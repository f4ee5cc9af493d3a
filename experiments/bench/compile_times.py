"""Benchmark: compile and set-up times of the pieces of a pruning run, ResNet-20/56/110.

Per model (batch 128 steps, fresh compilations: no persistent cache):

- **trace**: `jaxprune.graph.trace_linen` (jaxpr tracing + channel propagation), policy 'scatter';
- **train step**: ``make_train_step(..., mask_hard=True).jitted`` lower + compile;
- **evaluation**: ``make_eval_fn(...).jitted`` (the whole-set scan, 4 batches) lower + compile;
- **re-selection**: SFP's jitted pruner ``update`` (traced epoch count) lower + compile;
- **compaction**: ``compact(model, variables, masks, graph)`` with SFP's masks (host surgery
  + slicing, first call, so it includes the small jitted slicing programs it runs).

Everything runs once per model (compile times barely vary; ``--repeats`` repeats the
whole set and reports medians).

Usage::

    python experiments/bench/compile_times.py --quick                 # ResNet-20 only
    python experiments/bench/compile_times.py --append experiments/bench/records/compile_times.md
"""

from __future__ import annotations

import argparse
import sys
import time

import _harness as H  # noqa: F401  (puts the repository on sys.path)


def measure(name: str, batch_size: int, rate: float) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import _setup as S
    from jaxprune import evaluation, methods, optim, parallel, train_step
    from jaxprune.compaction import compact
    from jaxprune.graph import trace_linen
    from jaxprune.models import get_model

    out: dict[str, float] = {}
    model = get_model(name)
    x1 = jnp.zeros((1,) + S.IMAGE)
    t0 = time.perf_counter()
    variables = jax.jit(lambda k: model.init(k, x1))(jax.random.PRNGKey(1))
    H.block(variables)
    out["model.init (first jax call: backend start + jit)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = trace_linen(model, variables, x1, residual="scatter")
    out["trace"] = time.perf_counter() - t0
    s = S.Setup(name, model, graph, variables, optim.make_optimizer(0.1))
    x, y = S.batch(batch_size)

    method = methods.get_method("sfp", rate=rate)
    st, pr = S.method_state(s, method)
    step = train_step.make_train_step(model, graph, s.optimizer, pr, mask_hard=True)
    rst = parallel.replicate(step.mesh, st)
    xs, ys = parallel.shard_batch(step.mesh, x, y)
    lo, co, _ = H.compile_seconds(step.jitted, (rst.step, rst.params, rst.batch_stats, rst.opt_state),
                                  (rst.prune, rst.rng), xs, ys)
    out["train step: lower"], out["train step: compile"] = lo, co

    ev = evaluation.make_eval_fn(model)
    data = evaluation.put_eval_data(ev.mesh, np.concatenate([np.asarray(x)] * 4),
                                  np.concatenate([np.asarray(y)] * 4), batch_size)
    lo, co, _ = H.compile_seconds(ev.jitted, parallel.replicate(ev.mesh, st.variables), data.images,
                                  data.labels)
    out["eval step: lower"], out["eval step: compile"] = lo, co

    jitted = jax.jit(lambda state, e: train_step.prune_update(
        pr, state.replace(prune=state.prune._replace(count=e))))
    lo, co, _ = H.compile_seconds(jitted, st, jnp.asarray(3, jnp.int32))
    out["re-selection: lower"], out["re-selection: compile"] = lo, co

    masks = train_step.prune_finalize(pr, st).hard
    t0 = time.perf_counter()
    res = compact(model, variables, masks, graph)
    H.block(res.variables)
    out["compaction"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56,resnet110")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="ResNet-20 only")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)
    load = H.load_average()
    H.disable_compilation_cache()
    import _setup as S

    models = ["resnet20"] if a.quick else a.models.split(",")
    res = {}
    for name in models:
        runs = []
        for _ in range(a.repeats):
            import jax

            jax.clear_caches()
            runs.append(measure(name, a.batch, S.SFP_RATES.get(name, 0.3)))
        res[name] = {k: H.median([r[k] for r in runs]) for k in runs[0]}
        print(f"[{name}] {res[name]}", file=sys.stderr, flush=True)
    keys = list(next(iter(res.values())))
    lines = [f"### Compile and set-up times (seconds; batch {a.batch}; median of {a.repeats})", "",
             "| step | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{res[m][k]:.2f}" for m in models) + " |")
    text = "\n".join(lines)
    H.report(text, argv, a.append, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
