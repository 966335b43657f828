"""A trained checkpoint under PyTorch, read safely, behind the :class:`lesionkit.serve.classifier.Classifier`
interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.data.transforms import eval_transform
from lesionkit.evaluate.record import Calibration, load_calibration
from lesionkit.model.checkpoint import check_compatible, load_checkpoint
from lesionkit.model.network import attach_metadata, set_pool


class TorchClassifier:
    """A trained network with what it needs to see images as it did in training."""

    def __init__(self, model: torch.nn.Module, preprocessing: Preprocessing, meta: dict,
                 calibration: Calibration = Calibration()):
        self.model, self.preprocessing, self.meta = model.eval(), preprocessing, meta
        self.classes = list(meta["classes"])
        self.encoding = ClinicalEncoding.from_dict(meta["metadata"]) if meta.get("metadata") else None
        self.eval_transform = eval_transform(preprocessing)
        # From temperature.json beside the checkpoint (lesionkit.evaluate.record); T = 1: as trained.
        self.calibration = calibration
        self.temperature, self.temperature_source = calibration.temperature or 1.0, calibration.source

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TorchClassifier:
        """Read a lesionkit checkpoint with ``weights_only=True``: tensors and plain values, never code."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        meta = check_compatible(checkpoint, path)
        try:
            model = set_pool(timm.create_model(meta["model_name"], pretrained=False, num_classes=len(meta["classes"])),
                             meta.get("pool", "avg"))
        except RuntimeError as err:  # "Unknown model": written by a timm that knows more models
            raise LesionkitError(f"{path} holds a {meta['model_name']!r} model, which this timm "
                                 f"{timm.__version__} cannot build: {err}") from None
        if meta.get("metadata"):
            attach_metadata(model, ClinicalEncoding.from_dict(meta["metadata"]))
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise LesionkitError(f"{path}: its weights do not fit the {meta['model_name']} with {len(meta['classes'])} "
                                 f"classes its metadata names (another architecture or class count?): use a checkpoint "
                                 f"as `lesionkit train` wrote it ({str(err)[:300]})") from None
        return cls(model.to(device, memory_format=torch.channels_last), Preprocessing(**meta["preprocessing"]), meta,
                   load_calibration(path))

    def read_metadata_as(self, encoding: ClinicalEncoding) -> None:
        """Take metadata vectors written with ``encoding`` (the same columns as this model's, age perhaps scaled by
        another training part) and answer as this model does to its own: an ensemble's members read one vector."""
        change = self.encoding.age_from(encoding)
        if change is not None:
            self.model.get_classifier().read_age_as(*change)
        self.encoding = encoding

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def transform(self, image: Image.Image) -> np.ndarray:
        return self.eval_transform(image).numpy()

    def _metadata(self, metadata: np.ndarray | None) -> tuple[torch.Tensor] | tuple[()]:
        """The classifier's extra argument: the metadata rows, where the model reads them and they are given."""
        if metadata is None or self.encoding is None:
            return ()
        return (torch.as_tensor(metadata, dtype=torch.float32).to(self.device),)

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor, metadata: np.ndarray | None = None) -> np.ndarray:
        return self.features_and_logits(batch, metadata)[1]

    @torch.inference_mode()
    def features_and_logits(self, batch: np.ndarray | torch.Tensor, metadata: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
        """timm's pooled pre-logit features, and the classifier on them (and on ``metadata``): ``model(batch)``'s
        logits, in one pass."""
        batch = torch.as_tensor(batch).to(self.device).contiguous(memory_format=torch.channels_last)
        features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        logits = self.model.get_classifier()(features, *self._metadata(metadata))
        return features.float().cpu().numpy(), logits.float().cpu().numpy()

    @torch.inference_mode()
    def head_logits(self, features: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        features = torch.as_tensor(features, dtype=torch.float32).to(self.device)
        return self.model.get_classifier()(features, *self._metadata(metadata)).float().cpu().numpy()
