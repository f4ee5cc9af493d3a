"""Stages, here, what the GPU kit's device calls carry, and prints the calls.

Builds the git-ignored ``.stage/`` of the repository:

- ``.stage/cache/``: CIFAR-10 as lossless WebP mosaics (`cifar_webp`, 56% of the raw pixels; made
  once), the wheels of what the device image lacks (`WHEELS`, for its Python 3.12 on x86-64
  Linux), the trained ResNet-56 weights;
- ``.stage/p1/``, ``.stage/p2/``...: one folder per device call, each under the 64 MiB that a
  call may carry together with the repository's working tree, holding its share of the above
  plus the previous window's ``resume.tgz`` (put in ``.stage/resume/`` by ``unpack.py``) in
  4 MiB chunks, and ``manifest.json`` (the stage id, every part's files with their SHA-256, the
  CIFAR digests) that the device checks everything against;
- ``.stage/CALLS.md``: the device calls to make back to back (also printed); ``.stage/calls.json``
  the same for scripts (``rehearse.sh``).

    python experiments/gpu/stage.py [--data ../shared/data/cifar10] [--pretrained ../shared/data/pretrained]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar_webp  # noqa: E402

MIB = 1 << 20
CARRY_LIMIT = 64 * MIB  # the working tree plus the carried paths of one call
MARGIN = 1 * MIB  # manifests, files added to the tree after staging
RESUME_CHUNK = 4 * MIB  # small chunks fill the room the data leaves in each call
# Python packages jaxprune needs that the device image lacks (its package list: ml_collections is
# missing; flatbuffers is there; tensorboardX and tensorflow-datasets are optional at run time)
WHEELS = ("ml_collections==1.1.0",)
PRETRAINED = ("resnet56.npz",)  # the rows from a trained model start from ResNet-56
DEVICE_PYTHON = "3.12"  # python3 on the device image (3.12.3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pack_calls(items: Sequence[tuple[str, int]], capacity: int) -> list[list[str]]:
    """First-fit decreasing: the item names grouped into as few calls as the sizes allow, each
    call's sizes adding up to at most ``capacity``; ValueError if one item alone is larger."""
    calls: list[list[str]] = []
    room: list[int] = []
    for name, size in sorted(items, key=lambda it: (-it[1], it[0])):
        if size > capacity:
            raise ValueError(f"{name} is {size / MIB:.1f} MiB, more than the {capacity / MIB:.1f} MiB a call can carry")
        for i, r in enumerate(room):
            if size <= r:
                calls[i].append(name)
                room[i] -= size
                break
        else:
            calls.append([name])
            room.append(capacity - size)
    return calls


def tree_bytes(repo: Path) -> int:
    """Bytes of the working tree that a device call sends: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return sum((repo / f).stat().st_size for f in out.decode().split("\0") if f and (repo / f).is_file())


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_wheels(dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        name, version = spec.split("==")
        if not list(dst.glob(f"{name.replace('-', '_')}-{version}-*.whl")):
            plats = [a for p in PLATFORMS for a in ("--platform", p)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", DEVICE_PYTHON, "--implementation", "cp", *plats,
                            "-d", str(dst), spec], check=True)
    return sorted(dst.glob("*.whl"))


def split_file(path: Path, chunk: int, dst: Path) -> list[Path]:
    """``path`` cut into ``dst/<name>.000``, ``.001``... of at most ``chunk`` bytes."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    parts = []
    with open(path, "rb") as f:
        while data := f.read(chunk):
            part = dst / f"{path.name}.{len(parts):03d}"
            part.write_bytes(data)
            parts.append(part)
    return parts


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def calls_text(parts: list[str], sizes: dict[str, int], tree: int, budget: int) -> str:
    n = len(parts)
    lines = [f"Device calls for this stage ({n}), back to back (the machine stays warm about 30 s after "
             "a call; a fresh machine needs every part again):", ""]
    for i, part in enumerate(parts, 1):
        last = i == n
        cmd = f"TIME_BUDGET={budget} bash experiments/gpu/kit.sh"
        lines.append(f"{i}. run(carry=[\".stage/{part}\"], timeout_s=600, command=\"{cmd}\")")
        lines.append(f"   carries {sizes[part] / MIB:.1f} MiB + the {tree / MIB:.1f} MiB tree; "
                     + ("runs the kit: about TIME_BUDGET seconds plus transfers" if last else
                        "receives and unpacks its part: about 10-20 s plus the transfer"))
    lines += ["", "Every call gets timeout_s=600: whichever call completes the parts (the last, unless one had to be "
              "repeated) runs the kit.", "Then give_back at once (idle time counts). Here: python experiments/gpu/unpack.py FILES_AT "
              "(the folder the last call's files landed in), commit the records, and stage again for the next window."]
    return "\n".join(lines)


def shared_data(name: str) -> Path:
    """``../shared/data/<name>`` of the repository, looked for beside it and beside its parents."""
    for d in REPO.parents:
        if (d / "shared" / "data" / name).is_dir():
            return d / "shared" / "data" / name
    return REPO.parent / "shared" / "data" / name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=shared_data("cifar10"))
    p.add_argument("--pretrained", type=Path, default=shared_data("pretrained"))
    p.add_argument("--budget", type=int, default=540, help="TIME_BUDGET of the kit's call (seconds)")
    a = p.parse_args(argv)
    stage = REPO / ".stage"
    cache = stage / "cache"
    if not (a.data / "test.npz").is_file():
        raise SystemExit(f"--data {a.data}: no test.npz there (the CIFAR-10 .npz shards)")
    t = time.time()
    shards = cifar_webp.encode_folder(a.data, cache / "cifar10")
    print(f"CIFAR-10: {len(shards)} shards encoded ({time.time() - t:.0f} s)")
    wheels = download_wheels(cache / "whl")
    pre = []
    for name in PRETRAINED:
        dst = cache / "pretrained" / name
        if not dst.is_file() or sha256(dst) != sha256(a.pretrained / name):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(a.pretrained / name, dst)
        pre.append(dst)
    resume_tgz = stage / "resume" / "resume.tgz"
    chunks = split_file(resume_tgz, RESUME_CHUNK, cache / "resume") if resume_tgz.is_file() else []
    if not resume_tgz.is_file():
        shutil.rmtree(cache / "resume", ignore_errors=True)

    # items: (name, files relative to cache); a shard's picture and labels travel together
    groups: dict[str, list[str]] = {f"cifar10/{s}": [f"cifar10/{s}.webp", f"cifar10/{s}.labels.npy"] for s in shards}
    groups.update({f"whl/{w.name}": [f"whl/{w.name}"] for w in wheels})
    groups.update({f"pretrained/{f.name}": [f"pretrained/{f.name}"] for f in pre})
    groups.update({f"resume/{c.name}": [f"resume/{c.name}"] for c in chunks})
    sizes = {g: sum((cache / f).stat().st_size for f in files) for g, files in groups.items()}
    tree = tree_bytes(REPO)
    capacity = CARRY_LIMIT - tree - MARGIN
    calls = pack_calls(list(sizes.items()), capacity)

    for old in stage.glob("p*"):
        if old.is_dir() and old.name[1:].isdigit():
            shutil.rmtree(old)
    names = [f"p{i}" for i in range(1, len(calls) + 1)]
    stage_id = time.strftime("%Y%m%dT%H%M%S") + "-" + hashlib.sha256(
        json.dumps(sorted(sizes.items())).encode()).hexdigest()[:8]
    manifest = {
        "stage_id": stage_id,
        "parts": {},
        "cifar10": {"shards": shards, "classes": (a.data / "classes.txt").read_text().split()},
        "pretrained": [f"pretrained/{f.name}" for f in pre],
        "resume": {"chunks": [f"resume/{c.name}" for c in chunks],
                   "sha256": sha256(resume_tgz) if chunks else None},
    }
    part_sizes = {}
    for name, call in zip(names, calls):
        files = [f for g in sorted(call) for f in groups[g]]
        manifest["parts"][name] = {f: {"sha256": sha256(cache / f), "size": (cache / f).stat().st_size} for f in files}
        for f in files:
            _link(cache / f, stage / name / f)
        part_sizes[name] = sum((cache / f).stat().st_size for f in files)
    for name in names:
        (stage / name / "manifest.json").write_text(json.dumps(manifest, indent=1))
    text = calls_text(names, part_sizes, tree, a.budget)
    (stage / "CALLS.md").write_text(text + "\n")
    (stage / "calls.json").write_text(json.dumps(
        [{"carry": [f".stage/{n}"], "timeout_s": 600, "command": f"TIME_BUDGET={a.budget} bash experiments/gpu/kit.sh"}
         for n in names], indent=1))
    for name, call in zip(names, calls):
        print(f"{name}: {', '.join(sorted(call))}")
    print(f"stage {stage_id}: {len(chunks)} resume chunk(s){'' if chunks else ' (no .stage/resume/resume.tgz: runs start fresh)'}\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
