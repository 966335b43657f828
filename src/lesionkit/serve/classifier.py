"""The one interface every classifier serves through, and what is computed on top of its logits, in NumPy alone:
test-time views, the temperature softmax and the averaging of views.

A classifier, PyTorch's (:mod:`lesionkit.serve.torch_classifier`) or onnxruntime's
(:mod:`lesionkit.serve.onnx_classifier`), knows its classes, its preprocessing and its fitted temperature; it
frames a Pillow image as the network's input array and gives the logits of a batch. Everything else is here.

Test-time augmentation uses the eight flips and 90-degree rotations of each image: a dermoscopic lesion has no
"up", so all eight symmetries of the square (the dihedral group D4) are equally valid views. A 90-degree turn
makes a 4:3 input 3:4; the network pools globally, so it takes either. TTA is a configuration chosen before
evaluation (``--tta``) and reported as such, never picked on test results; it costs eight forward passes.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
from PIL import Image

from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.evaluate.ood import ood_inputs
from lesionkit.evaluate.record import Calibration

VIEW_NAMES = ("identity", "rot90", "rot180", "rot270", "hflip", "hflip+rot90", "hflip+rot180", "hflip+rot270")


class Classifier(Protocol):
    classes: list[str]
    preprocessing: Preprocessing
    temperature: float
    """Divides the logits before the softmax (fitted on validation; 1 where none was fitted)."""
    meta: dict
    """What the checkpoint or export says of itself: model name, classes, preprocessing, ..."""
    calibration: Calibration
    """Everything fitted on validation (:mod:`lesionkit.evaluate.record`); its parts are None where unfitted."""
    encoding: ClinicalEncoding | None
    """How the model reads clinical metadata (:mod:`lesionkit.data.clinical`); None for an image-only model."""

    def transform(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the network's float32 ``(3, height, width)`` input."""

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        """``(n, classes)`` float32 logits of an ``(n, 3, height, width)`` batch, with its ``(n, width)`` encoded
        metadata where the model reads it (None: every field unknown; an image-only model ignores it)."""

    def features_and_logits(self, batch: np.ndarray, metadata: np.ndarray | None = None
                            ) -> tuple[np.ndarray | None, np.ndarray]:
        """The pooled pre-logit features (None where the export has none) and the logits, in one pass."""

    def head_logits(self, features: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray | None:
        """The logits of pooled ``features`` from :meth:`features_and_logits` (with ``metadata`` as there), from the
        network's head alone; None where the backend cannot run its head without the rest of the network."""


def views(batch: np.ndarray) -> list[np.ndarray]:
    """The eight D4 views of an ``(n, c, h, w)`` batch, identity first, in :data:`VIEW_NAMES` order."""
    flipped = batch[..., ::-1]
    return [np.ascontiguousarray(np.rot90(b, k, axes=(-2, -1))) for b in (batch, flipped) for k in range(4)]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def view_logits(classifier: Classifier, batch: np.ndarray, tta: bool, metadata: np.ndarray | None = None
                ) -> np.ndarray:
    """``(n, views, classes)`` logits: one view without TTA, eight with it (each with the image's metadata)."""
    return np.stack([classifier.logits(view, metadata) for view in (views(batch) if tta else [batch])], axis=1)


class ViewOutputs(NamedTuple):
    logits: np.ndarray
    """``(n, views, classes)``: one view without TTA, eight with it (each with the image's metadata)."""
    ood_inputs: np.ndarray | None
    """What the out-of-distribution detector reads of the plain view (its pooled features and colour moments,
    :func:`lesionkit.evaluate.ood.ood_inputs`); None where an export has no features."""
    unknown_logits: np.ndarray | None = None
    """Like ``logits``, with every metadata field unknown; only where asked for."""


def view_outputs(classifier: Classifier, batch: np.ndarray, tta: bool, metadata: np.ndarray | None = None,
                 unknown_too: bool = False) -> ViewOutputs:
    """The logits of each view and what the out-of-distribution detector reads, from the same passes; with
    ``unknown_too``, the logits with every metadata field unknown as well, from the head alone on the same
    features where the classifier can run it (PyTorch's), from passes of their own otherwise."""
    passes = [classifier.features_and_logits(view, metadata) for view in (views(batch) if tta else [batch])]
    features = passes[0][0]
    logits = np.stack([view_logits for _, view_logits in passes], axis=1)
    unknown = None
    if unknown_too:
        heads = [None if f is None else classifier.head_logits(f) for f, _ in passes]
        if any(head is None for head in heads):
            heads = [classifier.logits(view) for view in (views(batch) if tta else [batch])]
        unknown = np.stack(heads, axis=1)
    return ViewOutputs(logits, None if features is None else ood_inputs(features, batch), unknown)


def average_probabilities(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Each view's softmax at ``temperature`` (1 when None), averaged over the views: ``(n, classes)``."""
    return softmax(logits, temperature or 1.0).mean(axis=1)


def probabilities(classifier: Classifier, batch: np.ndarray, tta: bool = False) -> np.ndarray:
    """``(n, classes)`` calibrated probabilities (the classifier's own temperature), averaged over the views with
    ``tta``."""
    return average_probabilities(view_logits(classifier, batch, tta), classifier.temperature)
