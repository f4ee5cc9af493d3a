"""Profile: where the compact model's inference time goes, and what compaction's reindexing costs.

For each setting (the paper rows of ``inference_methods.py``), the dense model,
the compact model at the method's exact widths and at hardware-aware widths (``width=8``) are
profiled with ``jax.profiler`` (eval forward, one batch size): seconds per call per category of
XLA instruction (`_harness.hlo_categories`): convolutions; dots (the classifier, and the
one-hot matmuls with which `jaxprune.models.gather_channels` moves the channels of a compact
model into the residual stream); gathers/scatters (how those moves were done before: each cost
XLA:CPU a transpose of the activation and back); pads/slices (the option-A shortcut's zero
channels); layout copies/transposes; elementwise BN/ReLU/adds.

Two derived columns say why a compact model misses its MAC-ratio ideal:

- **conv efficiency**: (dense conv seconds / compact conv seconds) / MAC ratio. Below 1 the
  narrower convolutions run at fewer MACs per second than the dense ones;
- **reindex as pad**: the compact model with every channel reindexing replaced by a plain
  zero-pad or slice of the same shape (wrong outputs; timing only), timed side by side
  (round-robin, median of ``--repeats``) against the real compact model: the speedup is the
  whole cost of reindexing, fusion breaks included, which the per-op profile cannot see.

Usage::

    python experiments/bench/compact_profile.py --batch 256 --append experiments/bench/records/compact_profile.md
    python experiments/bench/compact_profile.py --only "SFP 30% resnet20" --batch 8 --repeats 2
    python experiments/bench/compact_profile.py --only "SFP 30% resnet20,SFP 40% resnet56" --gathers
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import _harness as H  # noqa: F401  (puts the repository on sys.path)
import inference_methods as IM

CATEGORIES = ("conv", "dot", "gather/scatter", "pad/slice/concat", "transpose/copy", "elementwise", "other")


def bucket(category: str) -> str:
    """The column of a `_harness.hlo_categories` category (library prefixes dropped)."""
    c = category.replace("YNN ", "").replace("oneDNN ", "")
    if c.startswith("conv"):
        return "conv"
    return c if c in CATEGORIES else "other"


@contextlib.contextmanager
def moves_as_gathers():
    """Inside: `jaxprune.models.common.gather_channels` is a ``jnp.take`` from ``x`` with a zero
    channel appended - how compact models moved channels before the one-hot matmul (same values)."""
    import jax.numpy as jnp

    from jaxprune.models import common

    real = common.gather_channels

    def take(x, index, axis=-1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        return jnp.take(jnp.pad(x, pad), jnp.asarray(index, jnp.int32), axis=axis)

    common.gather_channels = take
    try:
        yield
    finally:
        common.gather_channels = real


@contextlib.contextmanager
def reindex_as_pad():
    """Inside: `jaxprune.models.common.reindex` returns a zero-pad / slice of the right width
    instead of moving channels (wrong values, same shapes; for timing the reindexing only)."""
    import jax.numpy as jnp

    from jaxprune.models import common

    real = common.reindex

    def fake(x, src, dst):
        n, m = x.shape[-1], len(tuple(dst))
        if n == m:
            return x
        if n > m:
            return x[..., :m]
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, m - n)])

    common.reindex = fake
    try:
        yield
    finally:
        common.reindex = real


def profile_setting(label, name, method_name, kwargs, residual, b, repeats, calls, gathers=False):
    """Rows ``(variant, MACs, profile dict)`` and the reindex-as-pad timing of each compact variant
    (with ``gathers``: also each compact variant with its channel moves as gathers)."""
    import jax

    import _setup as S
    from jaxprune import flops

    s, built = IM.build_variants(name, method_name, kwargs, residual)
    x, _ = S.batch(b)
    models = {"dense": (s.model, s.variables, flops.count(s.graph).macs)}
    models.update({k: (res.model, res.variables, macs) for k, (res, macs, _) in built.items()})
    variants = [(k, contextlib.nullcontext) for k in models]
    if gathers:
        variants += [(k, moves_as_gathers) for k in models if k != "dense"]
    rows, ablation = [], {}
    for variant, moves in variants:
        model, variables, macs = models[variant]
        with moves():
            jitted = jax.jit(lambda v, a, model=model: model.apply(v, a, train=False))
            comp = S.inference_fn(jitted, variables, x)
            prof = H.profile_categories(comp.fn, lambda j=jitted, v=variables: j.lower(v, x), calls)
        if moves is moves_as_gathers:
            variant += ", moves as gathers"
        rows.append((variant, macs, prof))
        if variant in built:
            with reindex_as_pad():
                fake = S.inference_fn(jax.jit(lambda v, a, model=model: model.apply(v, a, train=False)),
                                      variables, x)
            n_inner = max(1, 64 // b)
            t = H.interleave({"real": comp.fn, "pad": fake.fn}, repeats, n_inner, warmup=False)
            ablation[variant] = H.median(t["real"]) / H.median(t["pad"])
    return rows, ablation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="round-robin repeats of the reindex-as-pad timing")
    p.add_argument("--calls", type=int, default=3, help="calls inside each profiler trace")
    p.add_argument("--only", default="", help="comma-separated substrings of 'label model'")
    p.add_argument("--gathers", action="store_true",
                   help="also profile each compact model with its channel moves as gathers (the old way)")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)
    load = H.load_average()
    H.disable_compilation_cache()
    settings = [st for st in IM.SETTINGS if (st[0], st[1]) in IM.PAPER_ROWS]
    if a.only:
        settings = [st for st in settings if any(o in f"{st[0]} {st[1]}" for o in a.only.split(","))]
    threads = len(os.sched_getaffinity(0))
    head = ["ms / call"] + [f"{c} %" for c in CATEGORIES]
    lines = [f"### Where the compact model's inference time goes (batch {a.batch}, {threads} thread(s))", "",
             f"`jax.profiler` trace of {a.calls} eval calls per model; per-category shares of the "
             "instructions' time (`_harness.hlo_categories`; 'conv' includes fused BN/ReLU and any "
             "op fused into a convolution; 'dot' is the classifier and compaction's one-hot channel moves). conv efficiency = (dense conv time / compact conv time) / "
             "MAC ratio. 'reindex as pad' = speedup of the compact model when every channel "
             f"reindexing becomes a plain pad/slice (median of {a.repeats} round-robin repeats): the "
             "whole cost of compaction's reindexing.", "",
             "| method | model | variant | MAC ratio | " + " | ".join(head)
             + " | conv efficiency | reindex as pad |",
             "|---|---|---|---:|" + "---:|" * (len(head) + 2)]
    for label, name, mname, kwargs, residual in settings:
        print(f"[{label} {name}] ...", file=sys.stderr, flush=True)
        rows, ablation = profile_setting(label, name, mname, kwargs, residual, a.batch, a.repeats, a.calls,
                                         a.gathers)
        dense_macs, dense_prof = rows[0][1], rows[0][2]
        dense_conv = sum(v for k, v in dense_prof["seconds"].items() if bucket(k) == "conv")
        for variant, macs, prof in rows:
            per = {c: 0.0 for c in CATEGORIES}
            for k, v in prof["seconds"].items():
                per[bucket(k)] += v
            total = sum(per.values())
            ratio = dense_macs / macs
            eff = (dense_conv / per["conv"]) / ratio if per["conv"] else float("nan")
            abl = f"{ablation[variant]:.2f}x" if variant in ablation else ""
            lines.append(f"| {label} | {name} | {variant} | {ratio:.2f}x | {1e3 * prof['wall_s']:.1f} | "
                         + " | ".join(f"{100 * per[c] / total:.1f}" for c in CATEGORIES)
                         + f" | {eff:.2f} | {abl} |")
        print("\n".join(lines[-len(rows):]), file=sys.stderr, flush=True)
    H.report("\n".join(lines), argv, a.append, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
