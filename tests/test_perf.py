"""Tests of jaxprune.perf (opt-in XLA:CPU flags) and of how the CLI applies them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxprune import cli, perf


def test_merge_adds_missing_flags_and_keeps_user_values():
    assert perf.merge_xla_flags("", ["--a=1"]) == "--a=1"
    assert perf.merge_xla_flags("--b=2", ["--a=1"]) == "--b=2 --a=1"
    # a flag the user already set keeps the user's value
    assert perf.merge_xla_flags("--a=0 --b=2", ["--a=1"]) == "--a=0 --b=2"
    assert perf.merge_xla_flags("  --b=2 ", []) == "--b=2"


def test_flags_supported_rejects_unknown_flag_and_accepts_recommended():
    assert not perf.flags_supported(["--xla_this_flag_does_not_exist=1"])
    assert perf.flags_supported(perf.RECOMMENDED_CPU_FLAGS)


def test_backend_started_in_this_process():
    import jax

    jax.devices()
    assert perf.backend_started()


def test_use_recommended_cpu_flags_in_fresh_process():
    code = ("import os; os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
            "from jaxprune import perf\n"
            "assert not perf.backend_started()\n"
            "v = perf.use_recommended_cpu_flags()\n"
            "import jax\n"
            "assert jax.device_count() == 2, jax.devices()\n"  # user's flag kept and honoured
            "print(v)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    flags = out.stdout.split()
    assert "--xla_force_host_platform_device_count=2" in flags
    for f in perf.RECOMMENDED_CPU_FLAGS:
        assert f in flags


def test_pass_flag_is_left_out_where_an_accelerator_is_expected(monkeypatch):
    import jax

    jax.devices()
    cpu_only = tuple(f for f in perf.RECOMMENDED_CPU_FLAGS if f.startswith("--xla_cpu_"))
    assert cpu_only and len(cpu_only) < len(perf.RECOMMENDED_CPU_FLAGS)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert perf.accelerator_expected()
    assert perf.cpu_flags_for_this_process() == cpu_only
    monkeypatch.setenv("XLA_FLAGS", "--keep=1")
    with pytest.warns(RuntimeWarning, match="already running"):  # this test process runs jax
        merged = perf.use_recommended_cpu_flags(check=False)
    assert merged.split() == ["--keep=1", *cpu_only]
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not perf.accelerator_expected()
    assert perf.cpu_flags_for_this_process() == perf.RECOMMENDED_CPU_FLAGS
    # JAX_PLATFORMS unset: an installed GPU/TPU plugin decides
    monkeypatch.delenv("JAX_PLATFORMS")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "jax_cuda12_plugin" else real(name, *a))
    assert perf.accelerator_expected()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in perf._ACCELERATOR_PLUGINS else real(name, *a))
    assert not perf.accelerator_expected()


def test_use_recommended_cpu_flags_warns_once_backend_runs(monkeypatch):
    import jax

    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.warns(RuntimeWarning, match="already running"):
        perf.use_recommended_cpu_flags(check=False)


def test_cli_training_commands_have_opt_out_and_skip_running_backend(monkeypatch):
    args = cli.build_parser().parse_args(["quickstart", "--default-xla-flags"])
    assert args.default_xla_flags
    args = cli.build_parser().parse_args(["train", "--config", "c.py", "--workdir", "w"])
    assert not args.default_xla_flags
    # a backend already running in this process: the CLI leaves XLA_FLAGS alone, silently
    import jax

    jax.devices()
    monkeypatch.setenv("XLA_FLAGS", "--keep=1")
    cli._use_fast_cpu_flags(args)
    assert os.environ["XLA_FLAGS"] == "--keep=1"
    # commands that do not train never touch the flags
    info = cli.build_parser().parse_args(["info", "resnet20"])
    assert not hasattr(info, "default_xla_flags")


_FUSION_PROBE = r"""
import re, sys
import numpy as np, jax, jax.numpy as jnp
from jaxprune.models import get_model
m = get_model("resnet20")
x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
v = m.init(jax.random.PRNGKey(0), x, train=False)
def loss(p):
    out, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                     mutable=["batch_stats"])
    return (out ** 2).mean()
grad = jax.jit(jax.grad(loss))
hlo = grad.lower(v["params"]).compile().as_text()
worst = 0
for line in hlo.splitlines():
    f = re.match(r"\s*(?:ROOT )?%\S+ = \S+ fusion\((.*?)\), kind", line)
    if f:
        worst = max(worst, sum(o.startswith("conv") for o in re.findall(r"%([\w.\-]+)", f.group(1))))
np.savez(sys.argv[1], *[np.asarray(g) for g in jax.tree_util.tree_leaves(grad(v["params"]))])
print(worst, hlo.count("opt-barrier("))
"""


def test_recommended_flags_stop_the_residual_stream_being_recomputed(tmp_path):
    """With `RECOMMENDED_CPU_FLAGS` the block barriers survive to fusion, so no fusion of the
    ResNet-20 gradient reads more than the two conv outputs of one residual add (without them,
    XLA:CPU fuses the whole stage's stream into the weight-gradient transposes); the gradients
    are bitwise those compiled with the barriers expanded."""
    import numpy as np

    results = {}
    for name, flags in (("recommended", perf.RECOMMENDED_CPU_FLAGS),
                        ("expanded", perf.RECOMMENDED_CPU_FLAGS[:1])):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
        out = subprocess.run([sys.executable, "-c", _FUSION_PROBE, str(tmp_path / f"{name}.npz")],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[name] = [int(w) for w in out.stdout.split()[-2:]]
    worst, barriers = results["recommended"]
    assert barriers > 0 and worst <= 2, results
    assert results["expanded"][1] == 0, results
    a, b = np.load(tmp_path / "recommended.npz"), np.load(tmp_path / "expanded.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
