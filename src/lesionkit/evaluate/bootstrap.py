"""95% bootstrap intervals for the headline metrics, resampling whole lesions.

Pictures of one lesion are not independent evidence (HAM10000: 10,015 images of 7,470 lesions, up to 6 of
one lesion), so a resample draws lesions with replacement and takes all their images; where lesion ids are
unknown each image is its own unit. Every resample is a vector of per-image weights (how often its lesion
was drawn), and every metric is computed for all resamples at once from weighted confusion matrices and
weighted ranks, far faster than calling scikit-learn once per resample (docs/speed.md).
tests/evaluate/test_metrics.py checks each resample against scikit-learn's ``sample_weight`` results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lesionkit import LesionkitError

HEADLINE = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "melanoma_sensitivity")


@dataclass(frozen=True)
class BootstrapSettings:
    """How the intervals are drawn; saved in every report so that they can be redrawn exactly."""

    resamples: int = 1000
    """Number of resamples; 1,000 puts the 2.5th percentile between the 25th and 26th value."""
    seed: int = 0
    """Seed of numpy's generator."""
    confidence: float = 0.95

    def __post_init__(self):
        if self.resamples < 10:
            raise LesionkitError(f"--bootstrap {self.resamples}: use at least 10 resamples (1000 is usual), "
                                 f"or 0 to skip the intervals")
        if not 0 < self.confidence < 1:
            raise LesionkitError(f"confidence {self.confidence} must lie between 0 and 1")


def resample_weights(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` weights: how many times each image's group was drawn in each resample."""
    codes, uniques = pd.factorize(pd.Series(groups))
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(len(uniques), np.full(len(uniques), 1 / len(uniques)), size=resamples)
    return drawn[:, codes].astype(np.float64)


def weighted_metrics(labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray, mel: int | None) -> dict:
    """Every headline metric for every row of ``weights``, as scikit-learn computes it with ``sample_weight``."""
    k = probabilities.shape[1]
    predictions = probabilities.argmax(axis=1)
    cells = np.zeros((len(labels), k * k))
    cells[np.arange(len(labels)), labels * k + predictions] = 1
    confusion = (weights @ cells).reshape(-1, k, k)  # (resamples, true, predicted)
    hits = np.diagonal(confusion, axis1=1, axis2=2)
    truth, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
    present = truth > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / truth, np.nan)
        precision = np.where(predicted > 0, hits / predicted, 0.0)  # zero_division=0, as the point estimate
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        out = {"balanced_accuracy": np.nanmean(recall, axis=1),
               "accuracy": hits.sum(axis=1) / truth.sum(axis=1),
               "macro_f1": np.nanmean(np.where(present, f1, np.nan), axis=1),
               "macro_auc": np.nanmean(np.stack([_weighted_auc(labels == c, probabilities[:, c], weights)
                                                 for c in range(k)], axis=1), axis=1)}
    if mel is not None:
        out["melanoma_sensitivity"] = recall[:, mel]
    return out


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per row of ``weights``: P(score_pos > score_neg) + 0.5 P(tie), by weighted ranks."""
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order]
    # Images with equal scores form one tie block: [start, end) in sorted order.
    _, start, size = np.unique(s, return_index=True, return_counts=True)
    block = np.repeat(np.arange(len(start)), size)
    negatives = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * ~pos, axis=1)], axis=1)
    below = negatives[:, start[block][pos]]
    tied = negatives[:, (start + size)[block][pos]] - below
    w_pos = w[:, pos]
    total_pos, total_neg = w_pos.sum(axis=1), negatives[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * (below + 0.5 * tied)).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def intervals(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], groups: np.ndarray,
              settings: BootstrapSettings) -> dict:
    """Percentile intervals of the headline metrics, and how they were drawn."""
    weights = resample_weights(groups, settings.resamples, settings.seed)
    mel = classes.index("mel") if "mel" in classes else None
    values = weighted_metrics(labels, probabilities, weights, mel)
    tail = 100 * (1 - settings.confidence) / 2
    bounds = {}
    for name, draws in values.items():
        finite = draws[np.isfinite(draws)]
        bounds[name] = [float(b) for b in np.percentile(finite, [tail, 100 - tail])] if len(finite) else None
    return {"intervals": bounds,
            "bootstrap": {"resamples": settings.resamples, "seed": settings.seed, "confidence": settings.confidence,
                          "method": "percentile", "units": int(len(pd.unique(groups)))}}
