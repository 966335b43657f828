"""Checkpoints written whole or not at all, read without running anyone's code, checked before use, and
resumable to the same result.

- Writing: :class:`AtomicCheckpointIO` serialises in memory, writes a temporary file, fsyncs it and renames it
  over the old checkpoint, so ``kill -9`` or a full disk leaves the previous checkpoint intact.
- Reading: :func:`load_checkpoint` always uses ``torch.load(weights_only=True)`` (tensors and plain values,
  never pickled code), for ``predict``/``evaluate`` and for ``train --resume`` alike.
- Checking: :func:`check_compatible` explains a checkpoint from another model, class list or a newer lesionkit.
- Resuming: :class:`EpochSeed` reseeds every generator at each epoch start from (seed, phase, epoch), so a run
  resumed from an epoch-end checkpoint draws the same batches, augmentations and dropout masks as one that
  never stopped.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, RandomSampler

from lesionkit import LesionkitError, __version__
from lesionkit.runfolder import atomic_write

REQUIRED_META = ("model_name", "classes", "preprocessing")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; refuse pickled objects and damaged files with a message."""
    path = Path(path)
    if not path.is_file():
        raise LesionkitError(f"checkpoint {path} does not exist: check --checkpoint")
    if path.suffix == ".onnx":
        raise LesionkitError(f"{path} is an ONNX export, not a checkpoint: serve it with `lesionkit predict "
                             f"--backend onnx`, or pass the .ckpt it was exported from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise LesionkitError(
                f"cannot load checkpoint {path} safely: it holds pickled Python objects besides tensors and plain "
                f"values, and loading those could run arbitrary code. Refused; use a checkpoint written by "
                f"`lesionkit train`") from None
        raise LesionkitError(f"cannot load checkpoint {path} safely: not a PyTorch checkpoint ({err})") from None
    except Exception as err:  # truncated zip, wrong format, ...: torch raises several types
        raise LesionkitError(f"cannot load checkpoint {path} safely: {str(err).splitlines()[0]}; the file is "
                             f"damaged or not a checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise LesionkitError(f"{path} is not a lesionkit checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def _major(version: str) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_compatible(checkpoint: dict, path: str | Path, model_name: str | None = None,
                     classes: list[str] | None = None) -> dict:
    """Return the checkpoint's metadata after checking it is a lesionkit checkpoint this lesionkit can use.

    Args:
        checkpoint: as returned by :func:`load_checkpoint`.
        path: for messages.
        model_name, classes: what the caller will build; a checkpoint of another model or class list is refused.
    """
    meta = checkpoint.get("hyper_parameters")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META) or "state_dict" not in checkpoint:
        raise LesionkitError(f"{path} is not a lesionkit checkpoint (no model name, classes, preprocessing or "
                             f"weights); use one written by `lesionkit train`")
    written_by = meta.get("lesionkit_version", "unknown")
    theirs, ours = _major(written_by), _major(__version__)
    if theirs is not None and ours is not None and theirs > ours:
        raise LesionkitError(f"{path} was written by lesionkit {written_by}, a newer major version than this "
                             f"lesionkit {__version__}: upgrade lesionkit to read it")
    if model_name is not None and meta["model_name"] != model_name:
        raise LesionkitError(f"{path} holds a {meta['model_name']} model, but the run is configured for "
                             f"{model_name}: resume with the config the checkpoint was trained with")
    if classes is not None and list(meta["classes"]) != list(classes):
        raise LesionkitError(f"{path} predicts {len(meta['classes'])} classes ({', '.join(meta['classes'])}), "
                             f"not the {len(classes)} expected ({', '.join(classes)})")
    return meta


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with a temporary file + ``os.replace`` for saving and ``weights_only`` loading.

    The checkpoint is serialised to memory first (Lightning's own ``_atomic_save`` does the same) so that a full
    disk surfaces as an ``OSError`` from a plain write, turned into a message that says the old file is intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()), "checkpoint")

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path)  # always weights_only=True, whatever the caller asked for


class EpochSeed(L.Callback):
    """Reseed Python, NumPy and torch at every epoch start from ``seed``, the phase index and the epoch.

    With ``data.num_workers=0`` every random draw of an epoch (shuffling, augmentation, dropout) happens after
    this hook, so each epoch depends only on (seed, phase, epoch) and the weights and optimizer state the
    checkpoint restores: a resumed run repeats the interrupted epoch exactly. With worker processes, part of
    the draws happen when the loader starts its workers, before any epoch hook: a resumed run restores weights,
    optimizer, schedule and epoch, but not the very same batches.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        phase = getattr(module, "phase_index", 0)
        # 1,000 epochs per phase before two (phase, epoch) pairs could share a seed.
        seed = self.seed + 1000 * phase + trainer.current_epoch
        L.seed_everything(seed, workers=True, verbose=False)
        # Lightning creates the epoch's loader iterator before this hook on the first epoch of a fit (a resumed
        # one too) and after it on later epochs; creating one draws a worker seed. Drawing it, and the shuffle
        # order, from the loader's own generators keeps the global stream (augmentation, dropout) the same.
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader):
            loader.generator = torch.Generator().manual_seed(seed)
            if isinstance(loader.sampler, RandomSampler):
                loader.sampler.generator = torch.Generator().manual_seed(seed)
