"""Benchmark: inference throughput of every method's compacted model vs its dense model.

One row per paper setting, each method's own selection code on random-init weights (the
masks' STRUCTURE, not accuracy, decides the speed):

- **SFP** ResNet-20/32/110 at 30%, ResNet-56 at 40% (L2, policy 'scatter'): the pruner's ``finalize`` of
  the SFP method (its final selection at the full rate).
- **GHFP**: its final masks are SFP's at the same rate (GHFP's ``finalize``: everything selected
  at the full rate becomes hard), so the SFP rows are GHFP's; ``--ghfp`` measures them anyway.
- **PFEC** ResNet-56-A/B, ResNet-110-A/B, VGG-16-A: the PFEC method's ``init`` (one-shot L1
  selection of the named `PFEC_CONFIGS`, policy 'scatter').
- **HFP** ResNet-56, 50% MACs and 50% params (conv + FC convention, policy 'coupled', the
  config of jaxprune/configs/hfp_resnet56_cifar10.py): ``HFP.final_masks`` - the method's
  final global thresholding with both targets - on the BN scales. Random-init BN scales are
  all 1 (every score ties, which would prune whole layers in index order), so the scales are
  first drawn from |N(1, 0.25)| (seeded); documented substitute for trained scales.

For each: dense vs the compact model at the method's exact widths vs the compact model at
hardware-aware widths chosen BY THE METHOD (``width=8``: its final selection keeps a multiple of
8 filters per group, rounded up, so the trained masked model and the compact model are one
function) vs that model's ``jax.export`` artifact (serialized, deserialized, called through
``jax.jit``). Eval mode, every batch size of ``--batches``, round-robin, median of ``--repeats``;
ideal = dense / compact conv MACs. The thread count is the process's CPU affinity (pin with
``taskset``).

Usage::

    python experiments/bench/inference_methods.py --quick        # 3 settings, 3 repeats
    taskset -c 1 python experiments/bench/inference_methods.py --paper-rows --batches 1,256 \
        --repeats 5 --append experiments/bench/records/inference_paper_rows.md   # one thread
"""

from __future__ import annotations

import argparse
import os
import sys

import _harness as H  # noqa: F401  (puts the repository on sys.path)

SETTINGS = [
    # (label, model, method name, method kwargs, residual policy)
    ("SFP 30%", "resnet20", "sfp", {"rate": 0.3}, "scatter"),
    ("SFP 30%", "resnet32", "sfp", {"rate": 0.3}, "scatter"),
    ("SFP 40%", "resnet56", "sfp", {"rate": 0.4}, "scatter"),
    ("SFP 30%", "resnet110", "sfp", {"rate": 0.3}, "scatter"),
    ("GHFP 40%", "resnet56", "ghfp", {"rate": 0.4}, "scatter"),
    ("GHFP 30%", "resnet110", "ghfp", {"rate": 0.3}, "scatter"),
    ("PFEC-A", "resnet56", "pfec", {"config": "resnet56-A"}, "scatter"),
    ("PFEC-B", "resnet56", "pfec", {"config": "resnet56-B"}, "scatter"),
    ("PFEC-A", "resnet110", "pfec", {"config": "resnet110-A"}, "scatter"),
    ("PFEC-B", "resnet110", "pfec", {"config": "resnet110-B"}, "scatter"),
    ("PFEC-A", "vgg16", "pfec", {"config": "vgg16-A"}, "scatter"),
    ("HFP 50% MACs+params", "resnet56", "hfp",
     {"macs_reduction": 0.5, "params_reduction": 0.5}, "coupled"),
    ("SFP 40% coupled", "resnet56", "sfp", {"rate": 0.4}, "coupled"),
]
# the paper rows: SFP ResNet-20/56/110, PFEC-A/B ResNet-56, HFP ResNet-56, coupled 40%
PAPER_ROWS = [("SFP 30%", "resnet20"), ("SFP 40%", "resnet56"), ("SFP 30%", "resnet110"),
              ("PFEC-A", "resnet56"), ("PFEC-B", "resnet56"), ("HFP 50% MACs+params", "resnet56"),
              ("SFP 40% coupled", "resnet56")]


def method_masks(s, method_name: str, kwargs: dict):
    import jax
    import jax.numpy as jnp

    import _setup as S
    from jaxprune import methods

    method = methods.get_method(method_name, **kwargs)
    if method_name == "hfp":
        params = jax.tree_util.tree_map(lambda v: v, s.variables["params"])
        key = jax.random.PRNGKey(7)
        for grp in method.gated_groups(s.graph):
            for m in s.graph.groups[grp].members:
                if m.role == "vector" and m.path[0] == "params" and m.path[-1] == "scale":
                    node = params
                    for k in m.path[1:-1]:
                        node = node[k]
                    key, sub = jax.random.split(key)
                    node["scale"] = jnp.abs(1.0 + 0.25 * jax.random.normal(sub, node["scale"].shape))
        s.variables = {**s.variables, "params": params}
        masks, _beta = method.final_masks(params, s.graph)
        return masks
    if method_name == "pfec":
        st, _ = S.method_state(s, method)
        return st.hard
    return S.final_masks(s, method)


def exported_inference(model, variables, x):
    """The ``jax.export`` round trip of ``model``'s eval forward at ``x``'s shape, compiled."""
    import jax
    import jax.export

    import _setup as S

    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    fn = jax.jit(lambda v, a: model.apply(v, a, train=False))
    art = jax.export.export(fn)(jax.tree_util.tree_map(spec, variables), spec(x)).serialize()
    return S.inference_fn(jax.jit(jax.export.deserialize(art).call), variables, x)


def build_variants(name, method_name, kwargs, residual):
    """The setting's dense `_setup.Setup` and its compact models: ``{variant: (compaction result,
    conv MACs, rel. err of the compact vs the masked model's logits)}``, ``'compact, exact
    widths'`` and ``'compact, widths x8'`` (the method's own final selection with ``width=8``)."""
    import jax.numpy as jnp

    import _setup as S
    from jaxprune import flops
    from jaxprune.masks import apply_masks

    s = S.setup(name, residual=residual)
    dense_vars = s.variables
    built = {}
    for variant, width in (("compact, exact widths", None), ("compact, widths x8", 8)):
        s.variables = dense_vars
        masks = method_masks(s, method_name, kwargs if width is None else {**kwargs, "width": width})
        res, _ = S.compact_setup(s, masks)  # HFP's scales were redrawn: s.variables holds them
        x8, _ = S.batch(8)
        ref = s.model.apply(apply_masks(s.variables, masks, s.graph), x8, train=False)
        out = res.model.apply(res.variables, x8, train=False)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        built[variant] = (res, flops.count(s.graph, res.kept).macs, err)
    s.variables = dense_vars
    return s, built


def bench_setting(label, name, method_name, kwargs, residual, batches, repeats, inner):
    """``{batch: {variant: (seconds per call, conv MACs, rel. err vs masked)}}``, dense MACs."""
    import _setup as S
    from jaxprune import flops

    s, built = build_variants(name, method_name, kwargs, residual)
    dense_macs = flops.count(s.graph).macs
    out = {}
    for b in batches:
        x, _ = S.batch(b)
        runs = {"dense": (S.inference(s.model, s.variables, x), dense_macs, None)}
        for variant, (res, macs, err) in built.items():
            runs[variant] = (S.inference(res.model, res.variables, x), macs, err)
        res, macs, err = built["compact, widths x8"]
        runs["compact, widths x8, jax.export"] = (exported_inference(res.model, res.variables, x), macs, err)
        n_inner = inner * max(1, 64 // b)  # small batches: more calls per sample
        t = H.interleave({k: c.fn for k, (c, _, _) in runs.items()}, repeats, n_inner, warmup=False)
        out[b] = {k: (t[k], macs, err) for k, (_, macs, err) in runs.items()}
    return out, dense_macs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="128", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated substrings of 'label model'")
    p.add_argument("--ghfp", action="store_true", help="also time the GHFP rows (= SFP masks)")
    p.add_argument("--quick", action="store_true", help="SFP-56, PFEC-56-B, HFP-56; 3 repeats")
    p.add_argument("--paper-rows", action="store_true",
                   help="SFP ResNet-20/56/110, PFEC-A/B ResNet-56, HFP ResNet-56, coupled 40%%")
    p.add_argument("--append", default="")
    a = p.parse_args(argv)
    load = H.load_average()
    H.disable_compilation_cache()
    settings = [st for st in SETTINGS if a.ghfp or st[2] != "ghfp"]
    if a.quick:
        a.repeats = min(a.repeats, 3)
        settings = [st for st in settings if (st[0], st[1]) in
                    (("SFP 40%", "resnet56"), ("PFEC-B", "resnet56"), ("HFP 50% MACs+params", "resnet56"))]
    if a.paper_rows:
        settings = [st for st in settings if (st[0], st[1]) in PAPER_ROWS]
    if a.only:
        settings = [st for st in settings if any(o in f"{st[0]} {st[1]}" for o in a.only.split(","))]
    batches = [int(v) for v in a.batches.split(",")]
    threads = len(os.sched_getaffinity(0))
    lines = [f"### Inference: compacted vs dense at the paper rates, exact and hardware-aware widths "
             f"(batch {', '.join(map(str, batches))}; {threads} thread(s))", "",
             f"Eval mode, median of {a.repeats} round-robin repeats within each setting and batch size; "
             "masks from each method's own selection on random-init weights (HFP: |N(1, 0.25)| BN "
             "scales); GHFP's final masks are SFP's. 'widths x8': the method's final selection keeps "
             "multiples of 8 filters (`width=8`, rounded up), so masked == compact; 'jax.export': "
             "that compact model's serialized export, deserialized and called.", "",
             "| method | model | batch | variant | conv MACs | images/s | speedup | ideal (MAC ratio) | "
             "speedup / ideal | rel. err vs masked |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for label, name, mname, kwargs, residual in settings:
        print(f"[{label} {name}] ...", file=sys.stderr, flush=True)
        per_batch, dense_macs = bench_setting(label, name, mname, kwargs, residual, batches,
                                              a.repeats, a.inner)
        for b, rows in per_batch.items():
            dense_t = H.median(rows["dense"][0])
            for k, (ts, macs, err) in rows.items():
                m = H.median(ts)
                ideal = dense_macs / macs
                e = "" if err is None else f"{err:.1e}"
                lines.append(f"| {label} | {name} | {b} | {k} | {macs:,} | {b / m:,.0f} | "
                             f"{dense_t / m:.2f}x | {ideal:.2f}x | {dense_t / m / ideal:.2f} | {e} |")
            print("\n".join(lines[-len(rows):]), file=sys.stderr, flush=True)
    text = "\n".join(lines)
    H.report(text, argv, a.append, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
