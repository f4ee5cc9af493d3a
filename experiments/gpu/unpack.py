"""Unpacks, here, what the GPU kit's last device call brought back, and prints its tables.

    python experiments/gpu/unpack.py FILES_DIR [--repo DIR]

``FILES_DIR`` holds the call's files (``records.tgz``, ``resume.tgz`` or ``resume.tgz.000``...,
``kit.log``). Into the repository (``--repo``, default this one):

- ``records/pretrained_records/<run>/`` -> ``experiments/pretrained_records/<run>/`` (replaced);
- ``records/results/<row>/seed<k>.json`` -> ``experiments/results/<row>/`` (`record_destination`:
  a record of another device or schedule already there is kept, the GPU one goes beside it;
  smoke records go to ``experiments/results-tiny/``, as run.py's ``--tiny`` ones);
- ``records/bench/engine_gpu.md`` -> ``experiments/bench/records/`` (a new name if one is there);
- ``records/kit.log`` and ``status.json`` -> ``experiments/gpu/logs/<stage>_<end time>.{log,json}``;
- the resume chunks -> ``.stage/resume/resume.tgz`` (git-ignored), which ``stage.py`` sends with
  the next window's calls; when none came back the old one is removed.

Records of a smoke run (``status.json`` mode 'smoke', the CPU rehearsal) are refused unless
``--allow-smoke`` (for a scratch copy named with ``--repo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def record_destination(row_dir: Path, name: str, record: dict) -> Path:
    """Where a returned run.py record ``name`` (``seed<k>.json``) goes in ``row_dir``: its own name
    unless that file holds a record of another device or schedule, then ``seed<k>.gpu.json``."""
    dst = row_dir / name
    if dst.is_file():
        try:
            old = json.loads(dst.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if any(str(old.get(k, "")) != str(record.get(k, "")) for k in ("device", "schedule")):
            return row_dir / name.replace(".json", ".gpu.json")
    return dst


def free_name(path: Path) -> Path:
    """``path`` if free, else ``stem_2.suffix``, ``stem_3.suffix``..."""
    n = 2
    out = path
    while out.exists():
        out = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return out


def resume_bytes(files_dir: Path) -> bytes | None:
    """The returned ``resume.tgz`` (reassembled from ``resume.tgz.000``... if split), or None."""
    whole = files_dir / "resume.tgz"
    if whole.is_file():
        return whole.read_bytes()
    parts = sorted(files_dir.glob("resume.tgz.[0-9][0-9][0-9]"))
    return b"".join(p.read_bytes() for p in parts) if parts else None


def unpack(files_dir: Path, repo: Path, allow_smoke: bool = False) -> dict:
    """Places the records (see the module docstring); returns the kit's ``status.json``."""
    tgz = files_dir / "records.tgz"
    if not tgz.is_file():
        raise SystemExit(f"{files_dir}: no records.tgz (only the kit's last call of a window returns one)")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        rec = Path(tmp) / "records"
        status = json.loads((rec / "status.json").read_text())
        if status.get("mode") == "smoke" and not allow_smoke:
            raise SystemExit("these are smoke records (the CPU rehearsal): unpack them into a scratch copy "
                             "of the repository only, with --repo DIR --allow-smoke")
        placed = []
        for d in sorted((rec / "pretrained_records").glob("*")) if (rec / "pretrained_records").is_dir() else []:
            dst = repo / "experiments" / "pretrained_records" / d.name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(d, dst)
            placed.append(str(dst.relative_to(repo)))
        for f in sorted((rec / "results").glob("*/*.json")) if (rec / "results").is_dir() else []:
            record = json.loads(f.read_text())
            folder = "results-tiny" if status.get("mode") == "smoke" else "results"  # as run.py --tiny
            dst = record_destination(repo / "experiments" / folder / f.parent.name, f.name, record)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            placed.append(str(dst.relative_to(repo)))
        for f in sorted((rec / "bench").glob("*.md")):
            dst = repo / "experiments" / "bench" / "records" / f.name
            if dst.is_file() and dst.read_bytes() == f.read_bytes():
                continue
            dst = free_name(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            placed.append(str(dst.relative_to(repo)))
        stamp = f"{status['stage_id']}_{status.get('ended', 'unfinished').replace(':', '')}"
        logs = repo / "experiments" / "gpu" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rec / "kit.log", logs / f"{stamp}.log")
        shutil.copyfile(rec / "status.json", logs / f"{stamp}.json")
        placed += [str((logs / f"{stamp}.log").relative_to(repo)), str((logs / f"{stamp}.json").relative_to(repo))]
        tables = (rec / "tables.md").read_text() if (rec / "tables.md").is_file() else ""
    resume = resume_bytes(files_dir)
    dst = repo / ".stage" / "resume" / "resume.tgz"
    if resume is not None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(resume)
        placed.append(f"{dst.relative_to(repo)} ({len(resume) / (1 << 20):.1f} MiB, sent with the next window's calls)")
    elif dst.is_file():
        dst.unlink()
    status["placed"] = placed
    status["tables"] = tables
    return status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files_dir", type=Path)
    p.add_argument("--repo", type=Path, default=REPO)
    p.add_argument("--allow-smoke", action="store_true", help="accept smoke records (into a scratch --repo)")
    a = p.parse_args(argv)
    status = unpack(a.files_dir, a.repo, a.allow_smoke)
    print("placed:\n  " + "\n  ".join(status["placed"]))
    print(f"\nkit: {status['mode']} mode, {status.get('device')}, wall {status.get('wall_s')} s of {status.get('budget_s')} s")
    for b in status.get("bench", []):
        print(f"  bench {' '.join(b['cmd'][-6:])}: {b['status']}")
    for j in status.get("jobs", []):
        between = j.get("median_between_epochs_s")
        print(f"  {j['name']}: {j['status']}" + (f", epochs {j['epochs']}, median epoch {j.get('median_epoch_s')} s"
                                                 if "epochs" in j else "")
              + (f", {between} s between epochs" if between is not None else ""))
    if status.get("resume", {}).get("checkpoints_left_out"):
        print("  checkpoints left out (those runs restart): " + ", ".join(status["resume"]["checkpoints_left_out"]))
    print("\n" + status["tables"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
