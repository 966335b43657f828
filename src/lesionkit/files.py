"""Files replaced whole or not at all, and their digests.

A ``kill -9`` or a full disk in the middle of a write must never leave half a file where a good one was: every
file is written to a temporary name in the same folder, flushed to disk, then renamed over the old one
(``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lesionkit import LesionkitError

if TYPE_CHECKING:
    import pandas as pd

# Errors that mean "the disk said no", as opposed to a bug: they get a message, not a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def disk_reason(err: OSError) -> str:
    return "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))


def disk_error(err: OSError, path: Path | str, what: str = "file") -> LesionkitError:
    """A user-facing message for a failed write: what failed, why, and that the old file is untouched."""
    return LesionkitError(f"could not write {what} {path}: {disk_reason(err)}. The previous version of it is "
                          f"intact; free some space (or fix the folder) and run again (a training run: with --resume)")


def _temporary_beside(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0666 so that the process's umask applies to it as it
    would to a plain ``open()``."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: Path, write: Callable[[Path], None], what: str = "file") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = None
    try:
        tmp = _temporary_beside(path)
        write(tmp)
        with tmp.open("rb+") as f:  # fsync: a power cut after the rename must not leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if err.errno in DISK_ERRNOS:
            raise disk_error(err, path, what) from None
        raise
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def atomic_write_csv(frame: pd.DataFrame, path: Path, what: str = "file", **kwargs) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, **kwargs), what)


def file_above(path: Path) -> Path | None:
    """The nearest existing folder-to-be above ``path`` when it is a file, so that ``path`` cannot be made; None
    when nothing stands in the way."""
    above = next((p for p in Path(path).parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def file_hash(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (checkpoints are tens of MB)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
