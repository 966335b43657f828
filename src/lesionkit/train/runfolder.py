"""The run folder: one run per folder, a folder checked before a run writes into it, and a record of what made
the run (library versions, git commit, seed, the data's fingerprint, the hardware) in ``provenance.json``.

The hardware is recorded because a recipe's figures can move with the processor alone (PyTorch picks other
vector kernels, which sum in another order); ``lesionkit compare`` reads it to say so."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pandas as pd

from lesionkit import LesionkitError, __version__, some
from lesionkit.files import atomic_write_text, disk_error, file_hash

LOCK_NAME = ".lock"
PROVENANCE_NAME = "provenance.json"
FOLDS_NAME = "folds.json"  # what marks a cross-validation's folder (lesionkit.train.folds)
LIBRARIES = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "numpy", "pandas", "scikit-learn",
             "pillow")


def prepare_out_dir(out: Path, resume: bool, rank: int = 0) -> bool:
    """Check that ``out`` may be written; return True when there is a checkpoint to resume from.

    A run stopped before its first epoch ended has a config but no checkpoint: ``--resume`` starts it over.
    ``rank``: the process's rank under DDP, where Lightning starts ranks 1.. by re-running the command into
    rank 0's folder.
    """
    if rank > 0:
        return resume and (out / "checkpoints" / "last.ckpt").is_file()
    if (out / FOLDS_NAME).is_file():
        raise LesionkitError(f"{out} holds a cross-validation (its {FOLDS_NAME}), not a single run: continue it with "
                             f"`lesionkit train --folds K --out {out} --resume`, or choose another --out")
    if resume:
        if (out / "checkpoints" / "last.ckpt").is_file():
            return True
        if not (out / "config.yaml").is_file():
            raise LesionkitError(f"--resume: {out}/checkpoints/last.ckpt does not exist; nothing to resume")
        print(f"{out} has no checkpoint yet (stopped during its first epoch): starting the run over")
        return False
    if any((out / name).exists() for name in ("config.yaml", "metrics.csv", "checkpoints")):
        raise LesionkitError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    check_free(out, (LOCK_NAME, "split.csv", "skipped.csv"))  # what an attempt stopped before its config leaves
    out.mkdir(parents=True, exist_ok=True)
    return False


def check_free(out: Path, leftovers: tuple[str, ...]) -> None:
    """Refuse an ``--out`` holding files other than ``leftovers``: the run would write its own beside them, and
    over any of the same name."""
    others = sorted(p.name for p in out.iterdir() if p.name not in leftovers) if out.is_dir() else []
    if others:
        raise LesionkitError(f"--out {out} already holds other files ({some(others)}): choose a new or empty folder")


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


def processor() -> str:
    """The processor's name (with its family and model, which tell apart generations sold under one name), its
    core count and the widest vector instructions PyTorch uses on it."""
    import torch

    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def hardware() -> dict:
    """The processor and the GPUs this process sees, as ``provenance.json`` records them."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"processor": processor(), "gpus": gpus}


UNKNOWN_HARDWARE = "unknown"


def describe(record: dict | None) -> str:
    """One line for a :func:`hardware` record: the GPUs where there are any, else the processor."""
    if not record:
        return UNKNOWN_HARDWARE
    gpus = record.get("gpus") or []
    if gpus:
        return ", ".join(f"{gpus.count(g)}x {g}" for g in dict.fromkeys(gpus))
    return record.get("processor") or UNKNOWN_HARDWARE


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "lesionkit": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
               "host": platform.node(), "hardware": hardware()}
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
