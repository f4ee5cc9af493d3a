"""Writing a run's files when the disk may fill: a failed write never replaces a good file and
always names its path.

`write_text_atomic` writes a small file (``config.json``, ``result.json``) to a temporary
sibling and renames it into place; `append_text` appends a line (``metrics.jsonl``);
`write_failure` recognises a failed write in any exception (an ``OSError`` with one of
`WRITE_ERRNOS`, or the text of a TensorStore write error that Orbax raises from its
background save) and returns it as a `WriteFailed` naming the path; `naming_writes` turns a
failed write inside its block into that `WriteFailed`, naming a given path when the error
names none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

# a full disk, an exceeded quota, a file over the size limit, a failing or read-only disk
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})

_TS_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_TS_PATH = re.compile(r'(?:Failed writing: |local file )"([^"]+)"')


class WriteFailed(OSError):
    """A file could not be written (disk full, quota exceeded, read-only or failing disk):
    ``errno``, ``strerror`` and ``filename`` (the path, or the directory being written)."""


def write_failure(e: BaseException, where: str | os.PathLike | None = None) -> WriteFailed | None:
    """``e`` as a `WriteFailed` when it, or an exception it was raised from or while handling
    (not hidden by ``from None``), is a failed write (`WRITE_ERRNOS`); None otherwise. The path is the one the error names
    (``OSError.filename``, or the deepest path in a TensorStore message), else ``where``."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, WriteFailed) and e.filename is not None:
            return e
        code, path = None, None
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            code, path = e.errno, e.filename
        else:
            m = _TS_ERRNO.search(str(e))
            if m and int(m.group(1)) in WRITE_ERRNOS:
                code = int(m.group(1))
                paths = _TS_PATH.findall(str(e))
                path = paths[-1] if paths else None
        if code is not None:
            path = path if path is not None else where
            return WriteFailed(code, os.strerror(code), *(() if path is None else (str(path),)))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return None


@contextlib.contextmanager
def naming_writes(where: str | os.PathLike) -> Iterator[None]:
    """Re-raises a failed write (`write_failure`) inside the block as `WriteFailed`, naming
    ``where`` when the error names no path; other exceptions pass unchanged."""
    try:
        yield
    except Exception as e:
        failed = write_failure(e, where)
        if failed is None or failed is e:
            raise
        raise failed from e


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling renamed into place: a failure
    (a full disk) leaves the previous file as it was and no temporary behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with naming_writes(path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to ``path``; a failed write raises `WriteFailed` naming ``path``."""
    with naming_writes(path), open(path, "a") as f:
        f.write(text)


__all__ = ["WRITE_ERRNOS", "WriteFailed", "write_failure", "naming_writes", "write_text_atomic",
           "append_text"]
