"""Benchmark: the CPU train step (and inference) of CIFAR ResNet-56, JAX vs PyTorch, and where
the JAX step loses.

The same network in both frameworks (option-A shortcuts, no conv bias, BN after every conv,
batch 128, 32x32x3 inputs, SGD Nesterov + weight decay), the same thread count (every
workload is pinned to the same ``--threads`` cores with ``sched_setaffinity`` and PyTorch's
``set_num_threads``). Sections (``--sections``, default all):

``compare``  images/s of train step and inference: PyTorch vs the library's JAX step
             (`jaxprune.train_step.make_train_step`, no masking) under the default XLA flags
             and under `jaxprune.perf.RECOMMENDED_CPU_FLAGS`.
``flags``    the JAX train step under several XLA:CPU flag sets.
``profile``  where the JAX train step spends its time: per-op times from ``jax.profiler``
             (thunk events of the XLA:CPU runtime) grouped by HLO op category (forward /
             input-grad / weight-grad convolutions, transposes, elementwise, reductions),
             default vs recommended flags.
``scaling``  how the JAX train step's time grows with depth (``--depths``, default 20,56),
             with the models' block barriers expanded (XLA:CPU's default) and kept
             (recommended flags): interleaved ms/step, conv MACs, time per MAC, the
             compiled program's temporary memory, page faults and system time per step
             (``getrusage``), and the per-category profile with each category's growth
             next to the MAC ratio.
``variants`` code-level variants of the JAX step under one flag set, in one process:
             forward only / gradient only / full step, a functional re-implementation (same
             params, same numerics) in NHWC or NCHW, two-pass BN statistics, no BN, weight
             gradients through an im2col matmul, bf16 compute, buffer donation.

Variants that need different XLA flags (read once when the XLA backend starts) or a different
framework run in their own worker processes, started and compiled one after the other and
then timed round-robin (A B C A B C ...): only one runs at a time, the others wait on a pipe,
so load drift on a shared machine hits every variant alike (`_harness.Workers`). PyTorch runs
in its own worker so that its OpenMP pool and XLA's Eigen pool never compete.

Usage::

    python experiments/bench/torch_vs_jax.py --quick            # ResNet-20, 3 repeats
    python experiments/bench/torch_vs_jax.py --repeats 5 --append experiments/bench/records/torch_vs_jax.md

PyTorch is NOT a dependency of jaxprune: ``pip install torch==2.13.0`` (CPU wheel) first; the
torch rows are skipped with a note when it is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time

import _harness as H

DEFAULT_FLAGS = ""
FLAG_SETS = {
    # name -> XLA_FLAGS
    "default": "",
    "no YNN convs": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "no YNN convs, no YNN reductions":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-reduce",
    "no YNN at all (dot only)": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "no YNN convs + oneDNN custom calls":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
        "--xla_cpu_experimental_onednn_custom_call=true",
    "no YNN convs + use_onednn":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_cpu_use_onednn=true",
    "no YNN convs + XNN graph fusion":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "no YNN convs + fast math":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_cpu_enable_fast_math=true",
    "no YNN convs + single-threaded Eigen":
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
        "--xla_cpu_multi_thread_eigen=false",
}


def recommended_flags() -> str:
    from jaxprune import perf  # no jax import

    return " ".join(perf.RECOMMENDED_CPU_FLAGS)


# =============================================================================== PyTorch side


def torch_resnet(depth: int):
    """A minimal CIFAR ResNet (He et al. 2016, option A), as jaxprune.models.CifarResNet."""
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride = stride
            self.pad = (cout - cin) // 2 if (stride != 1 or cin != cout) else None

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            if self.pad is None:
                short = x
            else:  # option A: subsample, zero-pad the channels on both sides
                short = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
            return F.relu(y + short)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.stem_bn = nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for s, planes in enumerate((16, 32, 64)):
                for b in range(n):
                    blocks.append(Block(cin, planes, 2 if s > 0 and b == 0 else 1))
                    cin = planes
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, 10)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = F.relu(self.stem_bn(self.stem(x)))
            x = self.blocks(x)
            return self.fc(x.mean((2, 3)))

    return ResNet()


def torch_workload(spec: dict):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = torch_resnet(spec["depth"])
    if spec.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    b = spec["batch"]
    x = torch.randn(b, 3, 32, 32)
    if spec.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mode = spec["mode"]
    if mode == "step":
        model.train()

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return None
    elif mode == "grad":
        model.train()

        def fn():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    elif mode == "fwd":
        model.train()

        def fn():
            with torch.no_grad():
                return F.cross_entropy(model(x), y)
    elif mode == "infer":
        model.eval()

        def fn():
            with torch.inference_mode():
                return model(x)
    else:
        raise ValueError(mode)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    return fn, {"first_call_s": round(first, 2), "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()}


# =============================================================================== JAX side


def fn_resnet_apply(params, batch_stats, x, *, depth: int, train: bool, layout: str = "NHWC",
                    bn: str = "fast", wgrad: str = "conv", dtype=None):
    """The bundled CifarResNet as plain functions over ITS params tree (same numerics).

    ``layout``: 'NHWC' (flax's) or 'NCHW' dimension numbers (x given NHWC, transposed once);
    ``bn``: 'fast' (flax: var = E[x^2] - E[x]^2), 'twopass' (E[(x - mean)^2]) or 'none'
    (no normalisation: a BN-less cost reference, different numerics);
    ``wgrad``: 'conv' (autodiff) or 'im2col' (kernel gradient as one matmul of patches).
    Returns ``(logits, new_batch_stats)``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    nchw = layout == "NCHW"
    caxis = 1 if nchw else 3
    raxes = (0, 2, 3) if nchw else (0, 1, 2)
    dn = ("NCHW", "HWIO", "NCHW") if nchw else ("NHWC", "HWIO", "NHWC")
    if nchw:
        x = jnp.transpose(x, (0, 3, 1, 2))
    if dtype is not None:
        x = x.astype(dtype)
    new_bs = {}

    def conv(x, w, stride):
        if dtype is not None:
            w = w.astype(dtype)
        if wgrad == "im2col" and not nchw:
            return _conv_im2col(x, w, stride)
        return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=dn)

    def bshape(v):
        return v.reshape((1, -1, 1, 1) if nchw else (1, 1, 1, -1))

    def batchnorm(x, p, s, name):
        if bn == "none":
            return x
        if train:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, raxes)
            if bn == "twopass":
                var = jnp.mean(jnp.square(xf - bshape(mean)), raxes)
            else:
                var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), raxes) - jnp.square(mean))
            new_bs[name] = {"mean": 0.9 * s["mean"] + 0.1 * mean, "var": 0.9 * s["var"] + 0.1 * var}
        else:
            mean, var = s["mean"], s["var"]
        mul = lax.rsqrt(var + 1e-5) * p["scale"]
        y = (x - bshape(mean).astype(x.dtype)) * bshape(mul).astype(x.dtype) + bshape(p["bias"]).astype(x.dtype)
        return y

    def pad_channels(x, lo, hi):
        cfg = [(0, 0)] * 4
        cfg[caxis] = (lo, hi)
        return jnp.pad(x, cfg)

    x = conv(x, params["stem"]["kernel"], 1)
    x = jax.nn.relu(batchnorm(x, params["stem_bn"], batch_stats.get("stem_bn"), "stem_bn"))
    n = (depth - 2) // 6
    cin = 16
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            stride = 2 if (s > 1 and b == 0) else 1
            name = f"layer{s}_{b}"
            p, bs = params[name], batch_stats.get(name, {})
            y = conv(x, p["conv1"]["kernel"], stride)
            y = jax.nn.relu(batchnorm(y, p["bn1"], bs.get("bn1"), (name, "bn1")))
            y = conv(y, p["conv2"]["kernel"], 1)
            y = batchnorm(y, p["bn2"], bs.get("bn2"), (name, "bn2"))
            if stride != 1 or cin != planes:
                sub = x[:, :, ::stride, ::stride] if nchw else x[:, ::stride, ::stride, :]
                short = pad_channels(sub, (planes - cin) // 2, (planes - cin) // 2)
            else:
                short = x
            x = jax.nn.relu(short + y)
            cin = planes
    x = jnp.mean(x, axis=(2, 3) if nchw else (1, 2))
    logits = x.astype(jnp.float32) @ params["fc"]["kernel"] + params["fc"]["bias"]
    if bn == "none":
        return logits, batch_stats
    out = {}
    for k, v in new_bs.items():
        if isinstance(k, tuple):
            out.setdefault(k[0], {})[k[1]] = v
        else:
            out[k] = v
    return logits, out


def _conv_im2col(x, w, stride):
    """3x3 'SAME'-padded NHWC conv whose kernel gradient is one matmul of im2col patches."""
    import jax
    from jax import lax

    dn = ("NHWC", "HWIO", "NHWC")

    @jax.custom_vjp
    def f(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)

    def fwd(x, w):
        return f(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        _, vjp_x = jax.vjp(lambda a: lax.conv_general_dilated(
            a, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn), x)
        (dx,) = vjp_x(g)
        n, h, wd, c = x.shape
        ho, wo = g.shape[1], g.shape[2]
        xp = jax.numpy.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                          (1, stride, stride, 1)) for i in range(3) for j in range(3)]
        patches = jax.numpy.concatenate(cols, axis=-1)  # [N, Ho, Wo, 9C]
        dw = lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())))  # [9C, O]
        return dx, dw.reshape(w.shape).astype(w.dtype)

    f.defvjp(fwd, bwd)
    return f(x, w)


def jax_workload(spec: dict):
    """A warm (compiled) JAX workload ``fn() -> array`` of ``spec`` and its info dict."""
    import jax
    import jax.numpy as jnp
    import optax

    H.disable_compilation_cache()
    from jaxprune import methods, optim, parallel, train_step
    from jaxprune.models import get_model

    depth, b, mode = spec["depth"], spec["batch"], spec["mode"]
    impl = spec.get("impl", "lib")
    dtype = jnp.bfloat16 if spec.get("dtype") == "bf16" else None
    model = get_model(f"resnet{depth}", **({"dtype": dtype} if dtype is not None else {}))
    x = jax.random.normal(jax.random.PRNGKey(0), (b, 32, 32, 3))
    y = jax.random.randint(jax.random.PRNGKey(2), (b,), 0, 10)
    opt = optim.make_optimizer(0.1)
    state = train_step.create_train_state(model, None, jax.random.PRNGKey(3), x[:1], opt)
    info: dict = {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    if impl == "lib" and mode == "step":
        step = train_step.make_train_step(model, None, opt, methods.get_method("dense").pruner(None, 1),
                                        mask_hard=False, donate=bool(spec.get("donate")))
        # placed as the step's outputs will be, so that the one compiled executable serves
        # every call (an uncommitted first input would otherwise compile a second one)
        state = parallel.replicate(step.mesh, state)
        x, y = parallel.shard_batch(step.mesh, x, y)
        args = ((state.step, state.params, state.batch_stats, state.opt_state),
                (state.prune, state.rng), x, y)
        lower_s, compile_s, compiled = H.compile_seconds(step.jitted, *args)
        info.update(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2))
        box = [args]

        def fn():
            new_state, _ = compiled(*box[0])
            box[0] = ((new_state.step, new_state.params, new_state.batch_stats,
                       new_state.opt_state), box[0][1], x, y)
            return new_state.params
        init_args = args

        def dump(path):  # params before and after one step from the initial state
            import numpy as np

            after = compiled(*init_args)[0].params
            leaves = jax.tree_util.tree_leaves(init_args[0][1]) + jax.tree_util.tree_leaves(after)
            np.savez(path, *[np.asarray(v) for v in leaves])
            return {"ok": True, "n": len(leaves) // 2}

        H.block(fn())
        fn.dump = dump
        return fn, info, lambda: step.jitted.lower(*box[0])

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if impl in ("lib", "flax"):
        def apply(params, batch_stats, xx, train):
            v = {"params": params, "batch_stats": batch_stats}
            if train:
                logits, upd = model.apply(v, xx, train=True, mutable=["batch_stats"])
                return logits, upd["batch_stats"]
            return model.apply(v, xx, train=False), batch_stats
    else:
        opts = {k: spec[k] for k in ("layout", "bn", "wgrad") if k in spec}
        apply = lambda params, batch_stats, xx, train: fn_resnet_apply(  # noqa: E731
            params, batch_stats, xx, depth=depth, train=train, dtype=dtype, **opts)

    def loss_fn(params, batch_stats, xx, yy):
        logits, new_bs = apply(params, batch_stats, xx, True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yy).mean()
        return ce, new_bs

    if mode == "infer":
        jitted = jax.jit(lambda v, xx: apply(v["params"], v["batch_stats"], xx, False)[0])
        args = (variables, x)
    elif mode == "fwd":
        jitted = jax.jit(loss_fn)
        args = (variables["params"], variables["batch_stats"], x, y)
    elif mode == "grad":
        jitted = jax.jit(jax.grad(loss_fn, has_aux=True))
        args = (variables["params"], variables["batch_stats"], x, y)
    elif mode == "step":
        def step_fn(params, batch_stats, opt_state, xx, yy):
            grads, new_bs = jax.grad(loss_fn, has_aux=True)(params, batch_stats, xx, yy)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_bs, opt_state
        jitted = jax.jit(step_fn, donate_argnums=(0, 1, 2) if spec.get("donate") else ())
        args = (variables["params"], variables["batch_stats"], state.opt_state, x, y)
    else:
        raise ValueError(mode)
    lower_s, compile_s, compiled = H.compile_seconds(jitted, *args)
    info.update(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2))
    box = [args]

    def fn():
        out = compiled(*box[0])
        if mode == "step":
            box[0] = out + box[0][3:]
        return out
    H.block(fn())
    return fn, info, lambda: jitted.lower(*box[0])


# ------------------------------------------------------------------------------- workers


def worker_main(spec: dict) -> None:
    if spec.get("threads"):
        try:
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: spec["threads"]]))
        except (AttributeError, OSError):
            pass
    if spec["fw"] == "torch":
        fn, info = torch_workload(spec)
        H.serve(fn, info)
        return
    fn, info, lower = jax_workload(spec)
    compiled = functools.cache(lambda: lower().compile())  # one compile for both handlers
    handlers = {"profile": lambda calls="2": H.profile_categories(fn, lower, int(calls)),
                "rusage": lambda calls="3": rusage_per_call(fn, int(calls)),
                "memory": lambda: program_facts(spec, compiled()),
                "fusions": lambda: H.fusion_operands(compiled().as_text())}
    if hasattr(fn, "dump"):
        handlers["dump"] = fn.dump
    H.serve(fn, info, handlers=handlers)


def rusage_per_call(fn, calls: int) -> dict:
    """Wall, user and system seconds and page faults per call of ``fn`` (``getrusage``)."""
    import resource

    H.block(fn())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    r = None
    for _ in range(calls):
        r = fn()
    H.block(r)
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {"wall_s": wall / calls, "user_s": (r1.ru_utime - r0.ru_utime) / calls,
            "sys_s": (r1.ru_stime - r0.ru_stime) / calls,
            "minflt": (r1.ru_minflt - r0.ru_minflt) / calls,
            "majflt": (r1.ru_majflt - r0.ru_majflt) / calls,
            "maxrss_mb": r1.ru_maxrss / 1024}


def program_facts(spec: dict, compiled) -> dict:
    """Conv MACs per image of the model and the ``compiled`` step's memory (bytes)."""
    import jax
    import jax.numpy as jnp

    from jaxprune import flops, graph
    from jaxprune.models import get_model

    model = get_model(f"resnet{spec['depth']}")
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    macs = flops.count(graph.trace_linen(model, variables, x)).macs
    mem = compiled.memory_analysis()
    out = {"macs": int(macs)}
    for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
        out[k] = int(getattr(mem, k, 0) or 0)
    return out


def worker_argv(spec: dict) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]


def have_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


# ------------------------------------------------------------------------------- sections


def _fmt_ms(t: float) -> str:
    return f"{1e3 * t:,.0f}"


def section_compare(a, base: dict) -> list[str]:
    rec = recommended_flags()
    specs = {}
    if have_torch():
        specs["PyTorch"] = (worker_argv({**base, "fw": "torch", "mode": "step"}), {})
        specs["PyTorch infer"] = (worker_argv({**base, "fw": "torch", "mode": "infer"}), {})
    specs["JAX (default flags)"] = (worker_argv({**base, "fw": "jax", "mode": "step"}),
                                    {"XLA_FLAGS": DEFAULT_FLAGS})
    specs["JAX infer (default flags)"] = (worker_argv({**base, "fw": "jax", "mode": "infer"}),
                                          {"XLA_FLAGS": DEFAULT_FLAGS})
    specs["JAX (recommended flags)"] = (worker_argv({**base, "fw": "jax", "mode": "step"}),
                                        {"XLA_FLAGS": rec})
    specs["JAX infer (recommended flags)"] = (worker_argv({**base, "fw": "jax", "mode": "infer"}),
                                              {"XLA_FLAGS": rec})
    with H.Workers(specs) as w:
        t = w.interleave(a.repeats, a.inner)
        info = w.info
    b = base["batch"]
    lines = [f"#### ResNet-{base['depth']} train step and inference, batch {b}, "
             f"{base['threads']} thread(s): PyTorch vs JAX",
             "", f"Median of {a.repeats} round-robin repeats x {a.inner} call(s); recommended flags: "
             f"`XLA_FLAGS='{rec}'` (`jaxprune.perf.RECOMMENDED_CPU_FLAGS`).", "",
             "| workload | train ms/step | train images/s | inference ms/batch | inference images/s "
             "| train / inference time | train speed vs PyTorch |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    torch_train = H.median(t["PyTorch"]) if "PyTorch" in t else None
    for name, tr, inf in (("PyTorch", "PyTorch", "PyTorch infer"),
                          ("JAX, default XLA flags", "JAX (default flags)", "JAX infer (default flags)"),
                          ("JAX, recommended XLA flags", "JAX (recommended flags)",
                           "JAX infer (recommended flags)")):
        if tr not in t:
            continue
        mt, mi = H.median(t[tr]), H.median(t[inf])
        vs = f"{torch_train / mt:.2f}x" if torch_train else "n/a"
        lines.append(f"| {name} | {_fmt_ms(mt)} ({H.spread(t[tr])}) | {b / mt:.1f} | {_fmt_ms(mi)} | "
                     f"{b / mi:.0f} | {mt / mi:.1f} | {vs} |")
    if torch_train is None:
        lines += ["", "PyTorch is not installed (`pip install torch==2.13.0`): torch rows skipped."]
    else:
        lines += ["", f"PyTorch {info['PyTorch'].get('torch')} with "
                  f"{info['PyTorch'].get('torch_threads')} intra-op thread(s)."]
    comp = [f"{k}: {v['compile_s']}s" for k, v in info.items() if "compile_s" in v]
    lines += [f"JAX compile (lower + compile excluded from timings): {'; '.join(comp)}."]
    return lines


def section_flags(a, base: dict) -> list[str]:
    sets = dict(FLAG_SETS)
    if a.flag_sets:
        sets = {k: v for k, v in sets.items() if k in a.flag_sets.split(";") or k == "default"}
    specs = {name: (worker_argv({**base, "fw": "jax", "mode": "step"}), {"XLA_FLAGS": flags})
             for name, flags in sets.items()}
    live = {}
    for name, spec in specs.items():  # a flag unknown to this jaxlib aborts its worker only
        live[name] = spec
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="tvj_")
    diffs = {}
    with H.Workers(live) as w:
        t = w.interleave(a.repeats, a.inner)
        info = w.info
        for name in live:  # numerics: one step from the same initial state under each flag set
            w.ask(name, f"dump {os.path.join(tmp, str(len(diffs)))}.npz")
            diffs[name] = os.path.join(tmp, f"{len(diffs)}.npz")
    ref_np = np.load(diffs["default"])
    n = len(ref_np.files) // 2
    init = [ref_np[f"arr_{i}"] for i in range(n)]
    ref_after = [ref_np[f"arr_{i + n}"] for i in range(n)]
    upd = max(float(np.max(np.abs(b - a0))) for a0, b in zip(init, ref_after))
    err = {}
    for name, path in diffs.items():
        other = np.load(path)
        after = [other[f"arr_{i + n}"] for i in range(n)]
        err[name] = max(float(np.max(np.abs(b - r))) for b, r in zip(after, ref_after)) / upd
    shutil.rmtree(tmp, ignore_errors=True)
    ref = H.median(t["default"])
    b = base["batch"]
    lines = [f"#### ResNet-{base['depth']} JAX train step under XLA:CPU flag sets "
             f"(batch {b}, {base['threads']} thread(s))", "",
             f"Median of {a.repeats} round-robin repeats, one worker process per flag set.", "",
             "'params diff' = max |params after one step - default's| / max |default's update| "
             "(same initial state and batch): float32 rounding is ~1e-6 or below.", "",
             "| flag set | XLA_FLAGS | ms/step | images/s | speedup vs default | params diff | "
             "compile s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, flags in sets.items():
        m = H.median(t[name])
        lines.append(f"| {name} | `{flags or '(none)'}` | {_fmt_ms(m)} ({H.spread(t[name])}) | "
                     f"{b / m:.1f} | {ref / m:.2f}x | {err[name]:.1e} | {info[name]['compile_s']} |")
    return lines


def section_profile(a, base: dict) -> list[str]:
    rec = recommended_flags()
    sets = {"default": DEFAULT_FLAGS, "recommended": rec}
    specs = {k: (worker_argv({**base, "fw": "jax", "mode": "step"}), {"XLA_FLAGS": v})
             for k, v in sets.items()}
    with H.Workers(specs) as w:
        prof = {k: w.ask(k, f"profile {a.profile_calls}") for k in sets}
    cats = sorted({c for p in prof.values() for c in p["seconds"]},
                  key=lambda c: -prof["default"]["seconds"].get(c, 0.0))
    lines = [f"#### Where the JAX train step spends its time (ResNet-{base['depth']}, batch "
             f"{base['batch']}, {base['threads']} thread(s))", "",
             "Sum of XLA:CPU thunk durations per HLO op category from `jax.profiler` "
             f"({a.profile_calls} profiled steps each; the two columns ran one after the other, "
             "not interleaved).", "",
             "| op category | default: s/step | ops | share | recommended: s/step | ops | share |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    tot = {k: sum(p["seconds"].values()) for k, p in prof.items()}
    for c in cats:
        row = [c]
        for k in sets:
            s = prof[k]["seconds"].get(c, 0.0)
            row += [f"{s:.3f}", str(prof[k]["ops"].get(c, 0)), f"{100 * s / max(tot[k], 1e-9):.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"| **sum of ops** (wall per step) | {tot['default']:.2f} ({prof['default']['wall_s']:.2f}) "
                 f"| | | {tot['recommended']:.2f} ({prof['recommended']['wall_s']:.2f}) | | |")
    if have_torch():
        lines += ["", *torch_profile_lines(base)]
    return lines


def scaling_flags() -> dict[str, str]:
    """``--sections scaling``'s two flag sets: the recommended flags without / with the one that
    keeps the block barriers until fusion (without it XLA:CPU expands them first)."""
    rec = recommended_flags().split()
    return {"barriers expanded": " ".join(f for f in rec if "cse_barrier_expander" not in f),
            "recommended": " ".join(rec)}


def section_scaling(a, base: dict) -> list[str]:
    depths = [int(d) for d in a.depths.split(",")]
    flags = scaling_flags()
    runs = {(f, d): f"ResNet-{d}, {f}" for f in flags for d in depths}
    specs = {n: (worker_argv({**base, "depth": d, "fw": "jax", "mode": "step"}),
                 {"XLA_FLAGS": flags[f]}) for (f, d), n in runs.items()}
    with H.Workers(specs) as w:
        t = w.interleave(a.repeats, a.inner)
        facts = {n: w.ask(n, "memory") for n in specs}
        usage = {n: w.ask(n, f"rusage {max(a.inner, 2)}") for n in specs}
        prof = {n: w.ask(n, f"profile {a.profile_calls}") for n in specs}
        fusions = {n: w.ask(n, "fusions") for (f, d), n in runs.items() if d == depths[-1]}
    b = base["batch"]
    step = {n: H.median(v) for n, v in t.items()}
    per_mac = {n: step[n] / (facts[n]["macs"] * b) for n in specs}
    ref = runs[("barriers expanded", depths[0])]
    lines = [f"#### How the JAX train step grows with depth (batch {b}, {base['threads']} "
             "thread(s))", "",
             f"Median of {a.repeats} round-robin repeats x {a.inner} call(s), one worker process "
             "per row; `barriers expanded` = XLA_FLAGS "
             f"`{flags['barriers expanded']}` (XLA:CPU turns the models' block barriers into "
             "control dependencies before fusion), `recommended` = "
             f"`{flags['recommended']}`. MACs are the forward convolutions per image; temp = "
             "the compiled step's temporary buffers (`memory_analysis`); faults and system "
             "time per step from `getrusage` over the worker (all threads).", "",
             "| model, XLA flags | conv MACs/image | ms/step | images/s | time per MAC (vs "
             f"{ref}) | speedup from the flags | temp MB | user s/step | sys s/step "
             "| minor faults/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (f, d), n in runs.items():
        u = usage[n]
        gain = step[runs[("barriers expanded", d)]] / step[n]
        lines.append(f"| {n} | {facts[n]['macs']:,} | {_fmt_ms(step[n])} ({H.spread(t[n])}) | "
                     f"{b / step[n]:.1f} | {per_mac[n] / per_mac[ref]:.2f} | {gain:.2f}x | "
                     f"{facts[n]['temp_size_in_bytes'] / 2**20:,.0f} | {u['user_s']:.2f} | "
                     f"{u['sys_s']:.2f} | {u['minflt']:,.0f} |")
    first, last = depths[0], depths[-1]
    mac_ratio = facts[runs[(next(iter(flags)), last)]]["macs"] / facts[runs[(next(iter(flags)), first)]]["macs"]
    cats = sorted({c for p in prof.values() for c in p["seconds"]},
                  key=lambda c: -prof[runs[("barriers expanded", last)]]["seconds"].get(c, 0.0))
    head, rule = ["op category"], ["---"]
    for f in flags:
        head += [f"{f}: ResNet-{first} s/step", f"ResNet-{last} s/step", "ops", "growth / MAC ratio"]
        rule += ["---:"] * 4
    caveat = ("; at more than one thread XLA:CPU's convolutions run asynchronously and their "
              "time shows up in the op that waits for them" if base["threads"] > 1 else "")
    lines += ["", f"Per-category profile ({a.profile_calls} profiled steps per row, one after the "
              f"other{caveat}). Growth = ResNet-{last} / ResNet-{first} time; the MAC ratio is "
              f"{mac_ratio:.2f}x:", "",
              "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for c in cats + ["**sum of ops**"]:
        row = [c]
        for f in flags:
            v = [sum(prof[runs[(f, d)]]["seconds"].values()) if c.startswith("**")
                 else prof[runs[(f, d)]]["seconds"].get(c, 0.0) for d in (first, last)]
            g = v[1] / v[0] if v[0] > 0 else float("nan")
            ops = "" if c.startswith("**") else str(prof[runs[(f, last)]]["ops"].get(c, 0))
            row += [f"{v[0]:.3f}", f"{v[1]:.3f}", ops, f"{g / mac_ratio:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"The slowest instructions of the ResNet-{last} step, and how many convolution "
              "outputs each reads (a fusion that reads many recomputes what they fed):", "",
              "| XLA flags | instruction | category | output shape | conv outputs read | ms/step |",
              "|---|---|---|---|---:|---:|"]
    for f in flags:
        n = runs[(f, last)]
        top = sorted(prof[n]["instructions"].items(), key=lambda kv: -kv[1][1])[:a.top]
        for inst, (cat, sec) in top:
            info = fusions[n].get(inst)
            shape, convs = (f"`{info['shape']}`", info["convs"]) if info else ("(not a fusion)", "")
            lines.append(f"| {f} | `{inst}` | {cat} | {shape} | {convs} | {1e3 * sec:.1f} |")
    return lines


def torch_profile_lines(base: dict) -> list[str]:
    """Top ops of the PyTorch step (torch.profiler), for comparison (runs in this process)."""
    import subprocess

    code = (
        "import json,sys,os;spec=json.loads(sys.argv[1]);"
        "os.sched_setaffinity(0,set(sorted(os.sched_getaffinity(0))[:spec['threads']]));"
        "sys.path.insert(0,os.path.dirname(sys.argv[2]));"
        "import importlib.util as u;s=u.spec_from_file_location('tvj',sys.argv[2]);m=u.module_from_spec(s);"
        "s.loader.exec_module(m);fn,_=m.torch_workload(spec);fn();"
        "import torch.profiler as P\n"
        "with P.profile(activities=[P.ProfilerActivity.CPU]) as p:\n  fn();fn()\n"
        "rows=[(e.key,e.self_cpu_time_total/2e6,e.count//2) for e in p.key_averages()]\n"
        "rows.sort(key=lambda r:-r[1]);print(json.dumps(rows[:12]))")
    spec = {**base, "fw": "torch", "mode": "step"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec), os.path.abspath(__file__)],
                         capture_output=True, text=True)
    if out.returncode:
        return [f"(torch profile failed: {out.stderr.strip().splitlines()[-1:]})"]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    lines = ["PyTorch step, top ops by self CPU time (`torch.profiler`, 2 steps):", "",
             "| op | s/step | calls/step |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {s:.3f} | {c} |" for k, s, c in rows]
    return lines


VARIANTS = {
    # name -> spec overrides (impl 'lib' = the bundled Flax model; 'fn' = fn_resnet_apply)
    "lib: forward only (train-mode BN, loss)": {"impl": "lib", "mode": "fwd"},
    "lib: gradient (forward + backward)": {"impl": "lib", "mode": "grad"},
    "lib: full step (jaxprune.training)": {"impl": "lib", "mode": "step"},
    "lib: minimal jit step (no sharding/metrics)": {"impl": "flax", "mode": "step"},
    "lib: minimal step, donated buffers": {"impl": "flax", "mode": "step", "donate": True},
    "lib: bf16 compute": {"impl": "flax", "mode": "step", "dtype": "bf16"},
    "fn: NHWC (same numerics)": {"impl": "fn", "mode": "step"},
    "fn: NCHW dimension numbers": {"impl": "fn", "mode": "step", "layout": "NCHW"},
    "fn: two-pass BN variance": {"impl": "fn", "mode": "step", "bn": "twopass"},
    "fn: no BN (cost reference)": {"impl": "fn", "mode": "step", "bn": "none"},
    "fn: kernel grads by im2col matmul": {"impl": "fn", "mode": "step", "wgrad": "im2col"},
}


def section_variants(a, base: dict) -> list[str]:
    names = list(VARIANTS)
    if a.variants:
        names = [n for n in names if any(s in n for s in a.variants.split(";"))]
    flags = recommended_flags() if a.variant_flags == "recommended" else DEFAULT_FLAGS
    # one process for all code variants (same flags): they compile one after the other in it
    # ('flax' = the bundled model in a minimal jitted step without sharding or metrics)
    spec = {**base, "fw": "jax", "variants": [{**base, "fw": "jax", **VARIANTS[n]} for n in names]}
    specs = {"variants": (worker_argv(spec), {"XLA_FLAGS": flags})}
    with H.Workers(specs) as w:
        res = w.ask("variants", f"variants {a.repeats} {a.inner}")
    t = dict(zip(names, res["t"]))
    comp = dict(zip(names, res["compile_s"]))
    ref_name = "lib: full step (jaxprune.training)"
    ref = H.median(t[ref_name]) if ref_name in t else None
    b = base["batch"]
    lines = [f"#### JAX train-step variants (ResNet-{base['depth']}, batch {b}, "
             f"{base['threads']} thread(s), XLA_FLAGS='{flags}')", "",
             f"One process, round-robin, median of {a.repeats} repeats. 'lib' = the bundled Flax "
             "model; 'fn' = the same network as plain functions over the same params "
             "(`fn_resnet_apply`).", "",
             "| variant | ms/call | images/s | time vs library step | compile s |",
             "|---|---:|---:|---:|---:|"]
    for n in names:
        m = H.median(t[n])
        rel = f"{m / ref:.2f}" if ref else ""
        lines.append(f"| {n} | {_fmt_ms(m)} ({H.spread(t[n])}) | {b / m:.1f} | {rel} | {comp[n]} |")
    return lines


def variants_worker(spec: dict) -> None:
    """One process holding several JAX workloads; ``variants R I`` times them round-robin."""
    if spec.get("threads"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: spec["threads"]]))
    fns, comp = [], []
    for v in spec["variants"]:
        fn, info, _ = jax_workload(v)
        fns.append(fn)
        comp.append(info.get("compile_s"))
        print(f"  compiled {v}: {info.get('compile_s')}s", file=sys.stderr, flush=True)

    def run(repeats, inner):
        res = H.interleave({i: f for i, f in enumerate(fns)}, int(repeats), int(inner), warmup=False)
        return {"t": [res[i] for i in range(len(fns))], "compile_s": comp}

    H.serve(fns[0], {"n": len(fns)}, handlers={"variants": run})


# =============================================================================== main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="cores/threads per framework (0: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=1)
    p.add_argument("--sections", default="compare,flags,profile,variants")
    p.add_argument("--flag-sets", default="", help="';'-separated FLAG_SETS names (default all)")
    p.add_argument("--variants", default="", help="';'-separated substrings of VARIANTS names")
    p.add_argument("--variant-flags", choices=("recommended", "default"), default="recommended")
    p.add_argument("--profile-calls", type=int, default=2)
    p.add_argument("--depths", default="20,56", help="comma-separated depths for --sections scaling")
    p.add_argument("--top", type=int, default=8, help="slowest instructions listed by --sections scaling")
    p.add_argument("--quick", action="store_true", help="ResNet-20, 3 repeats, fewer flag sets")
    p.add_argument("--append", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if "variants" in spec:
            variants_worker(spec)
        else:
            worker_main(spec)
        return 0
    load = H.load_average()
    if a.quick:
        a.depth, a.repeats = (20 if a.depth == 56 else a.depth), min(a.repeats, 3)
        if not a.flag_sets:
            a.flag_sets = "no YNN convs;no YNN convs, no YNN reductions"
    threads = a.threads or H.cpu_count()
    base = {"depth": a.depth, "batch": a.batch, "threads": threads}
    title = (f"JAX CPU train step vs depth (batch {a.batch}, {threads} thread(s))"
             if a.sections.strip() == "scaling" else
             f"PyTorch vs JAX CPU train step, ResNet-{a.depth} (batch {a.batch}, {threads} thread(s))")
    out = [f"### {title}", ""]
    for sec in a.sections.split(","):
        fn = {"compare": section_compare, "flags": section_flags, "profile": section_profile,
              "scaling": section_scaling, "variants": section_variants}[sec.strip()]
        print(f"[{sec}] ...", file=sys.stderr, flush=True)
        out += fn(a, base) + [""]
        print("\n".join(out), flush=True)
    text = "\n".join(out).rstrip()
    machine = _machine(load)
    print(f"\nMachine: {machine}")
    if a.append:
        H.append_report(a.append, text, argv, machine)
    return 0


def _machine(load: str) -> str:
    # the parent does not import jax for the timings; describe it in a child-free way
    return H.machine_description(load)


if __name__ == "__main__":
    raise SystemExit(main())
