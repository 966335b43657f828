"""The run's own Lightning callbacks: the per-epoch table ``metrics.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from lesionkit.files import atomic_write
from lesionkit.model.module import MONITOR


class EpochTable(Callback):
    """One row per epoch in ``metrics.csv``: phase, losses, validation accuracy and balanced accuracy.

    The rows also travel in every checkpoint (this callback's state, saved after the row is added), and the
    file is rewritten whole from them: a resumed run's table holds each epoch once, however the run stopped.
    """

    FIELDS = ["phase", "epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"]

    def __init__(self, path: Path, rows: list[list] | None = None):
        self.path, self.rows = path, list(rows or [])
        self.write()

    def write(self) -> None:
        if rank_zero_only.rank > 0:  # DDP: the folder is rank 0's
            return

        def dump(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                csv.writer(f).writerows([self.FIELDS, *self.rows])
        atomic_write(self.path, dump)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.write()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = [module.phase.name, trainer.current_epoch, trainer.global_step,
               trainer.optimizers[0].param_groups[0]["lr"], m.get("train/loss_epoch"), m.get("val/loss"),
               m.get("val/accuracy"), m.get(MONITOR)]
        self.rows.append(row)
        self.write()
