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
