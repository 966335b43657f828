"""Every number of an evaluation, from scikit-learn and torchmetrics (nothing hand-rolled here).

Balanced accuracy (mean per-class recall, the ISIC challenge's metric) leads: on HAM10000 always answering
"nv" scores 67% plain accuracy but 14% balanced accuracy. Melanoma is read at fixed operating points too,
because a screening tool is set to a specificity (80%, 90%) and judged by the melanomas it then catches.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn import metrics
from torchmetrics.functional.classification import (
    binary_sensitivity_at_specificity,
    binary_specificity_at_sensitivity,
    multiclass_calibration_error,
    multiclass_specificity,
)

ECE_BINS = 15  # the common choice since Guo et al. 2017 ("On Calibration of Modern Neural Networks")
SPECIFICITIES = (0.80, 0.90)
SENSITIVITIES = (0.90,)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Headline and per-class metrics for integer ``labels`` and an ``(n, classes)`` probability array."""
    predictions = probabilities.argmax(axis=1)
    ids = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0)
    # torch.tensor copies: an array from pandas may be read-only, which torch.from_numpy warns of.
    specificity = multiclass_specificity(torch.tensor(predictions), torch.tensor(labels),
                                         num_classes=len(classes), average=None).numpy()
    per_class = {}
    for i, name in enumerate(classes):
        positives = labels == i
        # AUC and AP need both positives and negatives; a class absent from the data has none.
        ranked = 0 < positives.sum() < len(labels)
        auc = float(metrics.roc_auc_score(positives, probabilities[:, i])) if ranked else None
        ap = float(metrics.average_precision_score(positives, probabilities[:, i])) if ranked else None
        per_class[name] = {"precision": float(precision[i]), "recall": float(recall[i]),
                           "sensitivity": float(recall[i]), "specificity": float(specificity[i]),
                           "f1": float(f1[i]), "auc": auc, "average_precision": ap, "support": int(support[i])}
    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    aps = [c["average_precision"] for c in per_class.values() if c["average_precision"] is not None]
    present = [i for i in ids if support[i] > 0]
    return {
        "n_images": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predictions)),
        # Over the classes present, as scikit-learn's balanced_accuracy_score: a class with no images has no recall.
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(metrics.f1_score(labels, predictions, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(metrics.f1_score(labels, predictions, labels=present, average="weighted",
                                              zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_average_precision": float(np.mean(aps)) if aps else None,
        "melanoma_sensitivity": per_class["mel"]["recall"] if "mel" in per_class else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": list(classes),
                             "matrix": metrics.confusion_matrix(labels, predictions, labels=ids).tolist()},
    }


def operating_points(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                     positive: str = "mel") -> dict | None:
    """Sensitivity at fixed specificities and specificity at fixed sensitivities for one class (one-vs-rest).

    Each value is the best the class's probability reaches with some threshold while the other rate holds
    at least the fixed value; the threshold is reported too, so the operating point can be used.
    """
    pair = _one_vs_rest(labels, probabilities, classes, positive)
    if pair is None:
        return None
    target, scores = pair[0], pair[1].float()
    points = {"class": positive, "sensitivity_at_specificity": {}, "specificity_at_sensitivity": {}}
    for spec in SPECIFICITIES:
        value, threshold = binary_sensitivity_at_specificity(scores, target, min_specificity=spec)
        points["sensitivity_at_specificity"][f"{spec:.2f}"] = {"value": float(value), "threshold": float(threshold)}
    for sens in SENSITIVITIES:
        value, threshold = binary_specificity_at_sensitivity(scores, target, min_sensitivity=sens)
        points["specificity_at_sensitivity"][f"{sens:.2f}"] = {"value": float(value), "threshold": float(threshold)}
    return points


def _one_vs_rest(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], positive: str
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``positive``'s 0/1 targets and its probabilities (float64); None without the class, or without both
    positives and negatives."""
    if positive not in classes:
        return None
    target = torch.from_numpy(labels == classes.index(positive)).long()
    if target.sum() in (0, len(target)):
        return None
    return target, torch.from_numpy(probabilities[:, classes.index(positive)]).double()


def melanoma_referral(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], sensitivity: float,
                      positive: str = "mel") -> dict | None:
    """The highest threshold on p(``positive``) that refers at least ``sensitivity`` of its images (the
    best specificity that sensitivity allows), with the sensitivity and specificity it reaches here; None without
    both positives and negatives. In float64, so that ``p >= threshold`` decides as it did here."""
    pair = _one_vs_rest(labels, probabilities, classes, positive)
    if pair is None:
        return None
    target, scores = pair
    specificity, threshold = binary_specificity_at_sensitivity(scores, target, min_sensitivity=sensitivity)
    referred = scores >= threshold
    return {"class": positive, "sensitivity": sensitivity, "threshold": float(threshold),
            "validation_sensitivity": float(referred[target == 1].double().mean()),
            "validation_specificity": float(specificity)}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: |confidence - accuracy| averaged over equal-width confidence bins, weighted by count."""
    return float(multiclass_calibration_error(torch.from_numpy(probabilities).float(), torch.from_numpy(labels),
                                              num_classes=probabilities.shape[1], n_bins=n_bins, norm="l1"))


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot label (0 best, 2 worst)."""
    ids = list(range(probabilities.shape[1]))
    return float(metrics.brier_score_loss(labels, probabilities, labels=ids, scale_by_half=False))
