"""The run folder's safety: files replaced whole or not at all, one run per folder, and a record of what
made the run (library versions, git commit, seed, the data's fingerprint) in ``provenance.json``.

A ``kill -9`` or a full disk in the middle of a write must never leave half a file where a good one was:
every file is written to a temporary name in the same folder, flushed to disk, then renamed over the old
one (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from lesionkit import LesionkitError, __version__

LOCK_NAME = ".lock"
PROVENANCE_NAME = "provenance.json"
LIBRARIES = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "numpy", "pandas", "scikit-learn",
             "pillow")
# Errors that mean "the disk said no", as opposed to a bug: they get a message, not a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# mkstemp makes 0600 files; a replaced file should get the permissions a plain open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)


def disk_error(err: OSError, path: Path | str, what: str = "file") -> LesionkitError:
    """A user-facing message for a failed write: what failed, why, and that the old file is untouched."""
    reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return LesionkitError(f"could not write {what} {path}: {reason}. The previous version of it is intact; "
                          f"free some space (or fix the folder) and run again (a training run: with --resume)")


def atomic_write(path: Path, write: Callable[[Path], None], what: str = "file") -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        with tmp.open("rb+") as f:  # fsync: a power cut after the rename must not leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in DISK_ERRNOS:
            raise disk_error(err, path, what) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text), what)


def atomic_write_csv(frame: pd.DataFrame, path: Path, **kwargs) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, **kwargs))


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` while a run writes into ``out``.

    The kernel drops the lock when the process dies, ``kill -9`` included, so a stale lock file never blocks a
    later ``--resume``; a second live run into the same folder is refused instead of interleaving files.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LesionkitError(f"--out {out} is a file, not a folder: choose another --out") from None
    except OSError as err:
        raise disk_error(err, out, "run folder") from None
    path = out / LOCK_NAME
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LesionkitError(
                f"{out} is in use by another lesionkit run ({holder}); wait for it to finish or choose another "
                f"--out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit(where: Path = Path(__file__).parent) -> str | None:
    """The commit of the checkout lesionkit runs from (``+dirty`` with uncommitted edits), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "lesionkit": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_hash(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in 1 MiB chunks (checkpoints are tens of MB)."""
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(metadata_path: Path, frame: pd.DataFrame) -> dict:
    """What identifies the data: the metadata file's md5, and the md5 of every used image's id and size.

    Sizes come from ``stat`` (no reading): 10,015 images take milliseconds, and a replaced image almost
    always changes size.
    """
    listing = "\n".join(f"{i}:{os.stat(p).st_size}" for i, p in sorted(zip(frame["image_id"], frame["path"])))
    return {"metadata": str(metadata_path), "metadata_md5": file_hash(metadata_path),
            "images": len(frame), "lesions": int(frame["lesion_id"].nunique()),
            "images_md5": hashlib.md5(listing.encode()).hexdigest()}


def write_provenance(out: Path, *, seed: int, split_seed: int, data: dict, resume: bool) -> None:
    """Record (or, on resume, extend) ``provenance.json``; warn when the data changed since the run began."""
    path = out / PROVENANCE_NAME
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    session = {"time": now, "command": sys.argv, "git_commit": git_commit(), "versions": library_versions(),
               "host": platform.node()}
    if resume and path.is_file():
        record = json.loads(path.read_text())
        if record.get("data", {}).get("images_md5") != data["images_md5"] or \
                record.get("data", {}).get("metadata_md5") != data["metadata_md5"]:
            print(f"warning: the data differ from when this run began (see {path}); the resumed run is not "
                  f"the run it would have been", file=sys.stderr)
        record.setdefault("resumed", []).append({**session, "data": data})
    else:
        record = {"lesionkit_version": __version__, "seed": seed, "split_seed": split_seed, "data": data, **session}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
