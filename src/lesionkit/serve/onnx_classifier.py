"""An export of ``lesionkit export`` under onnxruntime, framed with NumPy and Pillow alone: no torch, timm or
Lightning to import, so ``predict --backend onnx`` answers before PyTorch would have finished loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.data.preprocessing import Preprocessing, eval_array
from lesionkit.evaluate.record import Calibration, load_calibration
from lesionkit.files import file_hash

METADATA_KEY = "lesionkit"  # the export's metadata entry: classes, preprocessing, the calibration record


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
            # The checkpoint or ensemble manifest this file is exported from, where one lies beside it.
            source = next((str(path.with_suffix(suffix)) for suffix in (".ckpt", ".json")
                           if path.with_suffix(suffix).is_file()), "C")
            raise LesionkitError(f"ONNX file {path} does not exist: write it with `lesionkit export --checkpoint "
                                 f"{source}`")
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
        # Exports before the calibration record carried the temperature alone.
        self.calibration = Calibration.from_entry(self.meta.get("calibration") or (
            {"temperature": self.meta["temperature"]} if self.meta.get("temperature") else None), str(path))
        self.temperature = self.calibration.temperature or 1.0
        # Exports before the out-of-distribution detector have no features output.
        self.has_features = "features" in [output.name for output in self.session.get_outputs()]
        self.encoding = ClinicalEncoding.from_dict(self.meta["metadata"]) if self.meta.get("metadata") else None

    def transform(self, image: Image.Image) -> np.ndarray:
        return eval_array(image, self.preprocessing)

    def _inputs(self, batch: np.ndarray, metadata: np.ndarray | None) -> dict[str, np.ndarray]:
        """The session's inputs: the image batch, and the metadata rows (every field unknown where none are given)
        for an export that reads them."""
        feed = {"image": np.ascontiguousarray(batch, dtype=np.float32)}
        if self.encoding is not None:
            rows = self.encoding.unknown(len(batch)) if metadata is None else metadata
            feed["metadata"] = np.ascontiguousarray(rows, dtype=np.float32)
        return feed

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        (logits,) = self.session.run(["logits"], self._inputs(batch, metadata))
        return logits

    def features_and_logits(self, batch: np.ndarray, metadata: np.ndarray | None = None
                            ) -> tuple[np.ndarray | None, np.ndarray]:
        if not self.has_features:
            return None, self.logits(batch, metadata)
        logits, features = self.session.run(["logits", "features"], self._inputs(batch, metadata))
        return features, logits

    def head_logits(self, features: np.ndarray, metadata: np.ndarray | None = None) -> None:
        return None  # the export is one graph from image to logits


def load_export(named: Path) -> OnnxClassifier:
    """The export that ``--checkpoint named`` stands for (``named`` itself, or the ``.onnx`` beside a checkpoint
    or manifest), refused when what it was written from has changed since (:func:`check_current`)."""
    classifier = OnnxClassifier(onnx_path_for(named))
    check_current(classifier, named)
    return classifier


def check_current(classifier: OnnxClassifier, named: Path) -> None:
    """Refuse an export that what it was written from no longer matches: the checkpoint retrained or replaced, its
    record (temperature.json) fitted again, or the ensemble manifest written again; onnxruntime would serve the
    old model without a word. ``named`` is what the user gave: the checkpoint or manifest, checked against
    itself, or the export, checked against the checkpoint or manifest of its own name beside it. Exports from
    before the checkpoint's hash was recorded are served as they are."""
    export = onnx_path_for(named)
    source = export.with_suffix(".json" if "members" in classifier.meta else ".ckpt") if named == export else named
    if not source.is_file():  # an export moved away from its source answers on its own
        return
    if source.suffix == ".json":
        try:
            written = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LesionkitError(f"{source} is not an ensemble manifest (not JSON: {err})") from None
        if not isinstance(written, dict):
            raise LesionkitError(f"{source} is not an ensemble manifest (a JSON object): write it again with "
                                 f"`lesionkit ensemble` or `lesionkit train --folds K --resume`")
        current = (classifier.meta.get(key) == written.get(key) for key in ("members", "class_weights"))
        changed = None if all(current) else "other members or class weights"
        record = written.get("calibration") if isinstance(written.get("calibration"), dict) else None
    else:
        recorded = classifier.meta.get("checkpoint_sha256")
        if not recorded:
            return
        digest = file_hash(source, "sha256")
        changed = None if recorded == digest else "retrained or replaced"
        record = None if changed else load_calibration(source, digest).to_entry()
    if changed is None and _entry(record) != _entry(classifier.meta.get("calibration")):
        changed = "its record fitted again since"
    if changed:
        raise LesionkitError(f"{export} was exported from another {source.name} than {source} holds now ({changed}): "
                             f"export it again with `lesionkit export --checkpoint {source}`")


def _entry(record: dict | None) -> dict:
    """A record entry as an export carries it, to compare with one read from its source."""
    return Calibration.from_entry(record).to_entry()
