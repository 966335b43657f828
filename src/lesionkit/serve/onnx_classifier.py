"""Serving an export of ``lesionkit export`` with onnxruntime, NumPy and Pillow alone: no torch, timm or
Lightning to import, so ``predict --backend onnx`` answers one image in well under a second from the command
line, where loading PyTorch takes seconds before the first image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.preprocessing import Preprocessing, eval_array

METADATA_KEY = "lesionkit"  # the export's metadata entry: classes, preprocessing, temperature


def onnx_path_for(checkpoint: Path) -> Path:
    """``best.ckpt`` -> ``best.onnx`` beside it; an ``.onnx`` path stays as it is."""
    return checkpoint if checkpoint.suffix == ".onnx" else checkpoint.with_suffix(".onnx")


def views(batch: np.ndarray) -> list[np.ndarray]:
    """The eight flips and 90-degree turns of an ``(n, c, h, w)`` batch in :data:`lesionkit.tta.VIEW_NAMES`
    order (``np.rot90`` turns the way ``torch.rot90`` does)."""
    flipped = batch[..., ::-1]
    return [np.ascontiguousarray(np.rot90(b, k, axes=(-2, -1))) for b in (batch, flipped) for k in range(4)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class OnnxClassifier:
    """An exported network under onnxruntime, with the ``classes``, ``transform``, ``logits()`` and
    ``probabilities()`` of ``lesionkit.inference.Classifier``, on NumPy arrays."""

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LesionkitError("--backend onnx needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise LesionkitError(f"ONNX file {path} does not exist: write it with `lesionkit export --checkpoint C`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            raise LesionkitError(f"cannot load {path} with onnxruntime: {str(err).splitlines()[0]}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if raw is None:
            raise LesionkitError(f"{path} carries no lesionkit metadata: export it with `lesionkit export`")
        self.meta = json.loads(raw)
        self.classes = list(self.meta["classes"])
        self.preprocessing = Preprocessing(**self.meta["preprocessing"])
        self.temperature = float(self.meta.get("temperature", 1.0))

    def transform(self, image: Image.Image) -> np.ndarray:
        return eval_array(image, self.preprocessing)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        return logits

    def probabilities(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        """``(n, classes)`` calibrated probabilities, averaged over the eight views with ``tta``."""
        return np.mean([softmax(self.logits(view) / self.temperature) for view in (views(batch) if tta else [batch])],
                       axis=0)
