"""The ``jaxprune`` command line: flags only. The work is in `jaxprune.experiment` (train,
prune) and `jaxprune.commands` (one module per other command).

    jaxprune --version
    jaxprune quickstart [--workdir DIR]
    jaxprune data cifar10|cifar100 [--dir DIR] [--from ARCHIVE] [--force]
    jaxprune data imagenet2012          (prints how to prepare it with TFDS)
    jaxprune train --config NAME_OR_FILE --workdir DIR [--config.key=value ...]
    jaxprune prune CHECKPOINT_DIR --config NAME_OR_FILE --workdir DIR [--config.key=value ...]
    jaxprune import MODEL STATE_DICT.npz --workdir DIR [--mean M M M --std S S S]
    jaxprune compact RUN_DIR [--checkpoint final|best]
    jaxprune eval PATH [--data-dir DIR] [--test-subset N] [--json]
    jaxprune info MODEL_OR_CHECKPOINT [--input-size N] [--residual scatter|coupled]
    jaxprune sensitivity TRAINED_DIR --config FILE --out DIR [--convs first|second|all]
    jaxprune bench-widths MODEL [--batch N] [--step N] [--out FILE]
    jaxprune report [--records DIR] [--out FILE [--plots DIR]] [--all-rows]

``--config.key=value`` overrides any config entry (Python literals; nested keys with dots).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


EXIT_USAGE = 2  # a bad input, a missing or unusable file: nothing was written
EXIT_DIVERGED = 3  # training diverged (non-finite loss or params); the last good checkpoint stays
EXIT_PREEMPTED = 4  # SIGTERM / SIGINT: stopped at a step boundary, checkpoint saved; rerun to resume
EXIT_WRITE_FAILED = 5  # a write failed (disk full): nothing written before was replaced; rerun to resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once


def _config_from(args, overrides: Sequence[str]):
    from jaxprune import config as config_lib

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.override(cfg, overrides)
    if getattr(args, "data_dir", None):
        cfg.data_dir = args.data_dir
    config_lib.validate(cfg)
    return cfg


def _print_record(rec: dict) -> None:
    d, c = rec["dense"], rec["compact"]
    print(f"accuracy: masked {rec['masked_accuracy']:.4f}, compact {rec['compact_accuracy']:.4f}")
    print(f"conv MACs {d['macs_conv']:,} -> {c['macs_conv']:,} ({100 * rec['macs_reduction_conv']:.1f}% fewer); "
          f"conv+fc MACs {d['macs_conv_fc']:,} -> {c['macs_conv_fc']:,}; "
          f"params {d['params']:,} -> {c['params']:,} ({100 * rec['params_reduction']:.1f}% fewer)")


def cmd_train(args, overrides) -> int:
    """`jaxprune train`: one run from a config (`jaxprune.experiment.run`)."""
    from jaxprune.experiment import run

    cfg = _config_from(args, overrides)
    if getattr(args, "checkpoint", None):
        cfg.pretrained = args.checkpoint
    rec = run(cfg, args.workdir, progress=not args.no_progress,
              allow_schedule_change=args.allow_schedule_change)
    _print_record(rec)
    print(f"compact model saved to {Path(args.workdir) / 'compact'}")
    return 0


def cmd_compact(args, overrides) -> int:
    """`jaxprune compact`: the compact model of a run's checkpoint (`jaxprune.commands.compact`)."""
    from jaxprune.commands.compact import compact_run

    rec = compact_run(args.run_dir, which=args.checkpoint)
    st = rec["from_state"]
    print(f"compacted the {args.checkpoint} checkpoint (checkpoint step {st['checkpoint_step']}, "
          f"optimizer step {st['optimizer_step']})")
    _print_record(rec)
    print(f"compact model saved to {Path(args.run_dir) / rec['compact_dir']}; record: "
          f"{Path(args.run_dir) / rec['result_file']}")
    if rec["compact_dir"] != "compact":
        print(f"jaxprune compact: warning: the newest checkpoint (step {st['newest_step']}) is "
              f"unreadable; compacted step {st['checkpoint_step']} into {rec['compact_dir']}/ and "
              f"{rec['result_file']}; compact/ and result.json were left unchanged", file=sys.stderr)
    return 0


def cmd_eval(args, overrides) -> int:
    """`jaxprune eval`: a run's or a saved model's accuracy on the full test set."""
    from jaxprune.commands.evaluate import evaluate_path

    res = evaluate_path(args.path, data_dir=args.data_dir, test_subset=args.test_subset)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['path']}: accuracy {res['accuracy']:.4f} (top-5 {res['top5']:.4f}, loss "
              f"{res['loss']:.4f}) on {res['images']:,} {res['dataset']} test images")
    return 0


def cmd_import(args, overrides) -> int:
    """`jaxprune import`: trained weights from an ``.npz`` into a run directory a run can start
    from."""
    from jaxprune.commands.import_weights import import_weights

    path = import_weights(args.model, args.state_dict, args.workdir, mean=tuple(args.mean or ()),
                          std=tuple(args.std or ()), dataset=args.dataset)
    print(f"imported {args.model} from {args.state_dict} into {path} "
          f"(evaluate: jaxprune eval {path}; start a run from it: --config.pretrained={path})")
    return 0


def cmd_bench_widths(args, overrides) -> int:
    """`jaxprune bench-widths`: the latency table of a model's prunable widths
    (`jaxprune.width_bench`)."""
    import jax
    import jax.numpy as jnp

    from jaxprune import validate, width_bench
    from jaxprune.graph import trace_linen
    from jaxprune.models import MODEL_NAMES, get_model

    validate.one_of(args.model, MODEL_NAMES, "model")
    for flag in ("batch", "step", "repeats"):
        validate.positive_int(getattr(args, flag), f"--{flag}")
    size = args.input_size or (224 if args.model in ("resnet18", "resnet34", "resnet50", "resnet101",
                                                     "resnet152") else 32)
    model = get_model(args.model)
    x = jnp.zeros((1, size, size, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    graph = trace_linen(model, variables, x, residual=args.residual)
    shape = (args.batch, size, size, 3)
    out = args.out or width_bench.cache_path(f"{args.model}-{args.residual}", shape)
    table = width_bench.bench_widths(model, variables, graph, shape, step=args.step,
                                     repeats=args.repeats, progress=not args.no_progress)
    meta = {"model": args.model, "residual": args.residual, "batch_shape": list(shape),
            "device": jax.devices()[0].device_kind, "step": args.step, "repeats": args.repeats}
    path = width_bench.save_table(out, table, meta)
    print(f"{len(table)} groups timed at widths in steps of {args.step}; table: {path}")
    print(f"use it: --config.method.width_table={path}")
    return 0


def cmd_info(args, overrides) -> int:
    """`jaxprune info`: a model's groups, widths and costs."""
    from jaxprune.commands.info import model_info

    print(model_info(args.target, input_size=args.input_size, residual=args.residual))
    return 0


def cmd_quickstart(args, overrides) -> int:
    """`jaxprune quickstart`: the offline demo (train, prune, compact, compare) on the bundled
    digits."""
    from jaxprune.quickstart import quickstart

    quickstart(args.workdir, epochs=args.epochs, progress=not args.no_progress)
    return 0


IMAGENET_HOWTO = (
    "ImageNet cannot be downloaded automatically (its licence needs a sign-in at image-net.org). "
    "Prepare it once with TFDS in the array_record format (preparing needs TensorFlow, reading "
    "does not): pip install 'jaxprune[imagenet]' tensorflow-cpu; put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar in <dir>/downloads/manual/; run `tfds build imagenet2012 "
    "--data_dir=<dir> --file_format=array_record`; then pass --data_dir <dir> or set "
    "JAXPRUNE_DATA_DIR=<dir>."
)


def cmd_data(args, overrides) -> int:
    """`jaxprune data`: downloads and checks a data set (`jaxprune.download`)."""
    if args.dataset == "imagenet2012":
        print(IMAGENET_HOWTO)
        return 0
    from jaxprune.download import prepare_cifar

    prepare_cifar(args.dataset, args.dir, archive=args.archive, force=args.force,
                  keep_archive=args.keep_archive)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxprune")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        import jaxprune

        return jaxprune.__version__


def cmd_sensitivity(args, overrides) -> int:
    """`jaxprune sensitivity`: PFEC's per-layer pruning sensitivity of a trained model."""
    from jaxprune.commands.sensitivity import sensitivity_run

    cfg = _config_from(args, overrides)
    path = sensitivity_run(cfg, args.checkpoint, args.out, convs=args.convs,
                           batch_size=args.batch_size, progress=not args.no_progress)
    print(f"sensitivity table and plot written to {path}")
    return 0


def cmd_report(args, overrides) -> int:
    """`jaxprune report`: the results table of run records (printed; written with ``--out``)."""
    from jaxprune.report import load_records, report_text, write_report

    if not Path(args.records).is_dir():
        raise FileNotFoundError(f"--records {args.records!r} is not a directory; expected a "
                                "directory of run records or run directories")
    if args.out is None:
        if args.plots:
            raise ValueError("--plots needs --out (the Markdown file that links the plots)")
        print(report_text(args.records, all_rows=args.all_rows), end="")
        return 0
    if not load_records(args.records) and not args.all_rows:
        raise ValueError(f"no run records (result.json or runner records) under {args.records!r}")
    out = write_report(args.records, args.out, plots=args.plots, all_rows=args.all_rows)
    print(f"wrote {out}" + (f" and plots in {args.plots}" if args.plots else ""))
    return 0


_FLAGS_HELP = ("leave XLA_FLAGS as they are (default: add jaxprune.perf.RECOMMENDED_CPU_FLAGS, "
               "XLA:CPU settings that speed up the CPU train step, more the deeper the model; "
               "see BENCHMARKS.md)")


def _use_fast_cpu_flags(args) -> None:
    """Adds the recommended XLA:CPU flags before jax starts (training commands only)."""
    if getattr(args, "default_xla_flags", True):
        return
    from jaxprune import perf

    if not perf.backend_started():  # in-process callers (tests, notebooks) keep their backend
        perf.use_recommended_cpu_flags(check=True)


OVERRIDES_HELP = (
    "config overrides: --config.KEY=VALUE sets any config entry (Python literals: 0.3, (60, 120), "
    "True; bare words are strings; nested keys with dots: --config.method.rate=0.4, "
    "--config.optimizer.base_lr=0.05, --config.train_subset=1000, --config.test_subset=500, "
    "--config.method.kwargs.final_bn=zero, --config.model_kwargs.width=16). Every key, its "
    "default and meaning: jaxprune/config.py (base_config). config.model is a bundled model's "
    "name or your own model's import path, 'my_package.models:make_net'.")


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxprune`` command line: one subcommand per ``cmd_*`` function."""
    p = argparse.ArgumentParser(prog="jaxprune", description="Structured filter pruning for Flax CNNs.",
                                epilog=OVERRIDES_HELP)
    p.add_argument("--version", action="version", version=f"jaxprune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="offline demo: train, SFP-prune, compact, save, load (minutes on CPU)")
    q.add_argument("--workdir", default="workdir/quickstart")
    q.add_argument("--epochs", type=int, default=None, help="override the demo's epochs per phase")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--default-xla-flags", action="store_true", help=_FLAGS_HELP)
    q.set_defaults(func=cmd_quickstart)

    d = sub.add_parser("data", help="download a data set into the local layout jaxprune reads")
    d.add_argument("dataset", choices=("cifar10", "cifar100", "imagenet2012"))
    d.add_argument("--dir", default=None, help="data folder (default: $JAXPRUNE_DATA_DIR, else "
                   "~/.cache/jaxprune); the data set goes to DIR/<dataset>/")
    d.add_argument("--from", dest="archive", default=None, metavar="ARCHIVE",
                   help="convert this official archive (e.g. cifar-10-python.tar.gz) instead of downloading")
    d.add_argument("--force", action="store_true", help="write the data set again even if present")
    d.add_argument("--keep-archive", action="store_true", help="keep the downloaded archive")
    d.set_defaults(func=cmd_data)

    for name, helptext in (("train", "train a dense model or prune with a method, then compact"),
                           ("prune", "one-shot prune a trained checkpoint (e.g. PFEC), retrain, compact")):
        t = sub.add_parser(name, help=helptext, description=helptext, epilog=OVERRIDES_HELP)
        if name == "prune":
            t.add_argument("checkpoint", help="run directory or checkpoint directory of the trained model")
        t.add_argument("--config", required=True, metavar="NAME_OR_FILE",
                       help="a packaged config's name (e.g. sfp_resnet56_cifar10; see "
                            "jaxprune/configs/) or a config file defining get_config()")
        t.add_argument("--workdir", required=True)
        t.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None, help="local data copy (else $JAXPRUNE_DATA_DIR, ~/.cache/jaxprune; "
                       "fetch it with `jaxprune data cifar10`)")
        t.add_argument("--no-progress", action="store_true")
        t.add_argument("--allow-schedule-change", action="store_true",
                       help="resume a run in --workdir with changed epochs / batch / optimizer "
                            "(recorded in config_changes.jsonl); refused otherwise")
        t.add_argument("--default-xla-flags", action="store_true", help=_FLAGS_HELP)
        t.set_defaults(func=cmd_train)

    im = sub.add_parser("import", help="import trained PyTorch CIFAR ResNet weights (.npz state_dict)")
    im.add_argument("model", help="resnet20, resnet32, resnet44, resnet56 or resnet110")
    im.add_argument("state_dict", help=".npz of the PyTorch state_dict (keys as in PyTorch)")
    im.add_argument("--workdir", required=True, help="new directory to write")
    im.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (0..1 units) the "
                    "weights were trained with (default: the data set's)")
    im.add_argument("--std", type=float, nargs=3, help="input normalisation std (0..1 units)")
    im.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100"))
    im.set_defaults(func=cmd_import)

    c = sub.add_parser("compact", help="compact the latest checkpoint of a run directory")
    c.add_argument("run_dir")
    c.add_argument("--checkpoint", default="final", choices=("final", "best"),
                   help="the final (latest) checkpoint, or the one with the best test accuracy")
    c.set_defaults(func=cmd_compact)

    e = sub.add_parser("eval", help="test accuracy of a compact model directory or a run directory")
    e.add_argument("path")
    e.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None)
    e.add_argument("--test-subset", type=int, default=0, metavar="N",
                   help="score the first N test images only (default: the whole test set)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="widths, params and MACs per layer of a model name or checkpoint")
    i.add_argument("target", help="a model name (e.g. resnet56) or a compact-model / run directory")
    i.add_argument("--input-size", type=int, default=0, help="image side (default: 32, 224 for ImageNet ResNets)")
    i.add_argument("--residual", default="scatter", choices=("scatter", "coupled"))
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench-widths", help="per-group latency at candidate widths on this device "
                       "(a table for config.method.width_table)")
    b.add_argument("model")
    b.add_argument("--batch", type=int, default=256, help="deploy batch size")
    b.add_argument("--input-size", type=int, default=0)
    b.add_argument("--residual", default="scatter", choices=("scatter", "coupled"))
    b.add_argument("--step", type=int, default=8, help="candidate widths: multiples of this")
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--out", default=None, help="table file (default: the per-device cache)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench_widths)

    s = sub.add_parser("sensitivity", help="PFEC sensitivity analysis of a trained checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--config", required=True, metavar="NAME_OR_FILE")
    s.add_argument("--out", required=True)
    s.add_argument("--data-dir", "--data_dir", dest="data_dir", default=None)
    s.add_argument("--convs", default="all", choices=("first", "second", "all"),
                   help="which convs: the first / second conv of every residual block, or all")
    s.add_argument("--batch-size", type=int, default=100,
                   help="evaluation batch (100 measured fastest for ResNet-56 on XLA:CPU)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--default-xla-flags", action="store_true", help=_FLAGS_HELP)
    s.set_defaults(func=cmd_sensitivity)

    r = sub.add_parser("report", help="tables of run records: paper rows against the paper, "
                       "other runs in a table of their own")
    r.add_argument("--records", default="experiments/results",
                   help="a directory of run directories (their result.json) or runner records")
    r.add_argument("--out", default=None, help="Markdown file to write (only the text between "
                   "its report markers is replaced); default: print to stdout")
    r.add_argument("--plots", default=None, help="also draw accuracy-vs-MACs plots into this "
                   "directory (needs --out)")
    r.add_argument("--all-rows", action="store_true",
                   help="list every paper row, 'not yet run' where no record exists (RESULTS.md)")
    r.set_defaults(func=cmd_report)
    return p


def _quiet_absl() -> None:
    """No ``WARNING:absl`` lines from libraries (Orbax, TensorFlow Datasets) on the console:
    absl logs errors only; jaxprune reports what matters itself. Orbax's own error lines (with
    tracebacks, from its background save threads) are dropped too: the failure they describe
    is raised to the command, which reports it in one line."""
    import logging
    import os

    orbax_dir = f"{os.sep}orbax{os.sep}"

    def not_from_orbax(record) -> bool:  # the caller's frames: the logger class may be plain
        frame = sys._getframe(1)
        while frame is not None and orbax_dir not in frame.f_code.co_filename:
            frame = frame.f_back
        return frame is None

    absl_logger = logging.getLogger("absl")
    absl_logger.setLevel(logging.ERROR)
    if not any(getattr(f, "__name__", "") == "not_from_orbax" for f in absl_logger.filters):
        absl_logger.addFilter(not_from_orbax)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with jax's dependencies
        pass


def _write_failed_line(command: str, failed) -> str:
    where = f"cannot write {failed.filename}" if failed.filename else "a write failed"
    return (f"jaxprune {command}: error: {where}: {failed.strerror} (errno {failed.errno}); nothing "
            "written before was replaced: free space and rerun the same command (a run resumes "
            "from its last checkpoint)")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``jaxprune`` command line on ``argv``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_absl()
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(rest)
    _use_fast_cpu_flags(args)
    try:  # imports take seconds (jax, Orbax): a Ctrl-C may land here
        from jaxprune._optional import MissingExtraError
        from jaxprune.checkpoints import BadWeightsError
        from jaxprune.files import write_failure
        from jaxprune.training import DivergenceError, Preempted, SecondInterrupt
    except KeyboardInterrupt:
        print(f"jaxprune {args.command}: interrupted by Ctrl-C while starting (nothing was "
              "written)", file=sys.stderr)
        return EXIT_INTERRUPTED

    try:
        try:
            return args.func(args, overrides)
        except Exception as e:  # a full disk, wherever it struck: one line, exit 5
            failed = write_failure(e)
            if failed is None:
                raise
            print(_write_failed_line(args.command, failed), file=sys.stderr)
            return EXIT_WRITE_FAILED
    except BadWeightsError as e:  # eval: the model is diverged; elsewhere: unusable input
        print(f"jaxprune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED if args.command == "eval" else EXIT_USAGE
    except Preempted as e:
        print(f"jaxprune {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except SecondInterrupt:
        print(f"jaxprune {args.command}: interrupted (a second Ctrl-C: no checkpoint of the "
              "current epoch; the run resumes from its last one)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"jaxprune {args.command}: interrupted by Ctrl-C (files are written atomically: "
              "nothing half-written is kept; rerun the same command)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DivergenceError as e:
        print(f"jaxprune {args.command}: error: {e}; no checkpoint, compact model or result was "
              "written from the diverged state", file=sys.stderr)
        return EXIT_DIVERGED
    except MissingExtraError as e:
        print(f"jaxprune {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename and str(e.filename) not in str(msg):
            msg = f"{e.filename}: {e.strerror or e}"
        lines = str(msg).strip().splitlines() or [type(e).__name__]
        print(f"jaxprune {args.command}: error: {lines[0]}{' ...' if len(lines) > 1 else ''}",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
