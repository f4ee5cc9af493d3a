"""jaxprune.download against a local HTTP server (127.0.0.1, Range support, faults on demand)
serving small generated archives in the official CIFAR python-pickle format: the data on disk
equals the images that were packed, a corrupt archive leaves nothing behind, a cut connection
is resumed with a Range request."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest

from jaxprune import cli, data, download


# --------------------------------------------------------------------------------------------
# Generated archives in the official format
# --------------------------------------------------------------------------------------------


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes, extra: dict) -> bytes:
    """One pickled batch as in the official archives: ``data`` rows are the R, G, B planes of a
    32x32 image, each row-major (3072 bytes); labels a list of ints."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3 * 32 * 32)
    d = {b"batch_label": b"generated", label_key: [int(v) for v in labels], b"data": rows,
         b"filenames": [f"img_{i}.png".encode() for i in range(len(images))], **extra}
    return pickle.dumps(d, protocol=2)


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def make_archive(name: str, per_batch: int, seed: int = 0):
    """``(archive bytes, x_train, y_train, x_test, y_test, class names)``; images NHWC."""
    rng = np.random.default_rng(seed)
    spec = download.CIFAR_ARCHIVES[name]
    n = spec.num_classes
    names = [f"class_{i}" for i in range(n)]
    members, xs, ys = {}, [], []
    for k, batch in enumerate(spec.train):
        x = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        y = (np.arange(per_batch) + k * per_batch) % n
        extra = {b"coarse_labels": [0] * per_batch} if name == "cifar100" else {}
        members[f"{spec.folder}/{batch}"] = _batch(x, y, spec.label_key.encode(), extra)
        xs.append(x)
        ys.append(y)
    x_te = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
    y_te = rng.permutation(per_batch) % n
    members[f"{spec.folder}/{spec.test}"] = _batch(x_te, y_te, spec.label_key.encode(), {})
    meta = {spec.names_key.encode(): [c.encode() for c in names], b"num_vis": 3072}
    members[f"{spec.folder}/{spec.meta}"] = pickle.dumps(meta, protocol=2)
    return _tar(members), np.concatenate(xs), np.concatenate(ys), x_te, y_te, names


@pytest.fixture(scope="module")
def c10():
    return make_archive("cifar10", per_batch=4)


# --------------------------------------------------------------------------------------------
# A local server: /good/<file>, /bad/<file> (one byte flipped), /cut/<file> (the first request
# without Range gets half the body, then the connection drops)
# --------------------------------------------------------------------------------------------


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_done: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path.startswith("/cut/") and self.path not in server.cut_done:
                    server.cut_done.add(self.path)
                    self.wfile.write(body[start: start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, name: str, archive: bytes) -> str:
        fname = download.CIFAR_ARCHIVES[name].filename
        bad = bytearray(archive)
        bad[len(bad) // 2] ^= 0xFF
        self.files.update({f"/good/{fname}": archive, f"/cut/{fname}": archive,
                           f"/bad/{fname}": bytes(bad)})
        return hashlib.md5(archive).hexdigest()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _assert_dataset_equals(folder, name, x_tr, y_tr, x_te, y_te, names):
    d = data.load_cifar(name, data_dir=folder)  # verifies the SHA256SUMS written
    np.testing.assert_array_equal(d.x_train, x_tr)
    np.testing.assert_array_equal(d.y_train, y_tr)
    np.testing.assert_array_equal(d.x_test, x_te)
    np.testing.assert_array_equal(d.y_test, y_te)
    assert (folder / name / "classes.txt").read_text().split() == names
    # The layout of the shared offline copy: shards, test, classes, checksums, README; nothing else.
    assert sorted(p.name for p in (folder / name).iterdir()) == [
        "README.md", "SHA256SUMS", "classes.txt", "test.npz", "train_0.npz"]
    assert sorted(data._read_sha256sums(folder / name)) == ["test.npz", "train_0.npz"]
    with np.load(folder / name / "train_0.npz") as z:
        assert z["x"].dtype == np.uint8 and z["y"].dtype == np.uint8


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_download_good_archive_gives_the_packed_images(server, c10, tmp_path):
    archive, *arrays = c10
    md5 = server.serve("cifar10", archive)
    out = download.prepare_cifar("cifar10", tmp_path, base_url=server.url + "/good", md5=md5,
                                 progress=False, log=lambda s: None)
    assert out == tmp_path / "cifar10"
    _assert_dataset_equals(tmp_path, "cifar10", *arrays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10"]  # archive and temp dirs gone
    # A second call finds the copy and downloads nothing.
    n = len(server.requests)
    download.prepare_cifar("cifar10", tmp_path, base_url=server.url + "/good", md5=md5,
                           progress=False, log=lambda s: None)
    assert len(server.requests) == n


def test_cifar100_archive_uses_fine_labels(server, tmp_path):
    archive, *arrays = make_archive("cifar100", per_batch=120, seed=1)
    md5 = server.serve("cifar100", archive)
    download.prepare_cifar("cifar100", tmp_path, base_url=server.url + "/good/", md5=md5,
                           progress=False, log=lambda s: None)
    _assert_dataset_equals(tmp_path, "cifar100", *arrays)


def test_bad_checksum_is_one_line_and_leaves_nothing(server, c10, tmp_path):
    md5 = server.serve("cifar10", c10[0])
    with pytest.raises(download.DownloadError) as e:
        download.prepare_cifar("cifar10", tmp_path, base_url=server.url + "/bad", md5=md5,
                               progress=False, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "MD5" in msg and md5 in msg
    assert not (tmp_path / "cifar10").exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []  # the corrupt download was deleted too


def test_cut_download_resumes_with_range(server, c10, tmp_path):
    archive, *arrays = c10
    md5 = server.serve("cifar10", archive)
    server.cut_done.clear()
    kw = dict(base_url=server.url + "/cut", md5=md5, progress=False, log=lambda s: None, retries=0)
    with pytest.raises(download.DownloadError, match="connection lost.*run again to resume") as e:
        download.prepare_cifar("cifar10", tmp_path, **kw)
    assert "\n" not in str(e.value)
    part = tmp_path / "downloads" / "cifar-10-python.tar.gz.part"
    half = len(archive) // 2
    assert part.stat().st_size == half and not (tmp_path / "cifar10").exists()
    first = len(server.requests)
    download.prepare_cifar("cifar10", tmp_path, **kw)
    assert server.requests[first:] == [("/cut/cifar-10-python.tar.gz", f"bytes={half}-")]
    _assert_dataset_equals(tmp_path, "cifar10", *arrays)


def test_lost_connection_is_retried_within_one_call(server, c10, tmp_path):
    archive = c10[0]
    md5 = server.serve("cifar10", archive)
    server.cut_done.clear()
    dest = download.download_file(server.url + "/cut/cifar-10-python.tar.gz", tmp_path / "a.tgz",
                                  md5, retries=1, progress=False)
    assert dest.read_bytes() == archive
    assert server.requests[-2:] == [("/cut/cifar-10-python.tar.gz", None),
                                    ("/cut/cifar-10-python.tar.gz", f"bytes={len(archive) // 2}-")]
    assert not (tmp_path / "a.tgz.part").exists()


def test_cli_downloads_from_the_url_in_the_environment(server, c10, tmp_path, monkeypatch, capsys):
    archive, *arrays = c10
    md5 = server.serve("cifar10", archive)
    spec = download.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(download.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(spec, md5=md5))
    monkeypatch.setenv(download.ENV_CIFAR_URL, server.url + "/good")
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))  # the default data dir
    assert cli.main(["data", "cifar10"]) == 0
    assert f"{server.url}/good/cifar-10-python.tar.gz" in capsys.readouterr().out
    _assert_dataset_equals(tmp_path, "cifar10", *arrays)
    # load_cifar finds it through the same variable, with no data_dir.
    np.testing.assert_array_equal(data.load_cifar("cifar10").x_test, arrays[2])


def test_cli_from_archive_and_wrong_archive(c10, tmp_path, monkeypatch, capsys):
    archive, *arrays = c10
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    # The published MD5 is required: a generated archive is refused in one line, nothing written.
    assert cli.main(["data", "cifar10", "--from", str(path), "--dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "c58f30108f718f92721af3b95e74349a" in err
    assert not (tmp_path / "d" / "cifar10").exists()
    spec = download.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(download.CIFAR_ARCHIVES, "cifar10",
                        dataclasses.replace(spec, md5=hashlib.md5(archive).hexdigest()))
    assert cli.main(["data", "cifar10", "--from", str(path), "--dir", str(tmp_path / "d")]) == 0
    _assert_dataset_equals(tmp_path / "d", "cifar10", *arrays)
    assert path.is_file()  # the user's archive is kept


def test_archive_cannot_run_code_through_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    spec = download.CIFAR_ARCHIVES["cifar10"]
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(_tar({f"{spec.folder}/{b}": pickle.dumps(Evil(), protocol=2)
                           for b in (*spec.train, spec.test, spec.meta)}))
    with pytest.raises(pickle.UnpicklingError, match="unexpected object"):
        download.read_cifar_archive(path, "cifar10")


def test_default_data_dir_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert download.default_data_dir() == tmp_path / "cache" / "jaxprune"
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "mine"))
    assert download.default_data_dir() == tmp_path / "mine"


def test_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(download.DownloadError, match="cannot connect") as e:
        download.download_file("http://127.0.0.1:9/x.tar.gz", tmp_path / "x", None, retries=0)
    assert "\n" not in str(e.value)
