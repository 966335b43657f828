"""Load a trained checkpoint safely and turn images into class probabilities."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from lesionkit import LesionkitError
from lesionkit.transforms import Preprocessing, eval_transform


class Classifier:
    """A trained model with what it needs to see images as it did in training."""

    def __init__(self, model: torch.nn.Module, classes: list[str], preprocessing: Preprocessing, meta: dict):
        self.model, self.classes, self.preprocessing, self.meta = model.eval(), classes, preprocessing, meta
        self.transform = eval_transform(preprocessing)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Classifier:
        """Read a lesionkit checkpoint with ``weights_only=True``: tensors and plain values, never code."""
        path = Path(path)
        if not path.is_file():
            raise LesionkitError(f"checkpoint {path} does not exist: check --checkpoint")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle refusals and corrupt files alike
            raise LesionkitError(f"cannot load checkpoint {path} safely: {str(err).splitlines()[0]}") from None
        meta = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not meta or "model_name" not in meta or "state_dict" not in checkpoint:
            raise LesionkitError(f"{path} is not a lesionkit checkpoint (no model name, classes or weights)")
        model = timm.create_model(meta["model_name"], pretrained=False, num_classes=len(meta["classes"]))
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise LesionkitError(f"{path}: weights do not fit {meta['model_name']}: {str(err)[:300]}") from None
        return cls(model.to(device, memory_format=torch.channels_last), list(meta["classes"]), Preprocessing(**meta["preprocessing"]), meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(batch).float().softmax(dim=1).cpu()

    def predict_loader(self, loader: DataLoader) -> torch.Tensor:
        """Probabilities for every image a loader yields, in order."""
        return torch.cat([self.probabilities(images) for images, _ in loader])
