"""A failed write (a full disk) is recognised wherever it comes from, names its path, and never
replaces a good file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from jaxprune import files

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# the text of a failed TensorStore write, as Orbax raises it from a background save on a full disk
TENSORSTORE = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.trace.conv1.kernel/0.0.0.0" in OCDBT '
               'database at local file "/runs/a/checkpoints/4.orbax-checkpoint-tmp/state/ocdbt.process_0/": '
               'Failed writing: "/runs/a/checkpoints/4.orbax-checkpoint-tmp/state/ocdbt.process_0/d/12dd": '
               "Failed to write 8598 bytes to file 8: No space left on device [os_error_code='28']")


def test_write_failure_recognises_a_full_disk_and_names_the_path():
    named = files.write_failure(OSError(errno.ENOSPC, "No space left on device", "/runs/a/x.json"))
    assert (named.errno, named.filename) == (errno.ENOSPC, "/runs/a/x.json")
    assert files.write_failure(ENOSPC).filename is None
    assert files.write_failure(ENOSPC, where="/runs/a/metrics.jsonl").filename == "/runs/a/metrics.jsonl"
    ts = files.write_failure(ValueError(TENSORSTORE), where="/runs/a/checkpoints")
    assert (ts.errno, ts.strerror) == (errno.ENOSPC, "No space left on device")
    assert ts.filename == "/runs/a/checkpoints/4.orbax-checkpoint-tmp/state/ocdbt.process_0/d/12dd"
    quota = files.write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), where="d")
    assert (quota.errno, quota.filename) == (errno.EDQUOT, "d")
    for chain in ("from", "while handling", "from None"):
        try:
            try:
                raise ENOSPC
            except OSError as inner:
                if chain == "from":
                    raise RuntimeError("the save failed") from inner
                if chain == "while handling":
                    raise RuntimeError("the save failed")  # noqa: B904
                raise RuntimeError("the save failed") from None
        except RuntimeError as e:
            found = files.write_failure(e, where="w")
            assert (found is None) == (chain == "from None"), chain
    for other in (FileNotFoundError(errno.ENOENT, "No such file", "x"), PermissionError(13, "denied"),
                  ValueError("RESOURCE_EXHAUSTED [os_error_code='2']"), ValueError("bad shape")):
        assert files.write_failure(other) is None, other


def test_naming_writes_names_the_given_path_only_when_the_error_names_none():
    with pytest.raises(files.WriteFailed) as info:
        with files.naming_writes("/runs/a/tb"):
            raise ENOSPC
    assert info.value.filename == "/runs/a/tb" and info.value.__cause__ is ENOSPC
    with pytest.raises(files.WriteFailed) as info:
        with files.naming_writes("/runs/a/checkpoints"):
            raise ValueError(TENSORSTORE)
    assert info.value.filename.endswith("/d/12dd")
    with pytest.raises(KeyError):
        with files.naming_writes("x"):
            raise KeyError("not a write")


class _FullDisk:
    """A file object on a disk that fills after ``room`` characters (what it holds is kept)."""

    def __init__(self, path, mode, room):
        self.f, self.room = open(path, mode), room

    def write(self, text):
        self.f.write(text[:self.room])
        if len(text) > self.room:
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_never_replaces_a_good_file(tmp_path, monkeypatch):
    good = tmp_path / "result.json"
    good.write_text('{"accuracy": 0.9}')
    real_write_text = Path.write_text

    def full(self, text, *a, **k):
        real_write_text(self, text[:3])  # a torn temporary
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(files.WriteFailed) as info:
        files.write_text_atomic(good, '{"accuracy": 0.1}')
    monkeypatch.undo()
    assert info.value.filename == str(good) and info.value.errno == errno.ENOSPC
    assert good.read_text() == '{"accuracy": 0.9}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary left
    files.write_text_atomic(good, '{"accuracy": 0.2}')
    assert good.read_text() == '{"accuracy": 0.2}'


def test_append_text_names_its_path_when_the_disk_fills(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    files.append_text(log, "line 1\n")
    monkeypatch.setattr(files, "open", lambda p, m: _FullDisk(p, m, room=3), raising=False)
    with pytest.raises(files.WriteFailed) as info:
        files.append_text(log, "line 2\n")
    assert info.value.filename == str(log) and "No space left" in str(info.value)
    assert log.read_text() == "line 1\nlin"  # what was written stays; a resume rebuilds the log
