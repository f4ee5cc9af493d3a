"""The GPU kit's device side: receives the staged parts, then runs, within one time budget, the
throughput benches and the paper rows that start from the trained ResNet-56 or from scratch,
resuming runs that an earlier window stopped, and packs records and the checkpoints of
unfinished runs into at most 8 files under ``$OUT``.

Every device call runs the same command, ``bash experiments/gpu/kit.sh``, carrying one part of
``.stage/`` (written here by ``experiments/gpu/stage.py``). A call first copies its part to
``KIT_HOME`` (``/tmp/gpukit``, which lives as long as the machine stays warm) and processes it
(CIFAR shards decoded and checked, wheels installed, the previous window's run directories
restored); while parts are missing it stops there. The call that completes the set runs:

1. **bench**: `experiments/bench/engine.py` per model (ResNet-20/56/110), bfloat16: one step vs
   a whole timed epoch per device call, 1 vs 4 runs trained together, next to a plain Flax loop,
   side by side in one process per model; then, if the bench budget allows, float32 vs bfloat16
   at a whole epoch per call. Skipped once ``experiments/bench/records/engine_gpu.md`` is in
   the repository (``KIT_BENCH=1`` forces it).
2. **rows**, in order of value, each skipped once its record is in the repository or its run
   directory holds ``result.json``: PFEC-A, PFEC-B and SFP 40% from the trained ResNet-56
   (`jaxprune prune` from the imported weights), then the SFP CIFAR-10 table from scratch
   (ResNet-20/32/56/110, seeds 0..2, seed by seed; `experiments/run.py` one run per process).
   A run is started only while ``KIT_MIN_START`` seconds are left, and none after two runs in a
   row failed (the call then ends early, sparing device time); at the deadline a run gets
   SIGTERM (it stops at a step boundary and saves its checkpoint) and, after a grace period,
   SIGKILL.
3. **pack**: ``records.tgz`` (pretrained-run records and tables, run.py records, bench tables,
   ``status.json``, the log), ``resume.tgz`` (every run directory's record files plus the latest
   checkpoint of each unfinished run; split into ``resume.tgz.000``... above 15 MiB) and
   ``kit.log``; `check_out` checks the limits on what comes back.

Environment: ``OUT`` (required), ``KIT_HOME``, ``TIME_BUDGET`` (seconds for the whole command,
default 540), ``SMOKE=1`` (tiny schedules and subsets: the CPU rehearsal), ``KIT_JOBS``
(comma-separated shell patterns over job names, in the order to run them), ``KIT_BENCH`` (1 force, 0 skip),
``KIT_BENCH_BUDGET`` (300 s), ``KIT_MIN_START`` (90 s: no run starts with less left),
``KIT_TERM_LEAD`` (SIGTERM 30 s before the budget's end less ``KIT_PACK_RESERVE``, 25 s),
``KIT_GRACE`` (SIGKILL 20 s after that), ``PYTHON``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar_webp  # noqa: E402

MIB = 1 << 20
# what comes back from $OUT (the device's limits)
OUT_MAX_FILES, OUT_MAX_FILE, OUT_MAX_TOTAL, OUT_MAX_DEPTH = 8, 16 * MIB, 64 * MIB, 2
OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
RESUME_CHUNK = 15 * MIB
RESUME_MAX = 45 * MIB  # three 15 MiB files at most: records and the log fit beside them
# record files of a run directory (never the checkpoints): what the records and resume carry
RUN_FILES = ("config.json", "start.json", "metrics.jsonl", "result.json", "config_changes.jsonl")
# ... and what an unfinished run also needs to resume (besides its latest checkpoint)
RESUME_DIRS = ("retrain_model",)
CHECKPOINT_DIRS = ("checkpoints", "checkpoints_finetune")  # the training phase's, the fine-tuning's
# the normalisation the trained CIFAR-10 ResNets were trained with (../shared/data/pretrained)
NORM = ("--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225")
PRETRAINED_ROWS = (  # (run name, config, imported model)
    ("pfec_resnet56_A", "pfec_resnet56_cifar10_A", "resnet56"),
    ("pfec_resnet56_B", "pfec_resnet56_cifar10_B", "resnet56"),
    ("sfp_resnet56_from_trained", "sfp_resnet56_cifar10_pretrained", "resnet56"),
)
SFP_TABLE = ("sfp_resnet20_cifar10", "sfp_resnet32_cifar10", "sfp_resnet56_cifar10", "sfp_resnet110_cifar10")
SEEDS = 3  # config.num_seeds of the CIFAR rows
BENCH_MODELS = ("resnet20", "resnet56", "resnet110")


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run: ``kind`` 'prune' (`jaxprune prune` from imported weights) or 'row'
    (`experiments/run.py ROW --seed K`)."""

    name: str
    kind: str
    config: str
    seed: int = 0
    model: str = ""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The schedule knobs of a full (device) or smoke (CPU rehearsal) kit run."""

    smoke: bool
    common: tuple[str, ...]
    prune_extra: tuple[str, ...]
    row_extra: tuple[str, ...]
    bench_steps: int
    bench_batch: int
    bench_repeats: int
    bench_runs: int
    bench_models: tuple[str, ...]
    suffix: str


def settings(smoke: bool, home: Path) -> Settings:
    """Full: bfloat16, one device call per epoch, eval batch 1000, one kept checkpoint.
    Smoke: the same flags with one step per call (XLA:CPU runs loops slowly), ``SMOKE_EPOCHS``
    (3) epochs on 256 training / 200 test images for the pretrained rows, run.py's ``--tiny`` for
    the rows, and benches of 2 steps of batch 16 on ResNet-20."""
    data = f"--config.data_dir={home / 'data'}"
    if not smoke:
        return Settings(False, (data, "--config.dtype=bfloat16", "--config.steps_per_call=0",
                                "--config.eval_batch_size=1000", "--config.keep_checkpoints=1"),
                        (), (), 100, 128, 3, 4, BENCH_MODELS, "_gpu")
    epochs = os.environ.get("SMOKE_EPOCHS", "3")
    return Settings(True, (data, "--config.dtype=bfloat16", "--config.steps_per_call=1",
                           "--config.keep_checkpoints=1"),
                    (f"--config.epochs={epochs}", "--config.train_subset=256", "--config.test_subset=200",
                     "--config.eval_batch_size=200"),
                    ("--tiny",), 2, 16, 1, 2, ("resnet20",), "_gpu_smoke")


def plan_jobs(st: Settings, patterns: Sequence[str] = ()) -> list[Job]:
    """The rows in order of value (pretrained rows, then the SFP table seed by seed); with shell
    ``patterns`` over the job names, only the matching jobs, ordered by the first pattern each
    matches (so ``KIT_JOBS`` also sets the order), ties in the default order."""
    jobs = [Job(name + st.suffix, "prune", config, 0, model) for name, config, model in PRETRAINED_ROWS]
    jobs += [Job(f"{row}/seed{seed}", "row", row, seed) for seed in range(SEEDS) for row in SFP_TABLE]
    if not patterns:
        return jobs
    first = {j.name: next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(j.name, p)), None) for j in jobs}
    return sorted((j for j in jobs if first[j.name] is not None), key=lambda j: first[j.name])


def run_dir(job: Job, home: Path) -> Path:
    return home / "runs" / ("pretrained" if job.kind == "prune" else "rows") / job.name


def recorded_in_repo(job: Job, repo: Path, st: Settings) -> bool:
    """Whether the repository already holds this job's finished record on the paper's schedule,
    from any device (a row trained on the GPU may be finished here; a short-schedule record
    does not count), in full mode only: smoke records never go into the repository."""
    if st.smoke:
        return False
    if job.kind == "prune":
        return (repo / "experiments" / "pretrained_records" / job.name / "result.json").is_file()
    row_dir = repo / "experiments" / "results" / job.config
    for p in row_dir.glob(f"seed{job.seed}*.json"):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rec.get("seed") == job.seed and rec.get("schedule") == "paper":
            return True
    return False


def is_done(job: Job, repo: Path, home: Path, st: Settings) -> bool:
    return (run_dir(job, home) / "result.json").is_file() or recorded_in_repo(job, repo, st)


def job_command(job: Job, home: Path, st: Settings, python: str) -> list[str]:
    if job.kind == "prune":
        return [python, "-m", "jaxprune.cli", "prune", str(home / "runs" / "pretrained" / f"import_{job.model}"),
                "--config", job.config, "--workdir", str(run_dir(job, home)),
                "--no-progress", *st.common, *st.prune_extra]
    return [python, "experiments/run.py", job.config, "--seed", str(job.seed),
            "--runs-dir", str(home / "runs" / "rows"), "--records", str(home / "results"),
            "--no-progress", *st.row_extra, *st.common]


def bench_commands(st: Settings, out_file: Path, python: str) -> list[list[str]]:
    """bfloat16 per model (plain Flax loop, 1 step vs a whole timed epoch per call, 1 vs R runs
    together), then float32 vs bfloat16 at a whole epoch per call, per model."""
    base = [python, "experiments/bench/engine.py", "--steps", str(st.bench_steps), "--batch", str(st.bench_batch),
            "--repeats", str(st.bench_repeats), "--append", str(out_file)]
    cmds = [base + ["--models", m, "--chunk", "1,0", "--runs", str(st.bench_runs),
                    "--variants", "plain,chunk_bf16,runs_bf16"] for m in st.bench_models]
    cmds += [base + ["--models", m, "--chunk", "0", "--runs", "0", "--variants", "chunk_bf16,chunk"]
             for m in st.bench_models]
    return cmds


# ----------------------------------------------------------------------------- run directories


def latest_checkpoint(ckpt_dir: Path) -> list[Path]:
    """What an unfinished run needs of ``ckpt_dir``: the newest epoch step (the largest numeric
    folder) and the mid-epoch ``preempt`` folder if any, plus the files at its top."""
    if not ckpt_dir.is_dir():
        return []
    steps = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    keep = [p for p in ckpt_dir.iterdir() if p.is_file()]
    if steps:
        keep.append(max(steps, key=lambda p: int(p.name)))
    if (ckpt_dir / "preempt").is_dir():
        keep.append(ckpt_dir / "preempt")
    return sorted(keep)


def resume_paths(run: Path) -> list[Path]:
    """The paths of run directory ``run`` that travel to the next window: the record files and,
    for an unfinished run (no ``result.json``), its compact starting model and the latest
    checkpoint of each phase (training, fine-tuning)."""
    paths = [run / f for f in RUN_FILES if (run / f).is_file()]
    if not (run / "result.json").is_file():
        paths += [run / d for d in RESUME_DIRS if (run / d).is_dir()]
        for d in CHECKPOINT_DIRS:
            paths += latest_checkpoint(run / d)
    return paths


def run_dirs(home: Path) -> list[Path]:
    """Run directories under ``home/runs`` (imports excluded: they are rebuilt each window)."""
    out = []
    pre = home / "runs" / "pretrained"
    if pre.is_dir():
        out += [p for p in sorted(pre.iterdir()) if p.is_dir() and not (p / "import.json").is_file()
                and (p / "config.json").is_file()]
    rows = home / "runs" / "rows"
    if rows.is_dir():
        out += [p for p in sorted(rows.glob("*/seed*")) if (p / "config.json").is_file()]
    return out


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def pack_resume(home: Path, out: Path, priority: Sequence[Path], limit: int = RESUME_MAX) -> tuple[list[Path], list[str]]:
    """Writes ``resume.tgz`` (split into ``resume.tgz.000``... when over `RESUME_CHUNK`) into
    ``out``: the run.py records and, per run directory, `resume_paths` relative to ``home``.
    Unfinished runs past ``limit`` (in ``priority`` order, the rest after) travel without their
    checkpoints; returns (the files written, the runs whose checkpoints were left out)."""
    runs = run_dirs(home)
    order = [r for r in priority if r in runs] + [r for r in runs if r not in priority]
    members: list[Path] = []
    if (home / "results").is_dir():
        members.append(home / "results")
    dropped, used = [], 0
    for r in order:
        paths = resume_paths(r)
        heavy = [p for p in paths if p.name not in RUN_FILES]
        size = sum(_size(p) for p in heavy)
        if heavy and used + size > limit:
            dropped.append(str(r.relative_to(home)))
            paths = [p for p in paths if p.name in RUN_FILES]
        else:
            used += size
        members += paths
    tgz = out / "resume.tgz"
    with tarfile.open(tgz, "w:gz", compresslevel=1) as tar:
        for m in members:
            tar.add(m, arcname=str(m.relative_to(home)))
    files = [tgz]
    if tgz.stat().st_size > RESUME_CHUNK:
        files = split_file(tgz, RESUME_CHUNK)
    return files, dropped


def split_file(path: Path, chunk: int) -> list[Path]:
    """Splits ``path`` into ``path.000``, ``path.001``... of at most ``chunk`` bytes (removes it)."""
    parts = []
    with open(path, "rb") as f:
        for i in range(10**3):
            data = f.read(chunk)
            if not data:
                break
            part = path.with_name(f"{path.name}.{i:03d}")
            part.write_bytes(data)
            parts.append(part)
    path.unlink()
    return parts


def check_out(out: Path) -> list[str]:
    """Problems with what ``out`` would send back (empty: none): more than 8 files, a file over
    16 MiB, over 64 MiB in all, a file more than 2 folders down, a name outside [A-Za-z0-9._-],
    or anything that is not a plain file or folder."""
    problems, files, total = [], 0, 0
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: name outside [A-Za-z0-9._-]")
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            problems.append(f"{rel}: not a plain file or folder")
            continue
        if p.is_dir():
            continue
        files += 1
        total += p.stat().st_size
        if len(rel.parts) - 1 > OUT_MAX_DEPTH:
            problems.append(f"{rel}: more than {OUT_MAX_DEPTH} folders down")
        if p.stat().st_size > OUT_MAX_FILE:
            problems.append(f"{rel}: {p.stat().st_size / MIB:.1f} MiB, over 16 MiB")
    if files > OUT_MAX_FILES:
        problems.append(f"{files} files, over {OUT_MAX_FILES}")
    if total > OUT_MAX_TOTAL:
        problems.append(f"{total / MIB:.1f} MiB in all, over 64 MiB")
    return problems


# ----------------------------------------------------------------------------- receiving parts


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def receive(stage: Path, home: Path, python: str, log) -> dict | None:
    """Copies and processes the parts of ``stage`` (``.stage/p*/`` with ``manifest.json``) into
    ``home``; returns the manifest once every part of it has arrived (in this call or earlier
    ones on this machine), else None."""
    manifests = sorted(stage.glob("p*/manifest.json")) if stage.is_dir() else []
    if not manifests:
        done = sorted(home.glob("recv/*/complete"))
        if done:  # everything arrived earlier on this machine (a repeated call)
            return json.loads((done[-1].parent / "manifest.json").read_text())
        log("no staged part in this call (.stage/p*/manifest.json) and none received earlier: "
            "run experiments/gpu/stage.sh here and make its calls")
        return None
    manifest = json.loads(manifests[0].read_text())
    sid = manifest["stage_id"]
    recv = home / "recv" / sid
    recv.mkdir(parents=True, exist_ok=True)
    (recv / "manifest.json").write_text(json.dumps(manifest))
    for mf in manifests:
        part = mf.parent.name
        m = json.loads(mf.read_text())
        if m["stage_id"] != sid:
            log(f"{mf.parent}: stage {m['stage_id']}, not {sid}: ignored (stage again)")
            continue
        if (recv / f"{part}.ok").is_file():
            continue
        for rel, want in m["parts"][part].items():
            dst = recv / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mf.parent / rel, dst)
            if sha256(dst) != want["sha256"]:
                raise SystemExit(f"{mf.parent / rel}: SHA-256 differs from the manifest: stage again")
        process_part(m["parts"][part], recv, home, manifest, python, log)
        (recv / f"{part}.ok").write_text("")
        log(f"received part {part} ({len(m['parts'][part])} files)")
    missing = [p for p in manifest["parts"] if not (recv / f"{p}.ok").is_file()]
    if missing:
        log(f"waiting for part(s) {', '.join(missing)} (make their calls next, while this machine is "
            "warm; a fresh machine needs every part again)")
        return None
    finish_receiving(recv, home, manifest, log)
    (recv / "complete").write_text("")
    return manifest


def process_part(files: dict, recv: Path, home: Path, manifest: dict, python: str, log) -> None:
    """Decodes this part's CIFAR shards (checked against the manifest's digests) and installs its
    wheels; resume chunks and pretrained weights wait in ``recv`` for `finish_receiving`."""
    shards = manifest["cifar10"]["shards"]
    for rel in files:
        if rel.startswith("cifar10/") and rel.endswith(".webp"):
            t = time.time()
            cifar_webp.decode_shard(recv / rel, shards, home / "data" / "cifar10")
            log(f"decoded {rel} ({time.time() - t:.1f} s, digests match)")
    wheels = [str(recv / rel) for rel in files if rel.endswith(".whl")]
    if wheels:
        res = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(home / "site"), *wheels],
                             capture_output=True, text=True)
        if res.returncode != 0:  # no pip: a wheel is a zip of the files pip would install
            log(f"pip install failed ({res.stderr.strip()[-200:]}); unzipping the wheels instead")
            for w in wheels:
                with zipfile.ZipFile(w) as z:
                    z.extractall(home / "site")
        log(f"installed {len(wheels)} wheel(s) into {home / 'site'}")


def finish_receiving(recv: Path, home: Path, manifest: dict, log) -> None:
    (home / "data" / "cifar10" / "classes.txt").write_text("\n".join(manifest["cifar10"]["classes"]) + "\n")
    for rel in manifest.get("pretrained", []):
        dst = home / "pretrained" / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recv / rel, dst)
    chunks = manifest.get("resume", {}).get("chunks", [])
    if chunks and not (recv / "resume.restored").is_file():
        tgz = recv / "resume.tgz"
        with open(tgz, "wb") as f:
            for rel in chunks:
                f.write((recv / rel).read_bytes())
        if sha256(tgz) != manifest["resume"]["sha256"]:
            raise SystemExit("the reassembled resume.tgz differs from the staged one: stage again")
        with tarfile.open(tgz) as tar:
            tar.extractall(home, filter="data")
        (recv / "resume.restored").write_text("")
        log(f"restored the previous window's run directories ({tgz.stat().st_size / MIB:.1f} MiB)")


# ----------------------------------------------------------------------------- running


class Log:
    """Prints and appends to ``path`` (under $OUT: it comes back even if the call is killed)."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[kit {time.time() - self.t0:6.0f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def raw(self, line: str) -> None:
        sys.stdout.write(line)
        sys.stdout.flush()
        with open(self.path, "a") as f:
            f.write(line)


def run_until(cmd: list[str], env: dict, stop_at: float, grace: float, log: Log) -> tuple[int, bool]:
    """Runs ``cmd`` (output into the log); SIGTERM at ``stop_at`` (epoch seconds), SIGKILL of its
    process group ``grace`` seconds later. Returns (exit status, whether it was stopped)."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    reader = threading.Thread(target=lambda: [log.raw(line) for line in proc.stdout], daemon=True)
    reader.start()
    stopped = killed = False
    while proc.poll() is None:
        now = time.time()
        if not stopped and now >= stop_at:
            log("deadline: SIGTERM (a training run stops at a step boundary and saves its checkpoint)")
            proc.send_signal(signal.SIGTERM)
            stopped = True
        elif stopped and not killed and now >= stop_at + grace:
            log(f"still running {grace:.0f} s after SIGTERM: SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.5)
    reader.join(timeout=10)
    return proc.returncode, stopped


def epochs_done(run: Path) -> tuple[int, int, float | None, float | None]:
    """(epochs in metrics.jsonl, planned epochs, median ``epoch_time_s``, median
    ``between_epochs_s``: the checkpoint save and records between epochs) of a run directory."""
    n, planned, times = 0, 0, {"epoch_time_s": [], "between_epochs_s": []}
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            n += 1
            for key, values in times.items():
                if isinstance(rec.get(key), (int, float)):
                    values.append(float(rec[key]))
    if (run / "config.json").is_file():
        planned = int(json.loads((run / "config.json").read_text()).get("epochs", 0))
    median = lambda v: round(sorted(v)[len(v) // 2], 2) if v else None  # noqa: E731
    return n, planned, median(times["epoch_time_s"]), median(times["between_epochs_s"])


def job_env(home: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(home / "site"), str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3", JAXPRUNE_DATA_DIR=str(home / "data"),
               JAX_COMPILATION_CACHE_DIR=str(home / "jax-cache"))
    return env


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip() or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU (nvidia-smi not found)"


def main() -> int:
    t0 = float(os.environ.get("KIT_T0") or time.time())
    out = Path(os.environ["OUT"])
    home = Path(os.environ.get("KIT_HOME", "/tmp/gpukit"))
    python = os.environ.get("PYTHON", sys.executable)
    smoke = os.environ.get("SMOKE", "0") == "1"
    budget = float(os.environ.get("TIME_BUDGET", "540"))
    out.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    log = Log(out / "kit.log")
    log(f"kit: repo {REPO}, home {home}, budget {budget:.0f} s, {'SMOKE' if smoke else 'full'} mode; {device_name()}")
    manifest = receive(REPO / ".stage", home, python, log)
    if manifest is None:
        problems = check_out(out)
        log("returned files: " + ("within the limits" if not problems else "; ".join(problems)))
        return 0
    st = settings(smoke, home)
    env = job_env(home)
    reserve = float(os.environ.get("KIT_PACK_RESERVE", "25"))  # seconds kept for packing
    lead = float(os.environ.get("KIT_TERM_LEAD", "30"))  # SIGTERM this long before `end`...
    grace = lead + float(os.environ.get("KIT_GRACE", "20"))  # ... SIGKILL this long after SIGTERM
    min_start = float(os.environ.get("KIT_MIN_START", "90" if not smoke else "30"))
    end = t0 + budget - reserve  # runs have normally stopped by then
    status: dict = {"mode": "smoke" if smoke else "full", "stage_id": manifest["stage_id"], "device": device_name(),
                    "budget_s": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                    "bench": [], "jobs": []}
    records = home / "records"
    shutil.rmtree(records, ignore_errors=True)
    (records / "bench").mkdir(parents=True)

    # 1. bench
    bench_file = home / "bench" / f"engine{st.suffix}.md"
    have = sorted((REPO / "experiments" / "bench" / "records").glob(f"engine{st.suffix}*.md"))
    want_bench = os.environ.get("KIT_BENCH", "")
    if want_bench == "1" or (want_bench != "0" and not have):
        bench_file.parent.mkdir(parents=True, exist_ok=True)
        bench_end = min(end - lead, time.time() + float(os.environ.get("KIT_BENCH_BUDGET", "300" if not smoke else "200")))
        for cmd in bench_commands(st, bench_file, python):
            if bench_end - time.time() < (45 if not smoke else 20):
                status["bench"].append({"cmd": cmd[2:], "status": "not started (bench budget spent)"})
                continue
            t = time.time()
            rc, stopped = run_until(cmd, env, bench_end, 5, log)
            status["bench"].append({"cmd": cmd[2:], "rc": rc, "seconds": round(time.time() - t),
                                    "status": "cut at the bench budget" if stopped else ("ok" if rc == 0 else "failed")})
    elif want_bench == "0":
        log("bench: skipped (KIT_BENCH=0)")
    else:
        log(f"bench: skipped ({', '.join(p.name for p in have)} in the repository; KIT_BENCH=1 forces it)")

    # 2. rows
    patterns = [p for p in os.environ.get("KIT_JOBS", "").split(",") if p]
    jobs = plan_jobs(st, patterns)
    todo = [j for j in jobs if not is_done(j, REPO, home, st)]
    log(f"rows: {len(jobs)} planned, {len(jobs) - len(todo)} finished earlier, {len(todo)} to run: "
        + ", ".join(j.name for j in todo))
    failures = 0
    for job in todo:
        left = end - lead - time.time()
        if left < min_start or failures >= 2:
            why = "budget" if left < min_start else "two runs failed in a row: see the log"
            status["jobs"].append({"name": job.name, "status": f"not started ({why})"})
            continue
        if job.kind == "prune":
            imp = home / "runs" / "pretrained" / f"import_{job.model}"
            if not (imp / "import.json").is_file():
                run_until([python, "-m", "jaxprune.cli", "import", job.model, str(home / "pretrained" / f"{job.model}.npz"),
                           "--workdir", str(imp), *NORM], env, end - lead, grace, log)
        t = time.time()
        rc, stopped = run_until(job_command(job, home, st, python), env, end - lead, grace, log)
        done, planned, epoch_s, between_s = epochs_done(run_dir(job, home))
        finished = (run_dir(job, home) / "result.json").is_file()
        state = "finished" if finished else ("stopped at the deadline (resumes next window)" if stopped else f"failed (exit {rc})")
        failures = failures + 1 if state.startswith("failed") else 0
        status["jobs"].append({"name": job.name, "status": state, "rc": rc, "seconds": round(time.time() - t),
                               "epochs": f"{done}/{planned}", "median_epoch_s": epoch_s,
                               "median_between_epochs_s": between_s})
        log(f"{job.name}: {state}; epochs {done}/{planned}; median epoch "
            + (f"{epoch_s:.1f} s" if epoch_s is not None else "-")
            + (f", {between_s:.2f} s between epochs (checkpoint, records)" if between_s is not None else ""))

    # 3. pack
    runs_pre = home / "runs" / "pretrained"
    tables = ""
    if runs_pre.is_dir():
        res = subprocess.run([python, "experiments/pretrained_table.py", "--collect", str(runs_pre),
                              "--records", str(records / "pretrained_records")],
                             cwd=REPO, env=env, capture_output=True, text=True)
        tables += res.stdout + res.stderr
    if (home / "results").is_dir():
        shutil.copytree(home / "results", records / "results")
    if bench_file.is_file():
        shutil.copy2(bench_file, records / "bench" / bench_file.name)
        tables += "\n" + bench_file.read_text()
    status["runs"] = {str(r.relative_to(home / "runs")): dict(zip(("epochs_done", "epochs", "median_epoch_s"), epochs_done(r)),
                                                              finished=(r / "result.json").is_file())
                      for r in run_dirs(home)}
    priority = [run_dir(j, home) for j in jobs]
    resume_files, dropped = pack_resume(home, out, priority)
    status["resume"] = {"files": [p.name for p in resume_files], "checkpoints_left_out": dropped}
    status["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status["wall_s"] = round(time.time() - t0)
    (records / "status.json").write_text(json.dumps(status, indent=1))
    (records / "tables.md").write_text(tables)
    log(f"resume: {', '.join(f'{p.name} ({p.stat().st_size / MIB:.1f} MiB)' for p in resume_files)}"
        + (f"; checkpoints left out (over {RESUME_MAX // MIB} MiB): {', '.join(dropped)}" if dropped else ""))
    log(f"wall {status['wall_s']} s of the {budget:.0f} s budget")
    shutil.copy2(out / "kit.log", records / "kit.log")
    with tarfile.open(out / "records.tgz", "w:gz") as tar:
        tar.add(records, arcname="records")
    problems = check_out(out)
    log("returned files: " + ", ".join(f"{p.name} ({p.stat().st_size / MIB:.2f} MiB)" for p in sorted(out.iterdir()))
        + ("; within the limits" if not problems else "; PROBLEMS: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
