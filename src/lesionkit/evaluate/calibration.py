"""Temperature scaling: one number T that divides the logits so that probabilities mean what they say.

Fine-tuned networks are over-confident (Guo et al. 2017); dividing the logits by a T > 1 fitted on the
validation part (never the test part) fixes most of it without changing any prediction, since argmax is
unchanged. T lives beside the checkpoint in its calibration record (:mod:`lesionkit.evaluate.record`), keyed by
checkpoint file name and SHA-256, so that a retrained or resumed ``best.ckpt`` does not inherit a stale T.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from lesionkit import LesionkitError

# T between e^-3 and e^3 (0.05..20): beyond that the model is broken, not miscalibrated.
LOG_T_BOUNDS = (-3.0, 3.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    scaled = torch.from_numpy(logits).double() / temperature
    return float(torch.nn.functional.cross_entropy(scaled, torch.from_numpy(labels)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises validation NLL (a 1-D convex problem in log T: bounded Brent search)."""
    if len(labels) < 2:
        raise LesionkitError("fitting a temperature needs labelled validation images; the part is empty")
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, n_bins: int) -> dict:
    """Top-label confidence and accuracy per equal-width confidence bin (the reliability diagram's bars)."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    # Right-closed bins (0, 1/n], ..., as torchmetrics bins them for its ECE.
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(index, confidence, n_bins) / count
        accuracy = np.bincount(index, correct, n_bins) / count
    # Empty bins have no mean: None in JSON, not NaN (which strict JSON readers refuse).
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in mean_confidence],
            "accuracy": [None if np.isnan(v) else float(v) for v in accuracy]}
