"""Benchmark: compacted vs dense ResNet-56 inference, and the cost of masking in a train step.

Measured side by side in one process, interleaved, median of ``--repeats`` timings each:

1. Inference throughput (images/s, eval mode, batch 256) of the dense ResNet-56 and of its
   compacted copies: SFP 40% with the residual stream kept full width (policy a, 'scatter')
   and 40% of every residual-coupled group (policy b, 'coupled'); next to the ideal speedup
   (dense conv MACs / compact conv MACs).
2. One jitted train step (forward, backward, SGD update) with hard masks applied to
   gradients, updates, params and optimizer moments, vs the same step without masking.

Usage (prints a Markdown table; ``--append`` adds it to a record file with the command)::

    python experiments/bench/compact_speed.py --repeats 7 --append experiments/bench/records/compact_speed.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxprune import criteria, flops, selection
from jaxprune.compaction import compact
from jaxprune.graph import trace_linen
from jaxprune.masks import apply_masks
from jaxprune.models import get_model


def _time(fn, *args, repeats: int, inner: int) -> list[float]:
    """Seconds per call of ``fn(*args)`` (blocked), ``repeats`` samples of ``inner`` calls."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / inner)
    return out


def _pruned(model, variables, x, residual: str, rate: float):
    graph = trace_linen(model, variables, x, residual=residual)
    groups = graph.conv_groups()
    scores = criteria.l2_norm(variables, graph)
    masks = selection.prune_by_rate({g: scores[g] for g in groups}, rate)
    masks = {g: masks.get(g, jnp.ones((graph.groups[g].size,))) for g in graph.groups}
    return graph, masks


def bench_inference(depth: int, batch: int, rate: float, repeats: int, inner: int) -> list[dict]:
    model = get_model(f"resnet{depth}")
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    dense_graph = trace_linen(model, variables, x[:1])
    dense_macs = flops.count(dense_graph).macs

    runs = {"dense": (model, variables, dense_macs, None)}
    for label, residual in (("SFP 40% (a: scatter)", "scatter"), ("coupled 40% (b)", "coupled")):
        graph, masks = _pruned(model, variables, x[:1], residual, rate)
        masked_out = model.apply(apply_masks(variables, masks, graph), x[:8], train=False)
        for align in (1, 8):
            res = compact(model, variables, masks, graph, align=align)
            compact_out = res.model.apply(res.variables, x[:8], train=False)
            err = float(jnp.linalg.norm(compact_out - masked_out) / jnp.linalg.norm(masked_out))
            name = label if align == 1 else f"{label}, widths aligned to {align}"
            runs[name] = (res.model, res.variables, flops.count(graph, res.kept).macs, err)

    fns = {k: jax.jit(lambda v, a, m=m: m.apply(v, a, train=False)) for k, (m, *_rest) in runs.items()}
    samples = {k: [] for k in runs}
    for _ in range(repeats):  # interleave so drift hits every variant alike
        for k, (m, v, _, _) in runs.items():
            samples[k] += _time(fns[k], v, x, repeats=1, inner=inner)
    med = {k: statistics.median(s) for k, s in samples.items()}
    rows = []
    for k, (_, _, macs, err) in runs.items():
        speed = med["dense"] / med[k]
        ideal = dense_macs / macs
        rows.append(dict(variant=k, macs=macs, img_s=batch / med[k], speedup=speed, ideal=ideal,
                         frac=speed / ideal, err=err))
    return rows


def bench_mask_overhead(depth: int, batch: int, repeats: int, inner: int) -> dict:
    from jaxprune import methods, optim, train_step

    model = get_model(f"resnet{depth}")
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    graph = trace_linen(model, variables, x[:1], residual="scatter")
    opt = optim.make_optimizer(0.1)
    pr = methods.get_method("dense").pruner(graph, 1)
    state = train_step.create_train_state(model, graph, jax.random.PRNGKey(3), x[:1], opt)
    steps = {
        "plain": train_step.make_train_step(model, graph, opt, pr, mask_hard=False),
        "masked": train_step.make_train_step(model, graph, opt, pr, mask_hard=True),
    }
    samples = {k: [] for k in steps}

    def run(step, n):
        s = state
        for _ in range(n):
            s, _ = step(s, x, y)
        return s.params

    for k, step in steps.items():
        jax.block_until_ready(run(step, 1))
    for _ in range(repeats):
        for k, step in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(step, inner))
            samples[k].append((time.perf_counter() - t0) / inner)
    med = {k: statistics.median(s) for k, s in samples.items()}
    return dict(plain=med["plain"], masked=med["masked"], overhead=med["masked"] / med["plain"] - 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--rate", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)

    dev = jax.devices()[0]
    machine = f"{dev.platform} ({dev.device_kind}), {jax.device_count()} device(s), " \
              f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
    lines = [f"### ResNet-{a.depth}: compact vs dense inference (batch {a.batch}), masked vs plain train step",
             "", f"Machine: {machine}. Median of {a.repeats} interleaved repeats x {a.inner} calls.", "",
             "| variant | conv MACs | images/s | speedup | ideal (MAC ratio) | speedup / ideal | rel. err vs masked |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in bench_inference(a.depth, a.batch, a.rate, a.repeats, a.inner):
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        lines.append(f"| {r['variant']} | {r['macs']:,} | {r['img_s']:.0f} | {r['speedup']:.2f}x | "
                     f"{r['ideal']:.2f}x | {r['frac']:.2f} | {err} |")
    if not a.skip_train:
        t = bench_mask_overhead(a.depth, a.train_batch, a.repeats, a.inner)
        lines += ["", f"| train step (batch {a.train_batch}) | ms/step |", "|---|---:|",
                  f"| plain (no masks) | {1e3 * t['plain']:.1f} |",
                  f"| hard masks on grads, updates, params, moments | {1e3 * t['masked']:.1f} |",
                  f"| overhead | {100 * t['overhead']:+.1f}% |"]
    text = "\n".join(lines)
    print(text)
    if a.append:
        cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
        with open(a.append, "a") as f:
            f.write(f"\n{text}\n\nCommand: `{cmd}`\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
