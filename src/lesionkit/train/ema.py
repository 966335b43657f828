"""An exponential moving average of the weights (``train.ema``), through timm's ``ModelEmaV3``: updated after
every optimizer step, and *the* model everywhere a run's weights are judged or kept. Validation (so the choice
of ``best.ckpt``) runs on the averaged weights, and every checkpoint's ``state_dict`` holds them, so the report,
``predict``, ``export`` and ``explain`` use them without knowing. The raw weights, which training goes on
from, travel in the checkpoint's callback state, so that ``--resume`` continues both exactly."""

from __future__ import annotations

import lightning as L
import torch
from timm.utils import ModelEmaV3

PREFIX = "model."  # where LesionClassifier keeps the network in its state_dict


class WeightAverage(L.Callback):
    """One average over every phase of a run (the same callback goes to each phase's trainer)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.average: ModelEmaV3 | None = None
        self.raw: dict[str, torch.Tensor] | None = None  # the raw weights while validation runs on the average
        self.restored: dict | None = None  # what a resumed run's checkpoint held, applied when training starts
        self.steps = 0  # over the whole run: a phase's trainer counts its own steps from 0

    @property
    def state_key(self) -> str:
        return "WeightAverage"

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.average is None:
            # warmup: the early average leans on recent weights, not on the pretrained start.
            self.average = ModelEmaV3(module.model, decay=self.decay, use_warmup=True)
        if self.restored is not None:  # resuming: the checkpoint's state_dict held the average
            self.average.module.load_state_dict(_network(module.state_dict()))
            module.model.load_state_dict(self.restored["raw"])
            self.steps, self.restored = self.restored["steps"], None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        self.average.update(module.model, step=self.steps)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.average is not None and trainer.state.fn == "fit":
            self.raw = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
            module.model.load_state_dict(self.average.module.state_dict())

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.raw is not None:
            module.model.load_state_dict(self.raw)
            self.raw = None

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self.average is None:
            return
        state = checkpoint["state_dict"]
        for name, tensor in self.average.module.state_dict().items():
            state[PREFIX + name] = tensor.detach().clone()

    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        raw = self.raw if self.raw is not None else self._model.state_dict()  # validation swaps them out
        return {"decay": self.decay, "steps": self.steps, "raw": {k: v.detach().clone() for k, v in raw.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state or None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._model = module.model


def _network(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
