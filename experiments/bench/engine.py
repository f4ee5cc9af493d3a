"""Benchmark: the training engine's throughput against a minimal hand-written Flax loop.

All contestants train the same model on the same device-resident uint8 CIFAR-size data with
the same on-device augmentation (`jaxprune.augment.augment_batch`), SGD + momentum, batch 128,
and run interleaved (A B C A B C ...) so that load drift hits all alike; each sample is one
"epoch" of ``--steps`` steps; the table shows medians and ratios to the hand-written loop.

- **plain flax**: a minimal ``jax.jit`` train step (``model.apply`` with mutable BN
  statistics, cross-entropy, ``optax`` update), the batch gathered on the device from the
  resident data, one Python dispatch per step: the loop a Flax user writes.
- **jaxprune chunk (K steps/call)**: `jaxprune.train_step.make_train_chunk` with K steps per
  call (``--chunk``, one K or several comma-separated; default `jaxprune.training.auto_steps_per_call()`:
  what `fit` runs, 1 on CPU, 50 elsewhere; 0 = the whole epoch in one call), with the hard
  masking of SFP's masks (all ones), float32. The batch order and position stay on the device.
- **jaxprune chunk bf16**: the same with ``dtype=bfloat16`` (`config.dtype`).
- **jaxprune per-step (host batches)**: `make_train_step` fed numpy batches, one dispatch and
  one host-to-device copy of the images per step: the engine before the data stayed on the device.
- **jaxprune chunk, R runs together**: ``make_train_chunk(..., runs=R)``, R seeds vectorised
  over a run axis in one call (``--runs``, default 4; 0 leaves it out), at the last K of
  ``--chunk``; images/s counts the images of all R runs. **... bf16, R runs together**: the
  same with ``dtype=bfloat16``.

``--variants`` picks the contestants (default ``plain,chunk,chunk_bf16,host,runs``; also
``runs_bf16``): e.g. ``--variants plain,chunk_bf16,runs_bf16 --chunk 1,0`` is the bfloat16 table
of one step vs a whole epoch per call and of 1 vs R runs together.

On an accelerator, a chunk row timed more than twice as fast per step as the same program with
more steps per call is marked suspect and listed under the table (`implausible_chunks`): there
fewer steps per call mostly adds dispatches. Not on CPU, where XLA runs a loop body's
convolutions far slower than straight-line code, so one step per call is really faster there.

XLA_FLAGS: `jaxprune.perf.RECOMMENDED_CPU_FLAGS` on CPU, as the training commands use.
Dispatches per epoch are counted by wrapping the jitted callables; host copies of images per
epoch are 0 for the resident variants (`fit` runs its steps under
``jax.transfer_guard_host_to_device('disallow')``) and one per step for the per-step variant.

Usage::

    python experiments/bench/engine.py --models resnet20 --steps 20 --repeats 3
    python experiments/bench/engine.py --runs 0      # on CPU: vmapped runs are grouped convs
    python experiments/bench/engine.py --models resnet56 --steps 390 --chunk 1,0 \
        --variants plain,chunk_bf16,runs_bf16     # GPU: 1 step vs a whole epoch per call, 1 vs 4 runs
    python experiments/bench/engine.py --append experiments/bench/records/engine.md
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import _harness as H


VARIANTS = ("plain", "chunk", "chunk_bf16", "host", "runs", "runs_bf16")
DEFAULT_VARIANTS = "plain,chunk,chunk_bf16,host,runs"


def contestants(name: str, steps: int, batch: int, runs: int, variants: tuple[str, ...],
                chunks: tuple[int, ...]):
    """``(label -> callable running one timed epoch, label -> dispatches per epoch)`` of the
    ``variants`` (keys of `VARIANTS`); the chunk variants run for every K of ``chunks``, the
    runs-together ones at the last K."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxprune import augment as aug, batching, data, methods, optim, parallel, train_step
    from jaxprune.graph import trace_linen
    from jaxprune.models import get_model

    n = steps * batch
    rs = np.random.RandomState(0)
    x_host = rs.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    y_host = rs.randint(0, 10, n).astype(np.int32)
    augment = functools.partial(aug.augment_batch, mean=data.CIFAR10_MEAN, std=data.CIFAR10_STD)
    order_host = batching.epoch_batches(n, batch, seed=0, epoch=0).astype(np.int32)
    opt = optim.make_optimizer(0.01)
    x1 = jnp.zeros((1, 32, 32, 3))
    counts = {}
    out = {}

    # -- plain flax: the loop a user writes
    model = get_model(name)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x1)
    mesh = parallel.make_mesh()
    xd, yd = parallel.put_replicated(mesh, x_host, y_host)
    order = jnp.asarray(order_host)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def plain_step(carry, idx):
        params, bs, opt_state, rng = carry
        rng, k = jax.random.split(rng)
        x = augment(k, xd[idx])

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True,
                                      mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, yd[idx]).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, u), upd["batch_stats"], opt_state, rng), loss

    plain = [(variables["params"], variables["batch_stats"], opt.init(variables["params"]),
              jax.random.PRNGKey(1))]

    def run_plain():
        c = plain[0]
        loss = None
        for i in range(steps):
            c, loss = plain_step(c, order[i])
        plain[0] = c
        return loss

    if "plain" in variants:
        out["plain flax"], counts["plain flax"] = run_plain, steps

    # -- jaxprune: K steps per call, f32 and bf16
    ks = [train_step.chunk_steps(steps, c) for c in chunks]
    dtypes = [(f"jaxprune chunk{tag} ({k} steps/call)", dtype, k)
              for key, tag, dtype in (("chunk", "", jnp.float32), ("chunk_bf16", " bf16", jnp.bfloat16))
              if key in variants for k in ks]
    for label, dtype, k in dtypes:
        m = get_model(name, dtype=dtype)
        graph = trace_linen(m, variables, x1)
        pr = methods.get_method("sfp", rate=0.0).pruner(graph, 1, steps)
        st = train_step.create_train_state(m, graph, jax.random.PRNGKey(0), x1, opt, mesh=mesh)
        st = parallel.replicate(mesh, train_step.prune_init(pr, st))
        chunk = train_step.make_train_chunk(m, graph, opt, pr, steps=k, mesh=mesh,
                                          augment=augment, donate=True)
        od = parallel.replicate(mesh, order_host)
        box = [st]

        def run_chunk(chunk=chunk, box=box, od=od):
            s, pos, metrics = box[0], parallel.replicate(mesh, np.int32(0)), None
            for _ in range(steps // k):
                s, metrics, pos = chunk(s, xd, yd, od, pos)
            box[0] = s
            return metrics["loss"]

        out[label], counts[label] = run_chunk, steps // k

    # -- jaxprune per-step on host batches (the engine before)
    graph = trace_linen(model, variables, x1)
    pr = methods.get_method("sfp", rate=0.0).pruner(graph, 1, steps)
    if "host" in variants:
        st = train_step.create_train_state(model, graph, jax.random.PRNGKey(0), x1, opt, mesh=mesh)
        step = train_step.make_train_step(model, graph, opt, pr, mesh=mesh, augment=augment,
                                        donate=True)
        box = [parallel.replicate(mesh, train_step.prune_init(pr, st))]

        def run_host():
            s, m = box[0], None
            for idx in order_host:
                s, m = step(s, x_host[idx], y_host[idx])
            box[0] = s
            return m["loss"]

        out["jaxprune per-step (host batches)"] = run_host
        counts["jaxprune per-step (host batches)"] = steps

    # -- R runs together (the seeds of a row), vectorised over a run axis, at the last K
    k = ks[-1]
    for key, tag, dtype in (("runs", "", jnp.float32), ("runs_bf16", " bf16", jnp.bfloat16)):
        if not runs or key not in variants:
            continue
        m = get_model(name, dtype=dtype)
        g = trace_linen(m, variables, x1)
        pr = methods.get_method("sfp", rate=0.0).pruner(g, 1, steps)
        chunk = train_step.make_train_chunk(m, g, opt, pr, steps=k, mesh=mesh,
                                          augment=augment, donate=True, runs=runs)
        sts = [train_step.prune_init(pr, train_step.create_train_state(m, g, jax.random.PRNGKey(r), x1, opt))
               for r in range(runs)]
        orders = np.stack([batching.epoch_batches(n, batch, seed=r, epoch=0) for r in range(runs)])
        od = parallel.replicate(mesh, orders.astype(np.int32))
        many = [parallel.replicate(mesh, train_step.stack_runs(sts))]

        def run_many(chunk=chunk, many=many, od=od):
            s, pos, metrics = many[0], parallel.replicate(mesh, np.int32(0)), None
            for _ in range(steps // k):
                s, metrics, pos = chunk(s, xd, yd, od, pos)
            many[0] = s
            return metrics["loss"]

        label = f"jaxprune chunk{tag}, {runs} runs together ({k} steps/call)"
        out[label], counts[label] = run_many, steps // k
    return out, counts


def implausible_chunks(step_seconds: dict[str, float], slack: float = 0.5) -> dict[str, str]:
    """The chunk variants timed more than ``1 / slack`` times faster per step than the same
    program with MORE steps per call (`contestants`' labels ``... (K steps/call)``, compared
    within one dtype and run count). On an accelerator more steps per call mostly removes
    dispatches, so such a time did not wait for the device (not for XLA:CPU, whose loop bodies
    run slower: `main` checks accelerators only). ``step_seconds``: label -> median seconds per
    step; returns label -> why."""
    import re

    groups: dict[str, list[tuple[int, str]]] = {}
    for label in step_seconds:
        m = re.fullmatch(r"(jaxprune chunk.*)\((\d+) steps/call\)", label)
        if m:
            groups.setdefault(m.group(1), []).append((int(m.group(2)), label))
    out = {}
    for members in groups.values():
        for k, label in members:
            for k2, other in members:
                if k2 > k and step_seconds[label] < slack * step_seconds[other]:
                    out[label] = (f"{step_seconds[label] * 1e3:.3f} ms per step at {k} steps/call, "
                                  f"faster than {step_seconds[other] * 1e3:.3f} ms at {k2} steps/call")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", type=int, default=4, help="runs trained together (0: leave out)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated contestants, of {','.join(VARIANTS)}")
    p.add_argument("--chunk", default="-1",
                   help="steps per call of the chunk variants, one or several comma-separated "
                        "(-1: fit's default for the device; 0: the whole epoch)")
    p.add_argument("--append", default="", help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit(f"--steps {args.steps}, --batch {args.batch}, --repeats {args.repeats}: "
                         "expected positive integers")
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants {args.variants}: expected a comma-separated subset of {','.join(VARIANTS)}")
    try:
        chunks = tuple(int(c) for c in args.chunk.split(","))
    except ValueError:
        chunks = ()
    if not chunks or any(c < -1 for c in chunks):
        raise SystemExit(f"--chunk {args.chunk}: expected comma-separated integers >= -1")
    load = H.load_average()
    from jaxprune import perf

    perf.use_recommended_cpu_flags()  # as the CLI's training commands (before jax starts)
    H.disable_compilation_cache()
    from jaxprune.training import auto_steps_per_call

    rows, notes = [], []
    for name in args.models.split(","):
        ks = tuple(auto_steps_per_call() if c == -1 else c for c in chunks)
        fns, counts = contestants(name, args.steps, args.batch, args.runs, variants, ks)
        first = len(rows)
        times = H.interleave(fns, repeats=args.repeats)
        import jax

        suspects = {} if jax.default_backend() == "cpu" else implausible_chunks(
            {label: H.median(ts) / args.steps for label, ts in times.items()})
        notes += [f"{name}, {label}: {why}" for label, why in suspects.items()]
        ref = next(iter(times))  # the ratios' reference: plain flax when it runs, else the first
        base = H.median(times[ref])
        for label, ts in times.items():
            med = H.median(ts)
            images = args.batch * args.steps * (args.runs if "together" in label else 1)
            ref_images = args.batch * args.steps * (args.runs if "together" in ref else 1)
            mark = " (suspect, see below)" if label in suspects else ""
            rows.append(f"| {name} | {label}{mark} | {images / med:.0f} | "
                        f"{base * images / (med * ref_images):.2f} | {counts[label]} | "
                        f"{H.spread(ts)} |")
        print("\n".join(rows[first:]), file=sys.stderr, flush=True)  # progress, model by model
    text = "\n".join([
        f"### Training engine vs a hand-written Flax loop ({args.steps}-step epochs, batch "
        f"{args.batch}, median of {args.repeats} interleaved repeats)", "",
        f"| model | variant | images/s | images/s vs {'plain flax' if 'plain' in variants else 'the first variant'} "
        "| dispatches / epoch | spread |",
        "|---|---|---|---|---|---|", *rows,
        *(["", "Suspect rows (not valid measurements):", *[f"- {n}" for n in notes]] if notes else [])])
    H.report(text, argv, args.append, load)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
