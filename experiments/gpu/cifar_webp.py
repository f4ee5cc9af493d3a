"""CIFAR shards as lossless WebP mosaics: 56% of the raw pixels, so CIFAR-10 travels in two
device calls instead of three.

A shard's images ``x`` (uint8 ``[N, 32, 32, 3]``) are laid out as one RGB picture of
``rows x cols`` tiles (row-major, ``cols = ceil(sqrt(N))``, unused tiles black) and saved as
lossless WebP (Pillow); the labels travel as ``.npy``. `decode` restores the exact arrays;
`digest` (SHA-256 of shape, dtype and bytes) is what the staging manifest records and the device
checks after decoding.

    python experiments/gpu/cifar_webp.py encode SRC_DIR DST_DIR   # train_*.npz, test.npz -> .webp + .labels.npy
    python experiments/gpu/cifar_webp.py decode SRC_DIR DST_DIR   # back to the .npz layout jaxprune reads
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

TILE = 32


def digest(a: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (C order)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def mosaic(x: np.ndarray) -> np.ndarray:
    """``[N, 32, 32, 3]`` uint8 -> one ``[rows * 32, cols * 32, 3]`` picture, tiles row-major."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (TILE, TILE, 3):
        raise ValueError(f"images of shape {x.shape} and dtype {x.dtype}: expected uint8 [N, 32, 32, 3]")
    n = len(x)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    tiles = np.zeros((rows * cols, TILE, TILE, 3), np.uint8)
    tiles[:n] = x
    return tiles.reshape(rows, cols, TILE, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * TILE, cols * TILE, 3)


def unmosaic(picture: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `mosaic`: the first ``n`` tiles of ``picture``."""
    h, w = picture.shape[:2]
    if h % TILE or w % TILE or (h // TILE) * (w // TILE) < n:
        raise ValueError(f"a {h}x{w} picture cannot hold {n} tiles of {TILE}x{TILE}")
    rows, cols = h // TILE, w // TILE
    tiles = picture.reshape(rows, TILE, cols, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, TILE, TILE, 3)
    return np.ascontiguousarray(tiles[:n])


def encode(x: np.ndarray, method: int = 4) -> bytes:
    """Lossless WebP bytes of `mosaic(x)`."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mosaic(x)).save(buf, "WEBP", lossless=True, quality=100, method=method, exact=True)
    return buf.getvalue()


def decode(data: bytes, n: int) -> np.ndarray:
    """The ``n`` images that `encode` stored in ``data``."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        picture = np.asarray(im.convert("RGB"), np.uint8)
    return unmosaic(picture, n)


def encode_folder(src: Path, dst: Path) -> dict:
    """Encodes every ``*.npz`` shard of ``src`` into ``dst`` (``<shard>.webp``,
    ``<shard>.labels.npy``); returns ``{shard: {"n", "x", "y"}}`` (the digests of the arrays).
    A shard already encoded (both files there and its digests in ``dst/shards.json``) is kept."""
    dst.mkdir(parents=True, exist_ok=True)
    index = dst / "shards.json"
    old = json.loads(index.read_text()) if index.is_file() else {}
    out = {}
    for f in sorted(src.glob("*.npz")):
        name = f.stem
        if name in old and (dst / f"{name}.webp").is_file() and (dst / f"{name}.labels.npy").is_file():
            out[name] = old[name]
            continue
        with np.load(f) as z:
            x, y = z["x"], z["y"]
        (dst / f"{name}.webp").write_bytes(encode(x))
        np.save(dst / f"{name}.labels.npy", y)
        out[name] = {"n": int(len(x)), "x": digest(x), "y": digest(y)}
        index.write_text(json.dumps({**old, **out}, indent=1))
        print(f"encoded {f.name}: {(dst / f'{name}.webp').stat().st_size / x.nbytes:.3f} of its raw pixels", flush=True)
    index.write_text(json.dumps(out, indent=1))
    return out


def decode_shard(webp: Path, shards: dict, dst: Path) -> Path:
    """Decodes ``<shard>.webp`` (+ ``.labels.npy`` beside it) into ``dst/<shard>.npz`` (uncompressed),
    checking both arrays against the digests in ``shards``; ValueError on a mismatch."""
    name = webp.name[: -len(".webp")]
    want = shards[name]
    x = decode(webp.read_bytes(), int(want["n"]))
    y = np.load(webp.with_name(f"{name}.labels.npy"))
    for key, a in (("x", x), ("y", y)):
        if digest(a) != want[key]:
            raise ValueError(f"{webp}: decoded {key} has digest {digest(a)}, the manifest says {want[key]}")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{name}.tmp.npz"
    np.savez(tmp, x=x, y=y)
    tmp.replace(dst / f"{name}.npz")
    return dst / f"{name}.npz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("encode", "decode"))
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    a = p.parse_args(argv)
    if a.action == "encode":
        encode_folder(a.src, a.dst)
    else:
        shards = json.loads((a.src / "shards.json").read_text())
        for f in sorted(a.src.glob("*.webp")):
            print(decode_shard(f, shards, a.dst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
