"""Shared helpers of the benchmark scripts in this folder (not a benchmark itself).

- `machine_description()`: CPU model (/proc/cpuinfo), core count, load average, jax version
  and device, for the header of every table.
- `interleave(fns, repeats, inner)`: median-friendly timings of several in-process variants,
  measured round-robin (A B C A B C ...) so that load drift on a shared machine hits every
  variant alike.
- `Workers`: the same round-robin across SUBPROCESSES, for variants that cannot share a
  process (different ``XLA_FLAGS``, which XLA reads once at backend start-up; PyTorch vs JAX
  thread pools). Workers are started and compiled one after the other, then take turns: only
  one of them runs at any time, the others block on their stdin.
- `compile_seconds(jitted, *args)`: ``jit(...).lower(...).compile()`` wall time (a fresh
  compilation: the persistent cache is not used by the scripts).
- `append_report(path, text, argv)`: appends a table, the exact command and the machine to a
  record file under experiments/bench/records/ (never rewrites the file).
- `profile_categories(fn, lower)`: where a compiled program spends its time, per category of
  HLO instruction (convolutions, gathers, pads/slices, copies, ...), from a ``jax.profiler``
  trace; `fusion_operands(hlo)`: how many convolution outputs each fusion reads.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:  # run as `python experiments/bench/x.py` from anywhere
    sys.path.insert(0, REPO)


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def machine_description(load_at_start: str | None = None) -> str:
    """One line: CPU, cores, load, jax version and device (imports jax)."""
    import jax

    dev = jax.devices()[0]
    load = load_at_start if load_at_start is not None else load_average()
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"{cpu_model()}, {cpu_count()} cores (load average {load} at start), "
            f"jax {jax.__version__}, device {dev.platform} "
            f"({dev.device_kind}) x{jax.device_count()}"
            + (f", XLA_FLAGS={flags!r}" if flags else ""))


def command_line(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO) if sys.argv and sys.argv[0] else "?"
    return "python " + " ".join(shlex.quote(a) for a in [script] + args)


def append_report(path: str, text: str, argv: Sequence[str] | None, machine: str) -> None:
    """Appends ``text`` with the command and the machine to ``path`` (created if absent)."""
    with open(path, "a") as f:
        f.write(f"\n{text}\n\nCommand: `{command_line(argv)}`  \nMachine: {machine}\n")


def report(text: str, argv: Sequence[str] | None, append: str, load_at_start: str) -> None:
    """Prints ``text`` and the machine line; appends both and the command to ``append`` if set."""
    machine = machine_description(load_at_start)
    print(text + f"\n\nMachine: {machine}")
    if append:
        append_report(append, text, argv, machine)


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
    """Waits until ``x`` (any pytree) is computed, and copies its small arrays (at most 1024
    elements: losses, metrics) to the host: a copy cannot complete before the computation that
    produces the array, so a timing ends after the device's work even where readiness events
    return early. (A GPU table once showed one-step-per-call training 45x faster than the same
    steps in one call, faster than the device runs them.)"""
    import jax
    import numpy as np

    x = jax.block_until_ready(x)
    for leaf in jax.tree.leaves(x):
        if isinstance(leaf, jax.Array) and leaf.size <= 1024:
            np.asarray(jax.device_get(leaf))
    return x


def interleave(fns: Mapping[str, Callable[[], Any]], repeats: int, inner: int = 1,
               warmup: bool = True, pause: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[k]()`` (blocked), ``repeats`` round-robin samples of
    ``inner`` calls. ``fns[k]`` must return something `block` can wait on."""
    if warmup:
        for fn in fns.values():
            block(fn())
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            r = None
            for _ in range(inner):
                r = fn()
            block(r)
            out[k].append((time.perf_counter() - t0) / inner)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of the samples relative to the median, e.g. ``'-3%/+12%'``."""
    m = statistics.median(xs)
    return f"-{100 * (1 - min(xs) / m):.0f}%/+{100 * (max(xs) / m - 1):.0f}%"


def compile_seconds(jitted: Any, *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """``(lower_s, compile_s, compiled)`` of ``jitted.lower(*args).compile()``."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, compiled


def disable_compilation_cache() -> None:
    """Makes every compilation fresh (a persistent cache would hide compile times)."""
    import jax

    try:
        jax.config.update("jax_enable_compilation_cache", False)
    except Exception:  # pragma: no cover - option missing in some versions
        pass


# ----------------------------------------------------------------------------- workers


class Workers:
    """Round-robin timing of workloads that each live in their own process.

    ``specs``: name -> (argv of the worker process, extra environment). A worker prints one
    JSON line when it is ready (``{"ready": true, ...info}``), then answers every ``run N``
    line on its stdin with ``{"t": seconds per call}`` after N blocked calls, and exits on
    ``quit`` (see `serve`).
    """

    def __init__(self, specs: Mapping[str, tuple[Sequence[str], Mapping[str, str]]],
                 verbose: bool = True):
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: dict[str, dict] = {}
        for name, (argv, env) in specs.items():
            full_env = dict(os.environ)
            full_env.update(env)
            t0 = time.perf_counter()
            p = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=full_env, text=True, bufsize=1)
            self.procs[name] = p
            info = self._read(name)
            info["start_s"] = time.perf_counter() - t0
            self.info[name] = info
            if verbose:
                print(f"  [{name}] ready after {info['start_s']:.1f}s "
                      f"{ {k: v for k, v in info.items() if k not in ('ready', 'start_s')} }",
                      file=sys.stderr, flush=True)

    def _read(self, name: str) -> dict:
        p = self.procs[name]
        while True:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {name!r} exited (rc={p.poll()}) before answering")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, name: str, command: str) -> dict:
        p = self.procs[name]
        p.stdin.write(command + "\n")
        p.stdin.flush()
        return self._read(name)

    def interleave(self, repeats: int, inner: int = 1, names: Sequence[str] | None = None
                   ) -> dict[str, list[float]]:
        names = list(self.procs if names is None else names)
        out: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(repeats):
            for k in names:
                out[k].append(self.ask(k, f"run {inner}")["t"])
        return out

    def close(self) -> None:
        for name, p in self.procs.items():
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                p.kill()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(fn: Callable[[], Any], info: Mapping[str, Any] | None = None,
          handlers: Mapping[str, Callable[..., dict]] | None = None) -> None:
    """Worker side of `Workers`: announce readiness, then time ``fn`` on request.

    ``fn()`` must already be compiled and warm; its result is waited on with ``wait`` (jax
    arrays: block_until_ready; anything else is assumed synchronous). ``handlers``: extra
    commands, ``name -> f(*words) -> dict`` answered as one JSON line.
    """
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints of the workload must not break the protocol
    out.write(json.dumps({"ready": True, **dict(info or {})}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            n = int(cmd[1])
            t0 = time.perf_counter()
            r = None
            for _ in range(n):
                r = fn()
            _wait(r)
            out.write(json.dumps({"t": (time.perf_counter() - t0) / n}) + "\n")
            out.flush()
        elif handlers and cmd[0] in handlers:
            out.write(json.dumps(handlers[cmd[0]](*cmd[1:])) + "\n")
            out.flush()
        else:
            out.write(json.dumps({"error": f"unknown command {cmd[0]!r}"}) + "\n")
            out.flush()


def _wait(r: Any) -> None:
    if "jax" in sys.modules:
        import jax

        try:
            jax.block_until_ready(r)
        except Exception:
            pass


# ----------------------------------------------------------------------------- profiling


def _conv_kind(line: str) -> str | None:
    if " convolution(" not in line:
        return None
    m = re.search(r"window=\{size=(\d+)x(\d+)", line)
    if m and int(m.group(1)) > 3:  # the window spans the feature map: kernel gradient
        return "conv kernel-grad"
    if "transpose(jvp" in line:
        return "conv input-grad"
    return "conv forward"


def hlo_categories(hlo: str) -> dict[str, str]:
    """Instruction name -> category, from an optimized HLO module's text (``compiled.as_text()``).

    A fusion takes the category of what it fuses, in this order: a convolution (forward,
    input-gradient, kernel-gradient), a ``dot``, a ``gather`` or ``scatter`` (compaction's
    reindexing of channels), a ``reduce``, a ``transpose``/``copy`` (layout), a ``pad``,
    ``slice`` or ``concatenate`` (the option-A shortcut, zero channels), else elementwise. A
    convolution fused with a gather is ``'conv forward + gather'``. Prefixed ``'YNN '`` or
    ``'oneDNN '`` when XLA:CPU hands the instruction to that library.
    """
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)

    def body_ops(line: str) -> str:
        called = re.search(r"calls=%([\w.\-]+)", line)
        return "\n".join(comps.get(called.group(1), [])) if called else ""

    cats: dict[str, str] = {}
    for lines in comps.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%(\S+) = .*? ([\w-]+)\(", line)
            if not m:
                continue
            inst, op = m.groups()
            kind = _conv_kind(line)
            lib = "YNN " if "__ynn_fusion" in line else ("oneDNN " if "onednn" in line.lower() else "")
            if kind is None and op == "fusion":
                text = body_ops(line)
                inner = [k for k in map(_conv_kind, text.splitlines()) if k]
                moves = " gather(" in text or " scatter(" in text
                if inner:
                    kind = inner[0] + (" + gather" if moves else "")
                elif " dot(" in text:
                    kind = "dot"
                elif moves:
                    kind = "gather/scatter"
                elif " reduce(" in text:
                    kind = "reduction"
                elif "transpose" in inst or " transpose(" in text or "copy" in inst:
                    kind = "transpose/copy"
                elif any(f" {o}(" in text for o in ("pad", "slice", "concatenate")):
                    kind = "pad/slice/concat"
                else:
                    kind = "elementwise"
            elif kind is None:
                kind = {"copy": "transpose/copy", "transpose": "transpose/copy", "gather": "gather/scatter",
                        "scatter": "gather/scatter", "pad": "pad/slice/concat", "slice": "pad/slice/concat",
                        "concatenate": "pad/slice/concat"}.get(op, op)
            cats[inst] = lib + kind
    return cats


def profile_categories(fn: Callable[[], Any], lower: Callable[[], Any], calls: int = 2) -> dict:
    """Per-category seconds per call of ``fn`` from a ``jax.profiler`` trace of ``calls`` calls.

    ``lower()`` returns the ``jax.stages.Lowered`` of the program ``fn`` runs (its compiled HLO
    names the instructions that the trace's events carry). Returns ``{'wall_s': seconds per call
    under the profiler, 'seconds': {category: seconds per call}, 'ops': {category: instructions
    executed per call}, 'instructions': {instruction: [category, seconds per call]}}``.
    """
    import jax

    cats = hlo_categories(lower().compile().as_text())
    d = tempfile.mkdtemp(prefix="jaxprof_")
    try:
        block(fn())
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            r = None
            for _ in range(calls):
                r = fn()
            block(r)
        wall = (time.perf_counter() - t0) / calls
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
        agg: collections.Counter = collections.Counter()
        count: collections.Counter = collections.Counter()
        per_inst: collections.Counter = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in cats:
                        agg[cats[ev.name]] += ev.duration_ns / 1e9 / calls
                        count[cats[ev.name]] += 1
                        per_inst[ev.name] += ev.duration_ns / 1e9 / calls
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"wall_s": wall, "seconds": dict(agg), "ops": {k: v // calls for k, v in count.items()},
            "instructions": {k: [cats[k], v] for k, v in per_inst.items()}}


def fusion_operands(hlo: str) -> dict[str, dict]:
    """Fusion name -> ``{'shape': output shape, 'convs': how many convolution outputs it reads}``,
    from an optimized HLO module's text: a fusion that reads many is recomputing what those
    convolutions fed (the residual stream's elementwise chains)."""
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) fusion\((.*?)\), kind", line)
        if m:
            ops = re.findall(r"%([\w.\-]+)", m.group(3))
            out[m.group(1)] = {"shape": m.group(2).split("{")[0],
                               "convs": sum(o.startswith("conv") for o in ops)}
    return out
