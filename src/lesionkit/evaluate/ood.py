"""Out-of-distribution warnings: how far an image lies from the validation images, by two measures, either of
which flags it.

- **Features**: the Mahalanobis distance (Lee et al. 2018) of the L2-normalised pooled pre-logit features to the
  nearest class mean, under one covariance shared by the classes (Ledoit-Wolf shrinkage: 1,280 dimensions from
  about 2,000 validation images). It tells photos, noise and blank images from lesions.
- **Colour**: the Mahalanobis distance of twelve colour moments of the network's input (each channel's mean and
  standard deviation over the whole frame and over its central half) to the nearest class mean, likewise. It
  catches what looks like a lesion to the network but not to a dermatologist's camera: a fundus photograph, a
  colour chart.
  Moments of colour barely move with resolution or JPEG quality, where the network's features do.

Each score is divided by its threshold, the 98.75th percentile of its *cross-fitted* validation scores (each
fold of whole lesions scored by a Gaussian fitted on the other folds): an image scoring above 1 is flagged, and
the two together flag about 2.5% of validation images. Cross-fitting matters: 1,280-dimensional distances of the
images a Gaussian was fitted on come out several times smaller than a new lesion's. ``docs/ood.md`` gives the
measurements behind these choices.

Written by hand in NumPy (pytorch-ood is not installed, and it is the few lines below), so that ``predict
--backend onnx`` scores the export's ``features`` output without torch. The shared precision is stored as the
lower triangle of its Cholesky factor in float16: 1.6 MB for 1,280 dimensions.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lesionkit import LesionkitError

PERCENTILE = 98.75  # of each score: the two flag about 2.5% of validation images, and few more new lesions
FOLDS = 5
COLOUR_MOMENTS = 12  # appended to the pooled features by ood_inputs()


def colour_moments(batch: np.ndarray) -> np.ndarray:
    """``(n, 12)``: each channel's mean and standard deviation over the whole ``(n, 3, h, w)`` network input and
    over its central half (the lesion's usual place)."""
    batch = np.asarray(batch, dtype=np.float64)
    h, w = batch.shape[-2:]
    centre = batch[..., h // 4: h - h // 4, w // 4: w - w // 4]
    return np.concatenate([part.mean(axis=(2, 3)) for part in (batch, centre)]
                          + [part.std(axis=(2, 3)) for part in (batch, centre)], axis=1)


def ood_inputs(features: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """What the detector reads of a batch: its pooled features followed by its colour moments."""
    return np.concatenate([np.asarray(features, dtype=np.float64), colour_moments(batch)], axis=1)


def normalised(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length, in float64 (an all-zero row stays zero)."""
    features = np.asarray(features, dtype=np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def _pack(array: np.ndarray, dtype: str = "float32") -> dict:
    array = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": dtype, "shape": list(array.shape), "base64": base64.b64encode(array.tobytes()).decode()}


def _unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed["base64"]), dtype=packed["dtype"]).reshape(packed["shape"])


@dataclass(frozen=True)
class Gaussian:
    """Class means and one shared precision ``whitening @ whitening.T`` (``whitening`` lower-triangular)."""

    means: np.ndarray
    whitening: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, n_classes: int) -> Gaussian:
        """Fitted on the rows of ``x``; a class without rows takes the overall mean."""
        from sklearn.covariance import LedoitWolf  # fitting only: predict scores without scikit-learn

        means = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else x.mean(axis=0)
                          for c in range(n_classes)])
        covariance = LedoitWolf().fit(x - means[labels]).covariance_
        return cls(means, np.linalg.cholesky(np.linalg.inv(covariance)))

    @cached_property
    def _whitened(self) -> tuple[np.ndarray, np.ndarray]:  # once, not at every batch scored
        whitening = np.asarray(self.whitening, dtype=np.float64)
        return whitening, np.asarray(self.means, dtype=np.float64) @ whitening

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``x`` to the nearest mean."""
        whitening, centres = self._whitened
        z = np.asarray(x, dtype=np.float64) @ whitening
        return ((z[:, None, :] - centres[None]) ** 2).sum(axis=-1).min(axis=1)

    def to_entry(self) -> dict:
        rows, columns = np.tril_indices(len(self.whitening))
        return {"means": _pack(self.means), "whitening_lower": _pack(self.whitening[rows, columns], "float16"),
                "dimensions": len(self.whitening)}

    @classmethod
    def from_entry(cls, entry: dict) -> Gaussian:
        whitening = np.zeros((entry["dimensions"],) * 2, dtype=np.float32)
        whitening[np.tril_indices(entry["dimensions"])] = _unpack(entry["whitening_lower"])
        return cls(_unpack(entry["means"]), whitening)


@dataclass(frozen=True)
class OodDetector:
    """The two fitted distances and their thresholds. :meth:`scores` are in units of the thresholds: an image
    scoring above :attr:`threshold` (1) is flagged."""

    features: Gaussian
    """Over the L2-normalised pooled features, one mean per class."""
    colour: Gaussian
    """Over the colour moments, one mean per class (a red vascular lesion is not an odd colour for its class)."""
    thresholds: tuple[float, float]
    details: dict = field(default_factory=dict)
    """How it was fitted: percentile, folds, validation images and the share of them flagged."""

    threshold = 1.0

    def parts(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each distance of the rows of ``inputs`` (:func:`ood_inputs`) over its threshold."""
        inputs = np.asarray(inputs, dtype=np.float64)
        return (self.features.distances(normalised(inputs[:, :-COLOUR_MOMENTS])) / self.thresholds[0],
                self.colour.distances(inputs[:, -COLOUR_MOMENTS:]) / self.thresholds[1])

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        return np.maximum(*self.parts(inputs))

    def to_entry(self) -> dict:
        return {"method": "mahalanobis", "score": "the larger of the two distances over their thresholds",
                **self.details, "features": {"of": "L2-normalised pooled pre-logits", "threshold": self.thresholds[0],
                                             **self.features.to_entry()},
                "colour": {"of": "colour moments of the input", "threshold": self.thresholds[1],
                           **self.colour.to_entry()}}

    @classmethod
    def from_entry(cls, entry: dict) -> OodDetector:
        details = {k: v for k, v in entry.items() if k not in ("method", "score", "features", "colour")}
        return cls(Gaussian.from_entry(entry["features"]), Gaussian.from_entry(entry["colour"]),
                   (float(entry["features"]["threshold"]), float(entry["colour"]["threshold"])), details)


def _fit_both(inputs: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[Gaussian, Gaussian]:
    return (Gaussian.fit(normalised(inputs[:, :-COLOUR_MOMENTS]), labels, n_classes),
            Gaussian.fit(inputs[:, -COLOUR_MOMENTS:], labels, n_classes))


def fit_ood(inputs: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_classes: int,
            percentile: float = PERCENTILE, folds: int = FOLDS) -> OodDetector:
    """The Gaussians of all ``inputs`` (:func:`ood_inputs` of the validation images), each with the
    ``percentile`` of its cross-fitted scores as threshold: each fold of whole ``groups`` (lesions) scored by the
    other folds' fit."""
    from sklearn.model_selection import GroupKFold

    inputs = np.asarray(inputs, dtype=np.float64)
    folds = min(folds, len(np.unique(groups)))
    if folds < 2:
        raise LesionkitError("fitting the out-of-distribution threshold needs validation images of at least two "
                             "lesions; give the run a larger validation part (split.val_fraction)")
    held_out = np.empty((2, len(labels)))
    for fit_rows, score_rows in GroupKFold(folds).split(inputs, labels, groups):
        fitted = OodDetector(*_fit_both(inputs[fit_rows], labels[fit_rows], n_classes), (1.0, 1.0))
        held_out[:, score_rows] = fitted.parts(inputs[score_rows])
    thresholds = tuple(float(np.percentile(scores, percentile)) for scores in held_out)
    stored = OodDetector.from_entry(  # as served: the precision in float16
        OodDetector(*_fit_both(inputs, labels, n_classes), thresholds).to_entry())
    flagged = (held_out[0] > thresholds[0]) | (held_out[1] > thresholds[1])
    return OodDetector(stored.features, stored.colour, thresholds, {
        "percentile": percentile, "folds": folds, "images": len(labels), "validation_flagged": float(flagged.mean())})


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score ``-logsumexp(logits)`` (higher: less familiar), kept to compare against
    (``docs/ood.md``)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
