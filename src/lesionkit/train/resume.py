"""Training runs that stop and resume to the same result, through Lightning's own hooks.

- Writing: :class:`AtomicCheckpointIO` serialises in memory, writes a temporary file, fsyncs it and renames it
  over the old checkpoint, so ``kill -9`` or a full disk leaves the previous checkpoint intact; it reads with
  :func:`lesionkit.model.checkpoint.load_checkpoint` (``weights_only=True``), Lightning's resume included.
- Resuming: :class:`EpochSeed` reseeds every generator at each epoch start from (seed, phase, epoch), so a run
  resumed from an epoch-end checkpoint draws the same batches, augmentations and dropout masks as one that
  never stopped.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from lesionkit.model.checkpoint import load_checkpoint
from lesionkit.files import atomic_write


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
            if isinstance(loader.sampler, (RandomSampler, WeightedRandomSampler)):  # data.sampler's draws too
                loader.sampler.generator = torch.Generator().manual_seed(seed)
