"""Benchmark: cost of one mask re-selection relative to one epoch of training.

SFP and GHFP re-select their masks at the end of every epoch (the pruner's ``update``:
score every filter, rank, build masks, zero the selected filters; GHFP also grows the hard
set and zeroes optimizer moments). Timed here jitted with a traced epoch
(``jax.jit`` of ``prune_update`` with a traced epoch count, one compilation for every epoch),
steady state, round-robin with the library's train step of the same model (``mask_hard=True``
as `jaxprune.training.fit` runs it) in one process; one epoch = 390 steps of batch 128
(CIFAR's 50,000 images, drop-last), estimated from the measured step time.

Usage::

    python experiments/bench/reselect_cost.py --quick
    python experiments/bench/reselect_cost.py --repeats 5 --append experiments/bench/records/reselect_cost.md
"""

from __future__ import annotations

import argparse

import _harness as H  # noqa: F401  (puts the repository on sys.path)


def bench(model_name: str, rate: float, batch_size: int, repeats: int, inner: int,
          steps_per_epoch: int, with_step: bool = True) -> dict:
    import jax
    import jax.numpy as jnp

    import _setup as S
    from jaxprune import methods

    s = S.setup(model_name, residual="scatter")
    x, y = S.batch(batch_size)
    fns, compile_s = {}, {}
    for mname in ("sfp", "ghfp"):
        method = methods.get_method(mname, rate=rate)
        st, pr = S.method_state(s, method, total_epochs=200)
        jitted = jax.jit(lambda state, e, p=pr: S.step_lib.prune_update(
            p, state.replace(prune=state.prune._replace(count=e))))
        epoch = jnp.asarray(10, jnp.int32)
        _, compile_s[f"{mname} re-selection"], compiled = H.compile_seconds(jitted, st, epoch)
        box = [st]

        def fn(compiled=compiled, box=box, epoch=epoch):
            box[0] = compiled(box[0], epoch)
            return box[0].masks

        H.block(fn())
        fns[f"{mname} re-selection"] = fn
        if mname == "sfp":
            sfp_state, sfp_pruner = st, pr
    step_t = None
    if with_step:
        c = S.train_step(s.model, s.graph, sfp_state, s.optimizer, x, y, mask_hard=True,
                         pruner=sfp_pruner)
        fns["train step"] = c.fn
        compile_s["train step"] = c.compile_s
    t = H.interleave(fns, repeats, inner, warmup=False)
    if with_step:
        step_t = H.median(t["train step"])
    return {"t": t, "compile": compile_s, "step": step_t, "epoch": None if step_t is None
            else step_t * steps_per_epoch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--rate", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps-per-epoch", type=int, default=390)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 repeats")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)
    load = H.load_average()
    H.disable_compilation_cache()
    if a.quick:
        a.repeats = min(a.repeats, 3)
    r = bench(a.model, a.rate, a.batch, a.repeats, 1, a.steps_per_epoch)
    lines = [f"### Mask re-selection cost vs one training epoch ({a.model}, rate {a.rate:.0%}, "
             f"batch {a.batch})", "",
             f"Jitted pruner `update` (traced epoch count), steady state, round-robin with the "
             f"library train step in one process, median of {a.repeats} repeats; epoch = "
             f"{a.steps_per_epoch} steps x the measured step time.", "",
             "| operation | ms per call | per epoch of training | compile s |", "|---|---:|---:|---:|"]
    epoch = r["epoch"]
    for k, ts in r["t"].items():
        m = H.median(ts)
        share = f"{100 * m / epoch:.4f}%" if "re-selection" in k else f"x{a.steps_per_epoch} = {epoch:,.0f} s"
        lines.append(f"| {k} | {1e3 * m:,.1f} ({H.spread(ts)}) | {share} | {r['compile'][k]:.1f} |")
    text = "\n".join(lines)
    H.report(text, argv, a.append, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
