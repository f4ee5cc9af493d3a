"""Records and Markdown tables of the runs that start from the imported trained CIFAR-10 ResNets
(issue 12): PFEC-A/B retraining, SFP from a trained model, and the PFEC sensitivity analysis.

    python experiments/pretrained_table.py --collect RUNS_DIR   # copy records, then print
    python experiments/pretrained_table.py                      # print from the committed records

``--collect`` copies the small record files of every run directory in ``RUNS_DIR`` that starts
from imported weights (``config.json``, ``start.json``, ``metrics.jsonl``, ``result.json``,
``config_changes.jsonl``) and of every sensitivity output (``sensitivity*.csv``,
``sensitivity.json``, ``sensitivity.png``) into ``experiments/pretrained_records/<name>/``
(never checkpoints). The tables say how many epochs of the paper's schedule each run has done.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

RECORDS = Path(__file__).resolve().parent / "pretrained_records"
RUN_FILES = ("config.json", "start.json", "metrics.jsonl", "result.json", "config_changes.jsonl")
SENS_FILES = ("sensitivity.csv", "sensitivity.partial.csv", "sensitivity.partial.json", "sensitivity.json",
              "sensitivity.png")
# epochs of each paper's schedule from a trained model (PFEC retraining; SFP's whole recipe)
PAPER_EPOCHS = {"pfec": 40, "sfp": 200}
# the papers' rows that start from a trained CIFAR-10 model: (method, model) -> peak LR
PAPER_FROM_TRAINED = {("pfec", "resnet56"): 0.001, ("pfec", "resnet110"): 0.001,
                      ("sfp", "resnet56"): 0.01, ("sfp", "resnet110"): 0.01}


def collect(runs_dir: Path, out: Path = RECORDS) -> list[str]:
    """Copies the record files of ``runs_dir``'s pretrained runs and sensitivity outputs."""
    names = []
    for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        files = RUN_FILES if (d / "start.json").is_file() else SENS_FILES
        if not any((d / f).is_file() for f in files) or (d / "import.json").is_file():
            continue
        dest = out / d.name
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for f in files:
            if (d / f).is_file():
                shutil.copy2(d / f, dest / f)
        names.append(d.name)
    return names


def _curve(d: Path) -> list[float]:
    path = d / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["test_accuracy"] for line in path.read_text().splitlines() if line.strip()]


def _epochs_done(done: int, planned: int, paper: int) -> str:
    """``'3 / 40'``, or for a run planned shorter than the paper's schedule
    ``'3 / 6 (the paper's 200 shortened to 6)'``: a short run never reads as the paper's."""
    if planned == paper:
        return f"{done} / {paper}"
    return f"{done} / {planned} (the paper's {paper} shortened to {planned})"


def recipe_note(cfg: dict) -> str:
    """``''`` for a run on a paper row's recipe, else why it is not one: a (method, model) the
    papers do not start from a trained model, or another peak learning rate (SFP from a trained
    model runs at one tenth of the from-scratch LR: 0.01)."""
    method, model = cfg["method"]["name"], cfg["model"]
    lr = PAPER_FROM_TRAINED.get((method, model))
    if lr is None:
        return f"not a paper row: {method} from a trained {model}"
    if cfg["optimizer"]["base_lr"] != lr:
        return f"peak LR {cfg['optimizer']['base_lr']:g}, not the paper's {lr:g}"
    return ""


def _trained_as(cfg: dict) -> str:
    """``'compact, bfloat16'``: whether the pruned model was retrained physically compact or as
    the masked full-width model, and the compute dtype (params stay float32 either way)."""
    model = "compact" if cfg.get("compact_before_retraining") else "masked"
    return f"{model}, {cfg.get('dtype', 'float32')}"


def _final(res: dict, dtype: str) -> str:
    """``'23.23 = 23.23'``; a low-precision run adds the float32 exactness check, which is the
    one the runner requires to be equal: ``'43.01, 43.00 (bfloat16); float32: 42.66 = 42.66'``."""
    masked, compact = 100 * res["masked_accuracy"], 100 * res["compact_accuracy"]
    check = res.get("compaction_check")
    if not check:
        return f"{masked:.2f} = {compact:.2f}"
    return (f"{masked:.2f}, {compact:.2f} ({dtype}); {check['dtype']}: "
            f"{100 * check['masked_accuracy']:.2f} = {100 * check['compact_accuracy']:.2f}")


def runs_table(records: Path = RECORDS) -> str:
    head = ("| run | method | trained as (model, compute) | epochs done / paper | baseline (imported) | after pruning, before retraining | "
            "test acc. per retraining epoch (%) | final: masked, compact (%) | conv MACs (SFP conv only) | "
            "conv+FC MACs (PFEC) | params |")
    lines = [head, "|---|---|---|---|---:|---:|---|---:|---|---|---|"]
    for d in sorted(p for p in records.iterdir() if (p / "start.json").is_file()):
        cfg = json.loads((d / "config.json").read_text())
        start = json.loads((d / "start.json").read_text())
        curve = _curve(d)
        method = cfg["method"]["name"]
        paper = PAPER_EPOCHS.get(method, cfg["epochs"])
        res = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else None
        dense, pruned = start["dense_costs"], start["after_init_costs"]

        def red(key):
            return f"{dense[key]:,} -> {pruned[key]:,} (-{100 * (1 - pruned[key] / dense[key]):.1f}%)"

        final = _final(res, cfg.get("dtype", "float32")) if res else "not finished"
        note = recipe_note(cfg)
        label = f"{method} {cfg['method'].get('kwargs', {}).get('config', '')}".strip()
        lines.append(
            f"| `{d.name}` | {label}{f' ({note})' if note else ''} | "
            f"{_trained_as(cfg)} | {_epochs_done(len(curve), cfg['epochs'], paper)} | {100 * start['pretrained_accuracy']:.2f} | "
            f"{100 * start['after_init_accuracy']:.2f} | {', '.join(f'{100 * a:.2f}' for a in curve) or '-'} | "
            f"{final} | {red('macs_conv')} | {red('macs_conv_fc')} | {red('params')} |")
    return "\n".join(lines)


def _sens_rows(d: Path) -> tuple[list[str], list[float], dict[str, list[float]], float | None]:
    """(layer labels, rates, label -> accuracies, baseline) from a full or a partial CSV."""
    rows: dict[str, list[float]] = {}
    rates: list[float] = []
    baseline = None
    full = d / "sensitivity.csv"
    if full.is_file():
        for r in csv.DictReader(full.open()):
            rate, acc = float(r["rate"]), float(r["accuracy"])
            if rate == 0.0:
                baseline = acc
                continue
            if rate not in rates:
                rates.append(rate)
            rows.setdefault(r["layer"], []).append(acc)
    elif (d / "sensitivity.partial.csv").is_file():
        rates = [0.1 * k for k in range(1, 10)]
        for r in csv.reader((d / "sensitivity.partial.csv").open()):
            rows[r[0]] = [float(v) for v in r[2:]]
    return list(rows), rates, rows, baseline


def sensitivity_table(d: Path) -> str:
    labels, rates, rows, baseline = _sens_rows(d)
    meta = json.loads((d / "sensitivity.json").read_text()) if (d / "sensitivity.json").is_file() else {}
    state = "complete" if (d / "sensitivity.csv").is_file() else "partial (resumes where it stopped)"
    out = [f"`{d.name}`: {len(labels)} layers, {state}; test images: {meta.get('test_images', 10000)}; "
           f"baseline {100 * baseline:.2f}%" if baseline is not None else
           f"`{d.name}`: {len(labels)} layers, {state}"]
    out += ["", "| layer | " + " | ".join(f"{round(100 * r)}%" for r in rates) + " | drop at 50% / 90% (points) |",
            "|---|" + "---:|" * (len(rates) + 1)]
    base = baseline if baseline is not None else None
    for label in labels:
        accs = rows[label]
        drops = ""
        if base is not None and len(accs) == 9:
            drops = f"{100 * (base - accs[4]):.2f} / {100 * (base - accs[8]):.2f}"
        out.append(f"| {label} | " + " | ".join(f"{100 * a:.2f}" for a in accs) + f" | {drops} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collect", type=Path, default=None, help="runs directory to copy records from")
    ap.add_argument("--records", type=Path, default=RECORDS)
    args = ap.parse_args(argv)
    if args.collect is not None:
        print("collected:", ", ".join(collect(args.collect, args.records)) or "nothing")
    if not args.records.is_dir():
        print(f"no records in {args.records}")
        return 1
    print(runs_table(args.records))
    for d in sorted(p for p in args.records.iterdir() if any((p / f).is_file() for f in SENS_FILES[:2])):
        print()
        print(sensitivity_table(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
