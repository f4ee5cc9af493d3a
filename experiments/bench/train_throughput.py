"""Benchmark: train-step throughput dense vs hard-masked vs compacted, and each step's compile time.

For every model (CIFAR ResNet-20/56/110, VGG-16; batch 128 of 32x32x3 inputs), three jitted
train steps of the library (`jaxprune.train_step.make_train_step`), timed side by side in one
process, round-robin (dense, masked, compact, dense, ...), median of ``--repeats``:

- **dense**: the full model, ``mask_hard=False`` (nothing masked).
- **masked**: the full model with SFP's final hard masks at the paper rate (``SFP_RATES``: 30%,
  ResNet-56 40%; L2 criterion, residual policy 'scatter'), ``mask_hard=True``: gradients,
  updates, params, optimizer moments and BN statistics of pruned channels multiplied by the
  masks in every step - what GHFP/PFEC fine-tuning runs.
- **compact**: ``compact(model, variables, masks, graph)``'s smaller model with its own plain
  step (``mask_hard=False``, no graph) - training after compaction.

Compile time = ``jit(step).lower(...)`` + ``.compile()`` wall time (no persistent cache).

Usage::

    python experiments/bench/train_throughput.py --quick          # ResNet-20 and -56, 2 repeats
    python experiments/bench/train_throughput.py --repeats 3 --append experiments/bench/records/train_throughput.md
    python experiments/bench/train_throughput.py --xla-flags recommended   # jaxprune.perf flags
"""

from __future__ import annotations

import argparse
import os
import sys


def _early_flags(argv) -> None:
    # XLA reads XLA_FLAGS when its backend starts: apply before anything touches jax.
    args = sys.argv[1:] if argv is None else argv
    if "--xla-flags" in args and args[args.index("--xla-flags") + 1] == "recommended":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from jaxprune import perf

        perf.use_recommended_cpu_flags()


def bench_model(name: str, batch_size: int, repeats: int, inner: int, rate: float) -> dict:
    import _harness as H
    import _setup as S
    from jaxprune import flops

    s = S.setup(name, residual="scatter")
    x, y = S.batch(batch_size)
    method = S.methods.get_method("sfp", rate=rate)
    st, pr = S.method_state(s, method)
    masked_state = S.step_lib.prune_finalize(pr, st)  # masks == hard, pruned slices and moments zeroed
    masks = masked_state.hard
    res, compact_s = S.compact_setup(s, masks)
    dense_state = S.with_variables(S.fresh_state(s), s.variables, s.optimizer)
    compact_state = S.with_variables(S.fresh_state(s, model=res.model), res.variables, s.optimizer)

    steps = {
        "dense": S.train_step(s.model, None, dense_state, s.optimizer, x, y, mask_hard=False),
        "masked": S.train_step(s.model, s.graph, masked_state, s.optimizer, x, y, mask_hard=True),
        "compact": S.train_step(res.model, None, compact_state, s.optimizer, x, y, mask_hard=False),
    }
    t = H.interleave({k: c.fn for k, c in steps.items()}, repeats, inner, warmup=False)
    dense_macs = flops.count(s.graph).macs
    return {
        "name": name, "rate": rate, "t": t, "compile": {k: c.compile_s for k, c in steps.items()},
        "lower": {k: c.lower_s for k, c in steps.items()},
        "ideal": dense_macs / flops.count(s.graph, masks).macs, "compact_s": compact_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56,resnet110,vgg16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--inner", type=int, default=1)
    p.add_argument("--xla-flags", choices=("default", "recommended"), default="default",
                   help="'recommended': jaxprune.perf.RECOMMENDED_CPU_FLAGS")
    p.add_argument("--quick", action="store_true", help="ResNet-20 and ResNet-56, 2 repeats")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)
    _early_flags(argv)
    import _harness as H
    import _setup as S

    load = H.load_average()
    H.disable_compilation_cache()
    if a.quick:
        a.models, a.repeats = "resnet20,resnet56", min(a.repeats, 2)
    b = a.batch
    lines = [f"### Train-step throughput: dense vs hard-masked vs compact (batch {b})", "",
             f"Median of {a.repeats} round-robin repeats x {a.inner} step(s) per model; masks: "
             "SFP's final hard masks (L2, policy 'scatter') at the rate shown; compile = "
             f"lower + compile of the jitted step. XLA flags: {a.xla_flags}.", "",
             "| model | SFP rate | variant | ms/step | images/s | vs dense | ideal (MAC ratio) | "
             "lower + compile s |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name in a.models.split(","):
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        r = bench_model(name, b, a.repeats, a.inner, S.SFP_RATES.get(name, 0.3))
        dense = H.median(r["t"]["dense"])
        for k, ts in r["t"].items():
            m = H.median(ts)
            ideal = f"{r['ideal']:.2f}x" if k == "compact" else ""
            lines.append(f"| {name} | {r['rate']:.0%} | {k} | {1e3 * m:,.0f} ({H.spread(ts)}) | "
                         f"{b / m:.1f} | {dense / m:.2f}x | {ideal} | "
                         f"{r['lower'][k]:.1f} + {r['compile'][k]:.1f} |")
        print("\n".join(lines[-3:]), file=sys.stderr, flush=True)
    text = "\n".join(lines)
    H.report(text, argv, a.append, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
