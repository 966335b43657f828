"""An export of ``lesionkit export`` under onnxruntime, framed with NumPy and Pillow alone: no torch, timm or
Lightning to import, so ``predict --backend onnx`` answers before PyTorch would have finished loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.data.preprocessing import Preprocessing, eval_array

METADATA_KEY = "lesionkit"  # the export's metadata entry: classes, preprocessing, temperature


def onnx_path_for(checkpoint: Path) -> Path:
    """``best.ckpt`` -> ``best.onnx`` beside it; an ``.onnx`` path stays as it is."""
    return checkpoint if checkpoint.suffix == ".onnx" else checkpoint.with_suffix(".onnx")


class OnnxClassifier:
    """An exported network under onnxruntime, behind the :class:`lesionkit.serve.classifier.Classifier`
    interface."""

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
