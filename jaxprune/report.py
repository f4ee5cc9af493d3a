"""Result records -> Markdown tables per paper and accuracy-vs-MACs plots (``jaxprune report``).

`write_report(records_dir, out_md, plots=plots_dir)` reads

- the paper rows: every config file of ``jaxprune/configs/`` (``config.paper``: source, row,
  published accuracies and reductions in percent, ``-1`` = not given; ``table`` says which
  paper's table the row belongs to; GHFP rows name their SFP/ASFP ``controls``), and
- the records ``<records_dir>/<row>/seed<k>.json`` that ``experiments/run.py`` writes (any
  ``*.json`` below ``records_dir`` with a ``row`` key, or named by its folder),

and writes one table per paper (SFP, PFEC, GHFP, HFP, dense baselines) with EVERY paper row,
"not yet run" where no record exists, one line per (row, schedule) otherwise. Columns:

- ``ours``: test accuracy of the compacted model (top-1 on ImageNet; equal to the masked model,
  which `jaxprune.experiment.finish` checks), in percent, mean +- sample standard deviation
  (``ddof=1``) over the seeds found; ``seeds``: found / the row's ``num_seeds``.
- ``paper`` and ``diff`` (ours - paper, percentage points): the pruned accuracy, or the
  baseline accuracy for a dense row.
- MACs reduction of the compacted model against the dense one in both conventions, conv only
  (SFP's scripts) / conv + FC (PFEC, HFP); ``SFP formula``: SFP's closed-form figure at the float
  keep ratio (`jaxprune.flops.sfp_formula_reduction`) for SFP-family rows on CIFAR ResNets, which
  is what SFP's tables print; the exact count of the compacted model is lower.
- params reduction (ours, counting every parameter, BN included / paper as printed: PFEC's
  Table 1 leaves BN out, which moves a figure by at most a few tenths).
- GHFP table: ``acc at T/2``, the mean test accuracy after half the epochs (convergence claim).
  HFP table: the targets.

With ``plots`` a PNG per (data set, model) with at least one record is drawn (matplotlib, Agg
canvas), ``<plots>/<dataset>_<model>.png``: accuracy against MACs reduction on the paper's
counting convention (`draw_plot`), one colour per method, our runs filled with std error bars,
the papers' figures hollow, each paper's dense baseline dashed.

``diff`` is shown only for rows run on the paper's schedule; rows whose data set is not on this
machine say so (`unavailable_reason`) instead of "not yet run".

The tables go between the markers ``<!-- report:begin -->`` and ``<!-- report:end -->`` of
``out_md``; everything outside them (a hand-written preamble, notes on sanity runs) is kept.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BEGIN = "<!-- report:begin -->"
END = "<!-- report:end -->"
NOT_RUN = "not yet run"
DASH = "—"

TABLES = OrderedDict([
    ("SFP", "SFP - Soft Filter Pruning (He et al., IJCAI 2018)"),
    ("PFEC", "PFEC - Pruning Filters for Efficient ConvNets (Li et al., ICLR 2017)"),
    ("GHFP", "GHFP - Gradually Hard Filter Pruning (Cai et al., IJCNN 2021), with SFP / ASFP controls"),
    ("HFP", "HFP - Holistic Filter Pruning (Enderich et al., WACV 2021)"),
    ("Baselines", "Dense baselines"),
])
_DATASET_ORDER = {"cifar10": 0, "cifar100": 1, "imagenet2012": 2}
_METHOD_ORDER = {"dense": 0, "ghfp": 1, "sfp": 2, "asfp": 3, "srfp": 4, "asrfp": 5, "pfec": 6, "hfp": 7}
_SCHEDULE_ORDER = {"paper": 0, "tiny": 2}


def default_configs_dir() -> Path:
    """The paper-row configs shipped in the package (`jaxprune.configs`)."""
    return Path(__file__).resolve().parent / "configs"


# ----------------------------------------------------------------------------- inputs


def load_rows(configs_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Row name -> plain-dict config of every config file (``common.py``, ``_*.py`` excluded)."""
    from jaxprune.config import load_config

    d = Path(configs_dir) if configs_dir is not None else default_configs_dir()
    rows: dict[str, dict] = {}
    if not d.is_dir():
        return rows
    for p in sorted(d.glob("*.py")):
        if p.stem == "common" or p.stem.startswith("_"):
            continue
        cfg = load_config(p).to_dict()
        rows[p.stem] = json.loads(json.dumps(cfg, default=list))
    return rows


def load_records(records_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Row name -> its records (every readable ``*.json`` below ``records_dir``)."""
    out: dict[str, list[dict]] = {}
    root = Path(records_dir)
    if not root.is_dir():
        return out
    for p in sorted(root.rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(rec, dict) or not ("row" in rec or "compact_accuracy" in rec):
            continue
        row = rec.get("row") or (p.parent.name if p.parent != root else rec.get("name", p.stem))
        out.setdefault(str(row), []).append(rec)
    return out


# ----------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _pct(x: float | None, digits: int = 1) -> str:
    return DASH if x is None else f"{100 * x:.{digits}f}"


def _published(v: Any, digits: int = 2) -> str:
    return DASH if v is None or float(v) < 0 else f"{float(v):.{digits}f}"


def _accuracy(rec: Mapping) -> float | None:
    for k in ("accuracy", "compact_accuracy", "masked_accuracy"):
        if rec.get(k) is not None:
            return float(rec[k])
    return None


def _depth(model: str) -> int:
    m = re.search(r"(\d+)", model or "")
    return int(m.group(1)) if m else 0


def sfp_formula(cfg: Mapping) -> float | None:
    """SFP's closed-form MACs reduction for an SFP-family row on a CIFAR ResNet, else None."""
    from jaxprune.factories import soft_methods
    from jaxprune.flops import sfp_formula_reduction

    method = cfg.get("method", {})
    model = cfg.get("model", "")
    depth = _depth(model)
    if (method.get("name") not in soft_methods() or not model.startswith("resnet")
            or cfg.get("dataset") not in ("cifar10", "cifar100") or (depth - 2) % 6 or depth < 8):
        return None
    rate = float(method.get("rate", 0.0))
    return sfp_formula_reduction(depth, 1.0 - rate) if rate > 0 else None


# ----------------------------------------------------------------------------- table lines


def _schedules(records: Sequence[dict]) -> "OrderedDict[str, list[dict]]":
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(str(r.get("schedule", "paper")), []).append(r)
    keys = sorted(groups, key=lambda s: (_SCHEDULE_ORDER.get(s, 1), s))
    return OrderedDict((k, sorted(groups[k], key=lambda r: r.get("seed", 0))) for k in keys)


def summarize(name: str, cfg: Mapping | None, records: Sequence[dict]) -> list[dict]:
    """One summary dict per schedule of ``records`` (one 'not yet run' line if none)."""
    cfg = cfg or (records[0].get("config") if records else {}) or {}
    paper = dict(cfg.get("paper") or (records[0].get("paper") if records else {}) or {})
    method = (cfg.get("method") or {}).get("name") or (records[0].get("method") if records else "")
    base = {
        "row": name, "paper": paper, "method": method, "model": cfg.get("model", ""),
        "dataset": cfg.get("dataset", ""), "num_seeds": int(cfg.get("num_seeds", 1) or 1),
        "formula": sfp_formula(cfg) if cfg else None, "config": cfg,
    }
    published = paper.get("baseline_acc" if method == "dense" else "pruned_acc", -1.0)
    base["paper_acc"] = None if published is None or float(published) < 0 else float(published)
    if not records:
        why = unavailable_reason(base["dataset"])
        return [dict(base, schedule=why or NOT_RUN, n=0, not_run=True)]
    out = []
    for schedule, recs in _schedules(records).items():
        accs = [a for a in (_accuracy(r) for r in recs) if a is not None]
        line = dict(base, schedule=schedule, n=len({r.get("seed", i) for i, r in enumerate(recs)}),
                    records=recs)
        if accs:
            line["acc_mean"], line["acc_std"] = mean_std(accs)
        for key in ("macs_reduction_conv", "macs_reduction_conv_fc", "params_reduction"):
            vals = [float(r[key]) for r in recs if r.get(key) is not None]
            line[key] = sum(vals) / len(vals) if vals else None
        halves = [float(r["test_accuracy_at_half"]) for r in recs if r.get("test_accuracy_at_half") is not None]
        line["acc_half"] = sum(halves) / len(halves) if halves else None
        devices = []
        for r in recs:
            devices += [d for d in record_devices(r) if d not in devices]
        line["device"] = ", ".join(devices) if devices else DASH
        if line.get("formula") is None:
            vals = [r["sfp_formula_macs_reduction"] for r in recs if r.get("sfp_formula_macs_reduction")]
            line["formula"] = vals[0] if vals else None
        out.append(line)
    return out


def unavailable_reason(dataset: str) -> str | None:
    """Why rows of ``dataset`` cannot run with the data this machine has, or None when they can
    (CIFAR: a local copy or a prepared TFDS copy; ImageNet: a prepared TFDS ``imagenet2012``,
    which needs a manual download)."""
    from jaxprune import data as data_lib

    if dataset in ("cifar10", "cifar100") and not data_lib.cifar_available(dataset):
        return f"cannot run here: no {dataset} data (local copy or prepared TFDS)"
    if dataset == "imagenet2012":
        dirs = [os.environ.get("TFDS_DATA_DIR", ""), os.environ.get("JAXPRUNE_DATA_DIR", ""),
                str(Path.home() / "tensorflow_datasets")]
        if not any(d and (Path(d) / "imagenet2012").is_dir() for d in dirs):
            return "cannot run here: no prepared TFDS imagenet2012 (manual download)"
    return None


def record_devices(record: Mapping) -> list[str]:
    """The devices a run record's epochs trained on (``trained_on``, where its epoch records name
    them), else the one device that made the record (``device``)."""
    trained = [str(d) for d in (record.get("trained_on") or {}) if d != "unrecorded"]
    return trained or ([str(record["device"])] if record.get("device") else [])


def format_acc(line: Mapping) -> str:
    """A report line's accuracy cell: ``mean ± std`` in percent over its seeds, or the not-run /
    missing mark."""
    if line.get("not_run") or line.get("acc_mean") is None:
        return NOT_RUN if line.get("schedule") == NOT_RUN else DASH
    m, s = line["acc_mean"], line.get("acc_std")
    return f"{100 * m:.2f}" if s is None else f"{100 * m:.2f} ± {100 * s:.2f}"


def format_diff(line: Mapping) -> str:
    """ours - paper, only for a row run on the paper's schedule (else the schedule's name: a
    shortened run is not comparable with a published figure)."""
    if line.get("acc_mean") is None or line.get("paper_acc") is None:
        return DASH
    if line.get("schedule") != "paper":
        return "n/a"
    return f"{100 * line['acc_mean'] - line['paper_acc']:+.2f}"


def _targets(cfg: Mapping) -> str:
    kw = (cfg.get("method") or {}).get("kwargs") or {}
    parts = []
    if kw.get("macs_reduction") is not None:
        parts.append(f"MACs -{100 * float(kw['macs_reduction']):.0f}%")
    if kw.get("params_reduction") is not None:
        parts.append(f"params -{100 * float(kw['params_reduction']):.0f}%")
    return ", ".join(parts) or DASH


def table_markdown(table: str, lines: Sequence[Mapping]) -> str:
    """One Markdown table of summary lines (see the module docstring for the columns)."""
    head = ["row", "paper row", "schedule", "seeds", "ours acc. (%)", "paper acc. (%)", "diff",
            "ours MACs red. % (conv / conv+fc)", "SFP formula %", "paper MACs red. %",
            "params red. % (ours / paper)", "device"]
    if table == "GHFP":
        head.insert(7, "acc. at T/2 (%)")
    if table == "HFP":
        head.insert(7, "targets")
    rows = []
    for ln in lines:
        p = ln["paper"]
        run = not ln.get("not_run")
        macs = (f"{_pct(ln.get('macs_reduction_conv'))} / {_pct(ln.get('macs_reduction_conv_fc'))}"
                if run else DASH)
        params = f"{_pct(ln.get('params_reduction')) if run else DASH} / {_published(p.get('params_reduction'), 1)}"
        cells = [f"`{ln['row']}`", str(p.get("row") or DASH), ln["schedule"],
                 f"{ln['n']}/{ln['num_seeds']}", format_acc(ln),
                 DASH if ln.get("paper_acc") is None else f"{ln['paper_acc']:.2f}",
                 format_diff(ln), macs, _pct(ln.get("formula")),
                 _published(p.get("macs_reduction"), 1), params, ln.get("device", DASH) if run else DASH]
        if table == "GHFP":
            cells.insert(7, _pct(ln.get("acc_half"), 2) if run else DASH)
        if table == "HFP":
            cells.insert(7, _targets(ln.get("config") or {}))
        rows.append(cells)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _sort_key(name: str, cfg: Mapping) -> tuple:
    model = cfg.get("model", "")
    return (_DATASET_ORDER.get(cfg.get("dataset", ""), 9), re.sub(r"\d+", "", model), _depth(model),
            model, _METHOD_ORDER.get((cfg.get("method") or {}).get("name", ""), 9), name)


def table_rows(rows: Mapping[str, Mapping]) -> "OrderedDict[str, list[str]]":
    """Table -> its row names, ordered (GHFP's table also lists its controls)."""
    out: OrderedDict[str, list[str]] = OrderedDict((t, []) for t in TABLES)
    for name, cfg in rows.items():
        table = (cfg.get("paper") or {}).get("table") or _guess_table(name, cfg)
        out.setdefault(table, []).append(name)
    for name, cfg in rows.items():
        for ctrl in (cfg.get("paper") or {}).get("controls") or ():
            if ctrl in rows and ctrl not in out["GHFP"]:
                out["GHFP"].append(ctrl)
    for t in out:
        out[t].sort(key=lambda n: _sort_key(n, rows[n]))
    return out


def _guess_table(name: str, cfg: Mapping) -> str:
    method = (cfg.get("method") or {}).get("name", "")
    return {"dense": "Baselines", "pfec": "PFEC", "hfp": "HFP", "ghfp": "GHFP", "asfp": "GHFP"}.get(
        method, "SFP")


# ----------------------------------------------------------------------------- plots


_COLORS = {"dense": "black", "sfp": "tab:blue", "asfp": "tab:cyan", "srfp": "tab:purple",
           "asrfp": "tab:pink", "ghfp": "tab:red", "pfec": "tab:green", "hfp": "tab:orange"}


def plot_groups(lines: Iterable[Mapping]) -> "OrderedDict[tuple[str, str], list[Mapping]]":
    """The report lines to plot, grouped by ``(dataset, model)``, one line per ``(row, schedule)``
    (the first seen), in order."""
    groups: OrderedDict[tuple[str, str], list[Mapping]] = OrderedDict()
    seen = set()
    for ln in lines:
        key = (ln["row"], ln["schedule"])
        if key in seen or not ln.get("dataset") or not ln.get("model"):
            continue
        seen.add(key)
        groups.setdefault((ln["dataset"], ln["model"]), []).append(ln)
    return groups


def _paper_name(source: str) -> str:
    return (source or "paper").split(" ")[0]


def draw_plot(dataset: str, model: str, lines: Sequence[Mapping], path: Path) -> bool:
    """Accuracy vs MACs reduction of one (data set, model), our runs against the papers' figures;
    False (nothing drawn) when none of ``lines`` has a result of ours.

    Both sides use one counting convention per method: SFP-family rows on SFP's closed-form
    figure (what SFP prints; ours filled, joined by a thin line to the exact count of our
    compact model, an ``x``), the others on exact conv + FC MACs (as PFEC counts). Each paper's
    own dense baseline is a dashed line; our schedule is in the legend, all text inside the axes.
    """
    from jaxprune._optional import require
    from jaxprune.factories import soft_methods

    require("matplotlib", "plots", "plotting results")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ours = [ln for ln in lines if ln.get("acc_mean") is not None]
    theirs = [ln for ln in lines if ln.get("paper_acc") is not None]
    if not ours:
        return False
    fig = Figure(figsize=(6.4, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labelled = set()

    def label(text: str) -> str | None:
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for ln in ours:
        method = ln["method"] or "?"
        color = _COLORS.get(method, "gray")
        y = 100 * ln["acc_mean"]
        err = 100 * ln["acc_std"] if ln.get("acc_std") is not None else None
        if method == "dense":
            x, exact = 0.0, None
        elif method in soft_methods() and ln.get("formula") is not None:
            x, exact = 100 * ln["formula"], 100 * (ln.get("macs_reduction_conv") or 0.0)
        else:
            x, exact = 100 * (ln.get("macs_reduction_conv_fc") or 0.0), None
        ax.errorbar([x], [y], yerr=None if err is None else [err], fmt="o", ms=7, capsize=3,
                    color=color, label=label(f"{method.upper()} ours ({ln['schedule']})"))
        if exact is not None:
            ax.plot([x, exact], [y, y], "-", lw=0.8, color=color)
            ax.plot([exact], [y], "x", ms=7, color=color,
                    label=label("ours, exact count of the compact model"))
    baselines = {}
    for ln in theirs:
        method = ln["method"] or "?"
        p = ln["paper"]
        base = p.get("baseline_acc", -1)
        if base is not None and float(base) >= 0:
            baselines.setdefault(_paper_name(p.get("source", "")), float(base))
        red = p.get("macs_reduction", -1)
        x = 0.0 if method == "dense" else (float(red) if red is not None and float(red) >= 0 else None)
        if x is None:
            continue
        ax.plot([x], [ln["paper_acc"]], marker="o", ms=8, mfc="none", ls="none",
                color=_COLORS.get(method, "gray"), label=label(f"{method.upper()} paper"))
    for k, (name, acc) in enumerate(sorted(baselines.items())):
        ax.axhline(acc, ls="--", lw=0.8, color=f"C{k + 5}", label=label(f"{name} dense (paper)"))
    ax.set_xlabel("MACs reduction (%): SFP rows as SFP's formula, others exact conv + FC", fontsize=8)
    ax.set_ylabel("test accuracy (%)" if dataset != "imagenet2012" else "top-1 accuracy (%)")
    ax.set_title(f"{dataset} {model}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.12)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    return True


# ----------------------------------------------------------------------------- the report


def build_markdown(rows: Mapping[str, Mapping], records: Mapping[str, Sequence[dict]],
                   plot_links: Sequence[tuple[str, str]] = ()) -> tuple[str, list[Mapping]]:
    """The generated section (without markers) and all summary lines."""
    parts = [
        "_Generated by `jaxprune report` from the records of `experiments/run.py`; edit outside the "
        "report markers only._",
        "",
        "Accuracies in percent: ours = test accuracy of the compacted model (top-1 on ImageNet), "
        "mean ± sample std (ddof=1) over the seeds found (`seeds` = found / planned); paper = the "
        "published pruned accuracy (baseline accuracy for dense rows); diff = ours - paper, only for rows run on the paper's schedule (n/a otherwise). MACs "
        "reductions of the compacted model in two conventions (conv only, as SFP's scripts; conv + "
        "FC, as PFEC); `SFP formula` = SFP's closed form at the float keep ratio, which SFP's "
        "tables print. Params counted with BN (PFEC's Table 1 leaves BN out). Schedules: `paper` = "
        "the published recipe, `short (N epochs)` = shortened, `tiny` = smoke run (meaningless "
        "accuracies). A dash = not given / not applicable.",
    ]
    all_lines: list[Mapping] = []
    by_table = table_rows(rows)
    for table, names in by_table.items():
        if not names:
            continue
        lines = [ln for n in names for ln in summarize(n, rows[n], records.get(n, []))]
        all_lines += lines
        parts += ["", f"## {TABLES.get(table, table)}", "", table_markdown(table, lines)]
    extra = sorted(set(records) - set(rows))
    if extra:
        lines = [ln for n in extra for ln in summarize(n, None, records[n])]
        all_lines += lines
        parts += ["", "## Other records (no config file)", "", table_markdown("other", lines)]
    if plot_links:
        parts += ["", "## Plots", ""]
        parts += [f"![{title}]({link})" for title, link in plot_links]
    return "\n".join(parts) + "\n", all_lines


def merge_markdown(existing: str | None, section: str, title: str = "# Results") -> str:
    """``existing`` with the text between the markers replaced by ``section`` (kept otherwise)."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    if existing is None:
        return (f"{title}\n\nHand-written notes (sanity runs, remarks) go above the report markers; "
                f"`jaxprune report` rewrites only the text between them.\n\n{block}")
    start, end = existing.find(BEGIN), existing.find(END)
    if start != -1 and end != -1 and end > start:
        return existing[:start] + block + existing[end + len(END):].lstrip("\n")
    sep = "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    return existing + sep + block


def _rows_for(records: Mapping[str, Sequence[dict]], configs_dir: Any, all_rows: bool) -> dict:
    rows = load_rows(configs_dir)
    return rows if all_rows else {k: v for k, v in rows.items() if k in records}


def report_text(records_dir: str | os.PathLike, *, all_rows: bool = False,
                configs_dir: str | os.PathLike | None = None) -> str:
    """The report of the run records under ``records_dir`` as Markdown (no plots): paper rows
    compared with the paper (only those with a record unless ``all_rows``), every other run
    in a table of its own. ValueError when there is no record."""
    records = load_records(records_dir)
    if not records:
        raise ValueError(f"no run records (result.json or runner records) under "
                         f"{str(records_dir)!r}; expected a directory of runs or records")
    return build_markdown(_rows_for(records, configs_dir, all_rows), records)[0]


def write_report(records_dir: str | os.PathLike, out_md: str | os.PathLike,
                 plots: str | os.PathLike | None = None,
                 configs_dir: str | os.PathLike | None = None, *, all_rows: bool = True) -> Path:
    """Writes the tables (and plots) into ``out_md`` between the report markers (the rest of
    the file is kept); returns its path. ``all_rows``: every paper row, "not yet run" where no
    record exists (RESULTS.md); else only the rows with a record."""
    records = load_records(records_dir)
    rows = _rows_for(records, configs_dir, all_rows)
    out = Path(out_md)
    _, lines = build_markdown(rows, records)
    links: list[tuple[str, str]] = []
    if plots is not None:
        plots_dir = Path(plots)
        for (dataset, model), group in plot_groups(lines).items():
            path = plots_dir / f"{dataset}_{model}.png"
            if draw_plot(dataset, model, group, path):
                rel = os.path.relpath(path.resolve(), out.parent.resolve())
                links.append((f"{dataset} {model}", Path(rel).as_posix()))
    section, _ = build_markdown(rows, records, links)
    existing = out.read_text() if out.is_file() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(merge_markdown(existing, section))
    return out


__all__ = ["BEGIN", "END", "NOT_RUN", "build_markdown", "load_records", "load_rows", "mean_std",
           "merge_markdown", "report_text", "summarize", "table_markdown", "write_report"]
