"""Opt-in XLA:CPU settings for faster CNN training on CPU (measured in experiments/bench).

XLA reads ``XLA_FLAGS`` once, when its CPU backend starts (the first jax computation or
``jax.devices()``), so the flags must be in the environment before that: call
`use_recommended_cpu_flags` at the very top of a script, or export them in the shell::

    import jaxprune.perf; jaxprune.perf.use_recommended_cpu_flags()   # before any jax work
    # or
    export XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=-individual_convolution --xla_disable_hlo_passes=cse_barrier_expander"

What the first recommended flag does (jax/jaxlib 0.10): XLA:CPU offloads single convolutions to
YNNPACK by default, including the kernel-gradient ("weight-gradient") convolutions of the
backward pass, whose window spans the whole feature map (32x32 for a CIFAR ResNet's first
stage). YNNPACK runs those several times slower than the Eigen convolution XLA falls back to
without it, so the CIFAR ResNet train step spends about half its time there.
``-individual_convolution`` removes only that fusion type from the default list: forward and
input-gradient convolutions go to Eigen as well (about as fast), reductions and dots keep
their YNNPACK fusions. Same math (float32 convolutions, only the library that runs them
changes, so only the summation order differs: after one ResNet-56 step the params differed by
at most 5.4e-4 of the largest update). Measured speedup of the ResNet-56 train step: 1.18x on
one quiet core, 1.66x on a loaded 2-core machine (experiments/bench/records/HISTORY.md).

``--xla_disable_hlo_passes=cse_barrier_expander`` keeps ``lax.optimization_barrier`` ops until
fusion (XLA:CPU otherwise turns them into control dependencies first, which fusion ignores).
The bundled residual models end every block with one (`jaxprune.models.materialize`): without
it, XLA:CPU's fusion duplicates the residual stream's elementwise chain into every consumer
that reads it in another layout, recomputing the stream from the start of its stage in every
weight-gradient transpose, so the train step's cost grows quadratically with the blocks per
stage. Barriers change no value. With the flag the train step's CPU time per MAC stops growing
with depth (speeds: BENCHMARKS.md, `torch_vs_jax.py --sections scaling`). The gradients are
bitwise the same (tested). Users' own residual models get the same by wrapping each block's
output in `jaxprune.models.materialize` (or ``jax.lax.optimization_barrier``).

``--xla_disable_hlo_passes`` is not CPU-only: where jax will run on a GPU or TPU
(`accelerator_expected`), `use_recommended_cpu_flags` adds only the ``--xla_cpu_*`` flags
(`cpu_flags_for_this_process`); GPU compilers already keep barriers through fusion.

Nothing here is applied on import; the library never changes flags by itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Sequence

RECOMMENDED_CPU_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "--xla_disable_hlo_passes=cse_barrier_expander",
)


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merge_xla_flags(current: str, flags: Sequence[str]) -> str:
    """``current`` XLA_FLAGS plus ``flags``; a flag already set in ``current`` is kept as is."""
    present = {_flag_name(f) for f in current.split()}
    extra = [f for f in flags if _flag_name(f) not in present]
    return " ".join([current.strip()] + extra).strip() if extra else current.strip()


def backend_started() -> bool:
    """Whether a jax backend is already initialised in this process (flags would be ignored)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - private API moved
        return True


def flags_supported(flags: Sequence[str], timeout: float = 120.0) -> bool:
    """Whether this jaxlib accepts ``flags`` (an unknown XLA flag aborts the process, so this
    starts a throw-away Python process with them)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    try:
        r = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def accelerator_expected() -> bool:
    """Whether jax will run on a GPU/TPU here, decided without starting jax: ``JAX_PLATFORMS``
    if set (its first platform), else whether a GPU or TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() != "cpu"
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_PLUGINS)


def cpu_flags_for_this_process() -> tuple[str, ...]:
    """`RECOMMENDED_CPU_FLAGS`, less the flags that are not CPU-only by name (``--xla_cpu_*``)
    when an accelerator is expected: ``--xla_disable_hlo_passes`` applies to every backend, and
    GPU compilers expand barriers themselves after fusion."""
    if accelerator_expected():
        return tuple(f for f in RECOMMENDED_CPU_FLAGS if f.startswith("--xla_cpu_"))
    return RECOMMENDED_CPU_FLAGS


def use_recommended_cpu_flags(check: bool = True) -> str:
    """Adds `cpu_flags_for_this_process` (`RECOMMENDED_CPU_FLAGS` on a CPU-only machine) to
    ``os.environ['XLA_FLAGS']`` and returns the new value.

    Call it before jax starts its backend. With ``check`` the flags are first tried in a
    subprocess (about a second) and skipped with a warning if this jaxlib does not know them,
    instead of aborting the process. Flags already present in ``XLA_FLAGS`` keep their value.
    """
    current = os.environ.get("XLA_FLAGS", "")
    if backend_started():
        warnings.warn("jax's backend is already running: XLA_FLAGS set now take effect only in "
                      "new processes", RuntimeWarning, stacklevel=2)
    flags = cpu_flags_for_this_process()
    if check and not flags_supported(flags):
        warnings.warn(f"this jaxlib does not accept {flags}; XLA_FLAGS unchanged",
                      RuntimeWarning, stacklevel=2)
        return current
    merged = merge_xla_flags(current, flags)
    os.environ["XLA_FLAGS"] = merged
    return merged


__all__ = [
    "RECOMMENDED_CPU_FLAGS",
    "accelerator_expected",
    "backend_started",
    "cpu_flags_for_this_process",
    "flags_supported",
    "merge_xla_flags",
    "use_recommended_cpu_flags",
]
