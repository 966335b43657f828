"""Load a trained checkpoint safely and turn images into class probabilities."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from lesionkit import LesionkitError
from lesionkit.calibration import load_temperature
from lesionkit.checkpoints import check_compatible, load_checkpoint
from lesionkit.preprocessing import Preprocessing
from lesionkit.transforms import eval_transform


class Classifier:
    """A trained model with what it needs to see images as it did in training."""

    def __init__(self, model: torch.nn.Module, classes: list[str], preprocessing: Preprocessing, meta: dict):
        self.model, self.classes, self.preprocessing, self.meta = model.eval(), classes, preprocessing, meta
        self.transform = eval_transform(preprocessing)
        # Set by ``load`` from temperature.json beside the checkpoint (lesionkit.calibration); 1 = as trained.
        self.temperature, self.temperature_source = 1.0, None

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Classifier:
        """Read a lesionkit checkpoint with ``weights_only=True``: tensors and plain values, never code."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        meta = check_compatible(checkpoint, path)
        try:
            model = timm.create_model(meta["model_name"], pretrained=False, num_classes=len(meta["classes"]))
        except RuntimeError as err:  # "Unknown model": written by a timm that knows more models
            raise LesionkitError(f"{path} holds a {meta['model_name']!r} model, which this timm "
                                 f"{timm.__version__} cannot build: {err}") from None
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise LesionkitError(f"{path}: its weights do not fit the {meta['model_name']} with {len(meta['classes'])} "
                                 f"classes its metadata names (another architecture or class count?): "
                                 f"{str(err)[:300]}") from None
        classifier = cls(model.to(device, memory_format=torch.channels_last), list(meta["classes"]),
                         Preprocessing(**meta["preprocessing"]), meta)
        temperature, classifier.temperature_source = load_temperature(path)
        classifier.temperature = temperature or 1.0
        return classifier

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(batch).float().cpu()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax of the logits divided by the checkpoint's fitted temperature (calibrated, same argmax)."""
        return (self.logits(batch) / self.temperature).softmax(dim=1)

    def predict_loader(self, loader: DataLoader) -> torch.Tensor:
        """Probabilities for every image a loader yields, in order."""
        return torch.cat([self.probabilities(images) for images, _ in loader])
