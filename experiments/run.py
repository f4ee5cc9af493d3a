"""Runs paper-table rows end to end and writes one result record per run.

    python experiments/run.py ROW [ROW ...] [--seeds N | --seed K] [--runs-dir experiments/runs]
                              [--records experiments/results] [--epochs N | --tiny [--synthetic-data]]
                              [--force]
                              [--config.key=value ...]
    python experiments/run.py --list

A ROW is a config file name of ``jaxprune/configs/`` without ``.py`` (``sfp_resnet56_cifar10``),
a shell pattern over them (``'pfec_*'``, ``'*_cifar100'``) or ``all``. Each row runs for seeds
``0 .. N-1`` (N = ``--seeds``, default the row's ``config.num_seeds``), ``config.seed = k``, through
`jaxprune.experiment.run` into ``<runs-dir>/<row>/seed<k>/`` and its record goes to
``<records>/<row>/seed<k>.json``: the record `run` returns (accuracies, MACs in both conventions,
params, device, wall time, the paper block) plus ``row``, ``seed``, ``schedule`` ('paper',
'short (N epochs)' or 'tiny'), the full ``config``, the run directory and the per-epoch test
accuracy curve (``curve``, ``test_accuracy_at_half``: GHFP's convergence claim).

- **Resumable.** A run directory that exists resumes from its checkpoints (one per epoch): re-run
  the same command after an interruption. A finished run (``result.json`` present) is not run
  again; its record is rewritten from ``result.json``. ``--force`` deletes the run directories of
  the named rows first (never those of their dependencies).
  A run directory whose ``config.json`` disagrees with the config about to run (another
  schedule, say) is refused unless ``--force``: give ``--runs-dir`` another folder instead.
- **Dependencies.** A row whose ``config.pretrained`` is ``experiments/runs/<row>/seed<k>`` (the
  form the configs use, see ``jaxprune/configs/common.py``) depends on that row's seed k: the
  runner runs it first when it is not finished, under the same schedule flags, and points
  ``pretrained`` at ``<runs-dir>/<row>/seed<k>``. A finished dependency is used as it is, whatever
  schedule produced it (a paper-schedule baseline also serves a shortened row).
- **Schedules.** ``--epochs N`` shortens every row (dependencies included) to N epochs, with the
  LR boundaries and warm-up scaled by N / epochs, so every LR phase keeps its share
  (label 'short (N epochs)'). ``--tiny`` shrinks every row to
  a smoke schedule: 2 epochs, the first 256 training and 200 test images, batch 128 (label
  'tiny'; default folders ``experiments/runs-tiny`` and ``experiments/results-tiny`` so that smoke
  runs never mix with real ones). ImageNet rows need ``--synthetic-data`` in --tiny mode: a
  generated TFDS-format ImageNet (`jaxprune.imagenet.write_synthetic_imagenet`: 64 train and 32
  validation JPEGs, written once to ``<runs-dir>/synthetic-imagenet``) streamed through the same
  loop at 64x64 pixels, batch 16, 2 epochs (``TINY_IMAGENET``); without it they are skipped.
- **Overrides.** ``--config.key=value`` applies to the named rows (after the schedule flags);
  the keys ``data_dir``, ``eval_batch_size``, ``keep_checkpoints`` and ``steps_per_call`` also apply to
  their dependencies.

- **XLA flags.** The runner adds `jaxprune.perf.RECOMMENDED_CPU_FLAGS` to ``XLA_FLAGS`` before
  jax starts (only their ``--xla_cpu_*`` flags where a GPU/TPU is expected), as the CLI's
  training commands do (``--default-xla-flags`` opts out).

Exit status: 0 when every requested run finished (or was skipped as finished / ImageNet in
--tiny), 1 when any failed (the others still run; rows depending on a failed one are skipped),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/run.py` from a checkout without install
    sys.path.insert(0, str(REPO))

import ml_collections  # noqa: E402

from jaxprune import config as config_lib  # noqa: E402
from jaxprune.files import write_failure  # noqa: E402
from jaxprune.training import Preempted  # noqa: E402

CONFIG_DIR = REPO / "jaxprune" / "configs"
DEFAULT_RUNS = "experiments/runs"
DEFAULT_RECORDS = "experiments/results"
TINY_RUNS = "experiments/runs-tiny"
TINY_RECORDS = "experiments/results-tiny"
NOT_ROWS = ("common",)

TINY = {"epochs": 2, "train_subset": 256, "test_subset": 200, "batch_size": 128,
        "eval_batch_size": 200, "keep_checkpoints": 1}
# ImageNet rows in --tiny mode (on the generated data of --synthetic-data)
TINY_IMAGENET = {"epochs": 2, "batch_size": 16, "eval_batch_size": 16, "image_size": 64,
                 "keep_checkpoints": 1}
SYNTHETIC_IMAGENET = {"num_train": 64, "num_validation": 32}
# overrides that also reach the dependencies of the named rows
ENV_KEYS = ("data_dir", "eval_batch_size", "keep_checkpoints", "steps_per_call")
# config keys that may differ between the config.json of a run directory and a resumed run
IGNORED_ON_RESUME = ("pretrained", "data_dir", "eval_batch_size", "keep_checkpoints",
                     "steps_per_call", "paper", "num_seeds")
_PRETRAINED = re.compile(r"(?:^|/)runs/([A-Za-z0-9_.-]+)/seed(\d+)/*$")


# ----------------------------------------------------------------------------- rows


def row_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Every row: the config files of ``config_dir`` (``common.py`` and ``_*.py`` excluded)."""
    return sorted(p.stem for p in Path(config_dir).glob("*.py")
                  if p.stem not in NOT_ROWS and not p.stem.startswith("_"))


def load_row(name: str, config_dir: Path = CONFIG_DIR) -> ml_collections.ConfigDict:
    """The config of row ``name`` (its file's ``get_config()``)."""
    path = Path(config_dir) / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown row {name!r}; see `python experiments/run.py --list`")
    cfg = config_lib.load_config(path)
    if cfg.name != name:
        raise ValueError(f"{path}: config.name is {cfg.name!r}, expected the file name {name!r}")
    return cfg


def select_rows(patterns: Sequence[str], config_dir: Path = CONFIG_DIR) -> list[str]:
    """Rows named by ``patterns`` (names, shell patterns or 'all'), in the order given."""
    rows = row_names(config_dir)
    out: list[str] = []
    for pat in patterns:
        pat = Path(pat).name if "/" in pat else pat  # jaxprune/configs/x.py works too
        pat = pat[:-3] if pat.endswith(".py") else pat
        hits = rows if pat == "all" else [r for r in rows if fnmatch.fnmatchcase(r, pat)]
        if not hits:
            raise ValueError(f"no row matches {pat!r}; see `python experiments/run.py --list`")
        out += [r for r in hits if r not in out]
    return out


def dependency(config: ml_collections.ConfigDict, rows: Sequence[str] | None = None
               ) -> tuple[str, int] | None:
    """``(row, seed)`` of the run that ``config.pretrained`` names, or None."""
    m = _PRETRAINED.search(str(config.pretrained or ""))
    if not m:
        return None
    rows = row_names() if rows is None else rows
    return (m.group(1), int(m.group(2))) if m.group(1) in rows else None


def is_imagenet(config: ml_collections.ConfigDict) -> bool:
    return config.dataset == "imagenet2012"


# ----------------------------------------------------------------------------- schedules


def scale_boundaries(boundaries: Sequence[float], old: int, new: int) -> tuple[float, ...]:
    """LR boundaries (epochs) of an ``old``-epoch schedule scaled to ``new`` epochs: each phase
    keeps its share of training (boundaries may become fractional epochs)."""
    return tuple(round(float(b) * new / old, 6) for b in boundaries)


def shorten(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    """``config`` with ``epochs`` epochs; its LR boundaries and warm-up scaled by ``epochs /
    config.epochs`` (so a 3-epoch SFP recipe still warms up, reaches LR 0.1 and steps down as
    the 200-epoch one does), and fine-tuning epochs scaled (at least 1 if any)."""
    c = ml_collections.ConfigDict(config.to_dict())
    if epochs != c.epochs:
        c.optimizer.boundaries = scale_boundaries(tuple(c.optimizer.boundaries), c.epochs, epochs)
        if "warmup_epochs" in c.optimizer:
            c.optimizer.warmup_epochs = round(float(c.optimizer.warmup_epochs) * epochs / c.epochs, 6)
        if c.get("finetune_epochs", 0):
            c.finetune_epochs = max(1, int(round(c.finetune_epochs * epochs / c.epochs)))
        c.epochs = int(epochs)
    return c


def make_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The smoke schedule of ``config`` (``TINY``; ``TINY_IMAGENET`` for ImageNet rows)."""
    tiny = TINY_IMAGENET if is_imagenet(config) else TINY
    c = shorten(config, tiny["epochs"])
    for k, v in tiny.items():
        if k != "epochs":
            c[k] = v
    return c


def schedule_label(config: ml_collections.ConfigDict, paper_epochs: int, tiny: bool) -> str:
    if tiny:
        return "tiny"
    if config.epochs == paper_epochs and not config.train_subset and not config.test_subset:
        return "paper"
    extra = f", {config.train_subset} training images" if config.train_subset else ""
    return f"short ({config.epochs} epochs{extra})"


@dataclasses.dataclass
class Job:
    row: str
    seed: int
    config: ml_collections.ConfigDict
    schedule: str
    workdir: Path
    record_path: Path
    depends: tuple[str, int] | None
    requested: bool


@dataclasses.dataclass
class Options:
    runs_dir: Path
    records_dir: Path
    tiny: bool = False
    synthetic_data: bool = False
    epochs: int | None = None
    overrides: tuple[str, ...] = ()
    force: bool = False
    progress: bool = True
    config_dir: Path = CONFIG_DIR


def make_job(row: str, seed: int, opts: Options, requested: bool) -> Job:
    """The run of ``row`` for ``seed`` under the options' schedule and overrides."""
    base = load_row(row, opts.config_dir)
    paper_epochs = base.epochs
    c = base
    if opts.tiny:
        c = make_tiny(c)
    elif opts.epochs:
        c = shorten(c, opts.epochs)
    overrides = list(opts.overrides) if requested else [
        o for o in opts.overrides if o.split("=", 1)[0] in ENV_KEYS]
    c = config_lib.override(c, overrides)
    if opts.synthetic_data and is_imagenet(c):
        c.data_dir = str(opts.runs_dir / "synthetic-imagenet")
    c.seed = int(seed)
    dep = dependency(c, row_names(opts.config_dir))
    if dep is not None:
        c.pretrained = str(opts.runs_dir / dep[0] / f"seed{dep[1]}")
    config_lib.validate(c)
    return Job(row, int(seed), c, schedule_label(c, paper_epochs, opts.tiny),
               opts.runs_dir / row / f"seed{seed}", opts.records_dir / row / f"seed{seed}.json",
               dep, requested)


def plan(rows: Sequence[str], opts: Options, seeds: int | None = None,
         only_seed: int | None = None) -> list[Job]:
    """Jobs for ``rows`` (each for its seeds), every dependency placed before its first user."""
    jobs: list[Job] = []
    index: dict[tuple[str, int], int] = {}

    def add(row: str, seed: int, requested: bool, stack: tuple = ()) -> None:
        key = (row, seed)
        if key in stack:
            raise ValueError(f"dependency cycle: {' -> '.join(f'{r}/seed{s}' for r, s in stack + (key,))}")
        if key in index:
            if requested:
                jobs[index[key]] = make_job(row, seed, opts, True)
            return
        job = make_job(row, seed, opts, requested)
        if job.depends is not None:
            add(job.depends[0], job.depends[1], False, stack + (key,))
        index[key] = len(jobs)
        jobs.append(job)

    for row in rows:
        n = seeds if seeds is not None else load_row(row, opts.config_dir).num_seeds
        for seed in ([only_seed] if only_seed is not None else range(n)):
            add(row, seed, True)
    return jobs


# ----------------------------------------------------------------------------- running


def _normalized(d: dict) -> dict:
    d = config_lib.with_defaults(d)
    for k in IGNORED_ON_RESUME:
        d.pop(k, None)
    return d


def check_workdir(job: Job) -> None:
    """Refuses a run directory written by a different config (see the module docstring)."""
    path = job.workdir / "config.json"
    if not path.is_file():
        return
    old = _normalized(json.loads(path.read_text()))
    new = _normalized(job.config.to_dict())
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(
            f"{job.workdir} holds a run of a different config (differs in {', '.join(diff)}); "
            "pass --force to delete it and start again, or use another --runs-dir")


def _curve(workdir: Path, epochs: int) -> list[float | None]:
    """Test accuracy after each epoch, from ``metrics.jsonl`` (None where missing)."""
    curve: list[float | None] = [None] * epochs
    path = workdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            e = rec.get("epoch")
            if isinstance(e, int) and 0 <= e < epochs and "test_accuracy" in rec:
                curve[e] = float(rec["test_accuracy"])
    return curve


def make_record(job: Job, result: dict) -> dict:
    """The runner's record: `jaxprune.experiment.run`'s record plus row, seed, schedule..."""
    rec = dict(result)
    curve = _curve(job.workdir, job.config.epochs)
    half = max(1, job.config.epochs // 2)
    rec.update(
        row=job.row,
        seed=job.seed,
        schedule=job.schedule,
        config=json.loads(json.dumps(job.config.to_dict(), default=list)),
        paper=json.loads(json.dumps(job.config.paper.to_dict(), default=list)),
        run_dir=str(job.workdir),
        accuracy=result.get("compact_accuracy", result.get("masked_accuracy")),
        curve=curve,
        test_accuracy_at_half=curve[half - 1] if len(curve) >= half else None,
    )
    return rec


def write_record(job: Job, result: dict) -> dict:
    rec = make_record(job, result)
    job.record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = job.record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(job.record_path)
    return rec


class DataCache:
    """In-memory data sets shared by the runs of one invocation."""

    def __init__(self):
        self._cache: dict[tuple, Any] = {}

    def get(self, config: ml_collections.ConfigDict):
        from jaxprune.factories import load_dataset

        if is_imagenet(config):  # streamed: each run opens its own streams
            return load_dataset(config)
        key = (config.dataset, config.data_dir, config.train_subset, config.test_subset,
               config.image_size, config.seed if config.dataset == "digits" else 0)
        if key not in self._cache:
            self._cache[key] = load_dataset(config)
        return self._cache[key]


def check_paper_baseline(job: Job, opts: Options) -> None:
    """A row labelled 'paper' must start from imported weights or from a baseline trained on
    its own row's paper schedule (all training images, all epochs); ValueError otherwise."""
    if job.schedule != "paper" or not job.config.pretrained:
        return
    from jaxprune.pretrained import baseline_provenance

    prov = baseline_provenance(job.config.pretrained)
    if prov["kind"] == "imported":
        return
    try:
        paper_epochs = load_row(str(prov.get("name")), opts.config_dir).epochs
    except (ValueError, FileNotFoundError):
        paper_epochs = None
    short = (paper_epochs is None or int(prov.get("epochs") or 0) < paper_epochs
             or int(prov.get("train_subset") or 0) > 0)
    if short:
        subset = f" on {prov['train_subset']} images" if prov.get("train_subset") else ""
        recipe = f"its recipe has {paper_epochs}" if paper_epochs else "not a paper row"
        raise ValueError(
            f"row {job.row} is labelled 'paper' but its baseline {prov['dir']} ({prov.get('name')}) "
            f"was trained {prov.get('epochs')} epochs{subset} ({recipe}); start it from imported "
            "weights (jaxprune import ... then --config.pretrained=DIR) or a paper-schedule "
            "baseline, or run it shortened (--epochs N)")


def execute(job: Job, opts: Options, data: DataCache) -> tuple[str, dict | None]:
    """Runs (or skips) one job; returns ``(status, record)``."""
    if opts.tiny and is_imagenet(job.config) and not opts.synthetic_data:
        return "skipped (ImageNet rows run in --tiny mode with --synthetic-data only)", None
    if opts.force and job.requested and job.workdir.exists():  # never a dependency's run
        shutil.rmtree(job.workdir)
    result_path = job.workdir / "result.json"
    if not job.requested and result_path.is_file():
        # a finished dependency serves as it is, whatever schedule produced it
        return "finished earlier (used as the pretrained model)", None
    check_workdir(job)
    check_paper_baseline(job, opts)
    if result_path.is_file():
        return "finished earlier", write_record(job, json.loads(result_path.read_text()))
    from jaxprune.experiment import run

    if opts.synthetic_data and is_imagenet(job.config):
        from jaxprune.imagenet import write_synthetic_imagenet

        write_synthetic_imagenet(job.config.data_dir, **SYNTHETIC_IMAGENET)
    t0 = time.time()
    result = run(job.config, job.workdir, progress=opts.progress, data=data.get(job.config))
    return f"ran in {time.time() - t0:.0f} s", write_record(job, result)


def run_jobs(jobs: Sequence[Job], opts: Options, stop_after: float | None = None
             ) -> dict[tuple[str, int], str]:
    """Runs ``jobs`` in order; returns ``(row, seed) -> status`` ('failed: ...' for failures)."""
    data = DataCache()
    status: dict[tuple[str, int], str] = {}
    t0 = time.time()
    for job in jobs:
        key = (job.row, job.seed)
        dep_status = status.get(job.depends) if job.depends else None
        if dep_status is not None and (dep_status.startswith("failed") or dep_status.startswith("skipped")
                                       or dep_status.startswith("not started")):
            status[key] = f"skipped (dependency {job.depends[0]}/seed{job.depends[1]}: {dep_status})"
        elif stop_after is not None and time.time() - t0 > stop_after:
            status[key] = "not started (--stop-after reached; re-run to continue)"
        else:
            print(f"=== {job.row} seed {job.seed} [{job.schedule}] -> {job.workdir}", flush=True)
            try:
                status[key] = execute(job, opts, data)[0]
            except Preempted as e:  # SIGTERM / Ctrl-C: a checkpoint is saved; stop every row
                status[key] = str(e)  # "stopped by SIGTERM at ..."
                print(f"--- {job.row} seed {job.seed}: {status[key]}", flush=True)
                break
            except Exception as e:  # noqa: BLE001 - reported, the other rows go on
                failed = write_failure(e)
                if failed is not None:  # a full disk: every later row would fail too; stop
                    where = f"cannot write {failed.filename}" if failed.filename else "a write failed"
                    status[key] = (f"write failed: {where}: {failed.strerror} (errno {failed.errno}); "
                                   "nothing written before was replaced: free space and rerun "
                                   "the same command to resume")
                    print(f"--- {job.row} seed {job.seed}: {status[key]}", flush=True)
                    break
                traceback.print_exc()
                status[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"--- {job.row} seed {job.seed}: {status[key]}", flush=True)
    return status


# ----------------------------------------------------------------------------- CLI


def list_rows(config_dir: Path = CONFIG_DIR) -> str:
    lines = [f"{'row':34s} {'dataset':12s} {'model':9s} {'method':6s} {'epochs':>6s} {'seeds':>5s}  "
             f"{'depends on':26s} paper row"]
    names = row_names(config_dir)
    for name in names:
        c = load_row(name, config_dir)
        dep = dependency(c, names)
        lines.append(f"{name:34s} {c.dataset:12s} {c.model:9s} {c.method.name:6s} {c.epochs:6d} "
                     f"{c.num_seeds:5d}  {(dep[0] if dep else '-'):26s} "
                     f"{c.paper.get('table', '')}: {c.paper.row}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/run.py", description="Run paper-table rows end to end (see the module docstring).",
        epilog="--config.key=value overrides any config entry of the named rows.")
    p.add_argument("rows", nargs="*", help="row names, shell patterns ('pfec_*') or 'all'")
    p.add_argument("--list", action="store_true", help="print every row and exit")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the row's num_seeds)")
    p.add_argument("--seed", type=int, default=None, help="run only this seed")
    p.add_argument("--runs-dir", default=None, help=f"run directories (default {DEFAULT_RUNS}; "
                                                    f"{TINY_RUNS} with --tiny)")
    p.add_argument("--records", default=None, help=f"result records (default {DEFAULT_RECORDS}; "
                                                   f"{TINY_RECORDS} with --tiny)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="smoke schedule: 2 epochs on 256 images (CIFAR rows)")
    g.add_argument("--epochs", type=int, default=None, help="shorten every row to N epochs (LR steps scaled)")
    p.add_argument("--synthetic-data", action="store_true",
                   help="with --tiny: run ImageNet rows on a generated TFDS-format ImageNet")
    p.add_argument("--force", action="store_true", help="delete existing run directories and run again")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                   help="start no new run after this many seconds (a started one runs on)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--default-xla-flags", action="store_true",
                   help="leave XLA_FLAGS as they are (default: add jaxprune.perf.RECOMMENDED_CPU_FLAGS)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = tuple(a[len("--config."):] for a in argv if a.startswith("--config."))
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    if args.list:
        print(list_rows())
        return 0
    if not args.rows:
        build_parser().print_usage(sys.stderr)
        print("experiments/run.py: error: name at least one row (or --list)", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print("experiments/run.py: error: --epochs must be >= 1", file=sys.stderr)
        return 2
    if args.synthetic_data and not args.tiny:
        print("experiments/run.py: error: --synthetic-data needs --tiny (generated data is for "
              "smoke runs only)", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print("experiments/run.py: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    opts = Options(
        runs_dir=Path(args.runs_dir or (TINY_RUNS if args.tiny else DEFAULT_RUNS)),
        records_dir=Path(args.records or (TINY_RECORDS if args.tiny else DEFAULT_RECORDS)),
        tiny=args.tiny, synthetic_data=args.synthetic_data, epochs=args.epochs, overrides=overrides, force=args.force,
        progress=not args.no_progress)
    if not (args.default_xla_flags or args.dry_run):
        from jaxprune import perf

        if not perf.backend_started():  # in-process callers (tests) keep their backend
            perf.use_recommended_cpu_flags(check=True)
    try:
        rows = select_rows(args.rows)
        jobs = plan(rows, opts, seeds=args.seeds, only_seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"experiments/run.py: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} run(s): " + ", ".join(
        f"{j.row}/seed{j.seed}{'' if j.requested else ' (dependency)'}" for j in jobs), flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"{j.row} seed {j.seed} [{j.schedule}] epochs={j.config.epochs} -> {j.workdir}"
                  + (f" (pretrained {j.config.pretrained})" if j.config.pretrained else ""))
        return 0
    status = run_jobs(jobs, opts, stop_after=args.stop_after)
    print("\nsummary:")
    for (row, seed), s in status.items():
        print(f"  {row}/seed{seed}: {s}")
    failed = [k for k, s in status.items() if s.startswith("failed") or s.startswith("skipped (dependency")]
    print(f"records in {opts.records_dir}; report (printed): jaxprune report --records "
          f"{opts.records_dir}" + (f" [--out {opts.records_dir / 'REPORT.md'}]" if opts.tiny else
                                   " [--all-rows --out RESULTS.md --plots experiments/plots]"))
    if any(s.startswith("stopped") for s in status.values()):
        return 4  # as the CLI: stopped by a signal with a checkpoint saved; rerun to resume
    if any(s.startswith("write failed") for s in status.values()):
        return 5  # as the CLI: a write failed (disk full); rerun to resume
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
