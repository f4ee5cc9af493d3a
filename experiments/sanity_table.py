"""Prints the Markdown table of the sanity runs (experiments/sanity_runs.sh) from their records.

    python experiments/sanity_table.py [RECORDS_DIR]      # default experiments/sanity_records

One line per run directory (or its copy) holding a ``result.json``: method, epochs, test accuracy of the
masked and of the compacted model, the best epoch's test accuracy, conv MACs / conv+FC MACs /
params of the dense and the compacted model with the reductions, and wall time. Accuracy per
epoch comes from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ("dense", "sfp", "ghfp", "hfp")


def load_runs(runs_dir: Path) -> list[dict]:
    """The ``result.json`` records under ``runs_dir`` with their epoch curves, dense first."""
    out = []
    for res in sorted(runs_dir.glob("*/result.json")):
        rec = json.loads(res.read_text())
        metrics = res.parent / "metrics.jsonl"
        rec["curve"] = [json.loads(line)["test_accuracy"]
                        for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        out.append(rec)
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(out, key=lambda r: rank.get(r["method"], len(ORDER)))


def table(records: list[dict]) -> str:
    head = ("| run | method | epochs | test acc. masked (%) | compact (%) | test acc. per epoch (%) | "
            "conv MACs dense -> compact | conv+FC MACs dense -> compact | params dense -> compact | wall |")
    lines = [head, "|---|---|---:|---:|---:|---|---|---|---|---:|"]
    for r in records:
        d, c = r["dense"], r["compact"]
        curve = ", ".join(f"{100 * a:.1f}" for a in r["curve"])
        rate = f" {r['rate']:.0%}" if r["rate"] else ""
        epochs = f"{r['epochs']} + {r['finetune_epochs']} fine-tuning" if r.get("finetune_epochs") else r["epochs"]
        lines.append(
            f"| `{r['name']}` | {r['method']}{rate} | {epochs} | {100 * r['masked_accuracy']:.2f} | "
            f"{100 * r['compact_accuracy']:.2f} | {curve} | "
            f"{d['macs_conv']:,} -> {c['macs_conv']:,} (-{100 * r['macs_reduction_conv']:.1f}%) | "
            f"{d['macs_conv_fc']:,} -> {c['macs_conv_fc']:,} (-{100 * r['macs_reduction_conv_fc']:.1f}%) | "
            f"{d['params']:,} -> {c['params']:,} (-{100 * r['params_reduction']:.1f}%) | "
            f"{r.get('wall_time_s', 0) / 60:.0f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs_dir = Path(args[0] if args else "experiments/sanity_records")
    records = load_runs(runs_dir)
    if not records:
        print(f"no result.json under {runs_dir}/*/ (run experiments/sanity_runs.sh first)", file=sys.stderr)
        return 1
    print(table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
