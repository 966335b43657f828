"""Prediction sets that keep their promise: split conformal prediction with adaptive prediction sets (APS,
Romano, Sesia and Candes 2020), in NumPy alone, so that ``predict --backend onnx`` builds sets without torch.

The conformity score of a labelled image is the probability mass of the classes ranked *above* its true class
(its calibrated probabilities sorted from the largest; 0 when the top class is the true one). With the ``n``
validation scores stored, the set at coverage ``1 - alpha`` holds every class whose score would be at most q, the
``ceil((n + 1)(1 - alpha))``-th smallest validation score: the classes from the top down to and including the one
whose mass crosses q, so never empty. For a new image exchangeable with the validation images, P(true class in
set) >= 1 - alpha, and below 1 - alpha + 1/(n + 1) when scores do not tie. This is APS without its random
term (Romano et al.'s generalised quantile with U = 0): a little larger sets, no randomness in an answer. Scoring
the mass *including* the true class instead (U = 1) puts every confident right answer's score above q, so those
sets come out empty, and adding the top class back took coverage from 0.90 to 0.98 on a trained Lite1.

MAPIE was considered and not used: its API wants an estimator to fit or wrap, while lesionkit has calibrated
probabilities already, and the method is the dozen lines below.
"""

from __future__ import annotations

import math

import numpy as np

from lesionkit import LesionkitError


def _mass_above(probabilities: np.ndarray) -> np.ndarray:
    """``(n, classes)``: for each class, the mass of the classes ranked above it (ties broken by index)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    ranked = np.take_along_axis(probabilities, order, axis=1)
    above = np.cumsum(ranked, axis=1) - ranked
    above[:, 0] = 0.0  # exactly: the top class of every image ties at 0, on either backend
    mass = np.empty_like(above)
    np.put_along_axis(mass, order, above, axis=1)
    return mass


def aps_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The conformity score of each labelled image: the mass ranked above its true class."""
    return _mass_above(probabilities)[np.arange(len(labels)), labels]


def conformal_threshold(scores: np.ndarray, coverage: float) -> float:
    """q: the ``ceil((n + 1) * coverage)``-th smallest of ``scores``; raises when ``n`` is too small for it."""
    if not 0 < coverage < 1:
        raise LesionkitError(f"coverage {coverage:g} must be between 0 and 1 (exclusive), e.g. 0.9")
    n = len(scores)
    rank = math.ceil((n + 1) * coverage - 1e-9)  # -1e-9: (n + 1) * 0.9 must not round up past an integer
    if rank > n:
        raise LesionkitError(f"coverage {coverage:g} needs at least {math.ceil(coverage / (1 - coverage))} "
                             f"validation scores and there are {n}: ask for at most {n / (n + 1):.4f}")
    return float(np.sort(scores)[rank - 1])


def prediction_sets(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """``(n, classes)`` booleans: the classes whose mass ranked above them is at most ``threshold`` (the top class
    always)."""
    return _mass_above(probabilities) <= threshold


def coverage_report(probabilities: np.ndarray, labels: np.ndarray, scores: np.ndarray, classes: list[str],
                    coverage: float = 0.9) -> dict:
    """Empirical coverage and mean set size of the sets at ``coverage`` on labelled images, overall and per
    class (a class without images has neither)."""
    members = prediction_sets(probabilities, conformal_threshold(scores, coverage))
    covered, size = members[np.arange(len(labels)), labels], members.sum(axis=1)
    per_class = {name: {"images": int((labels == i).sum()),
                        "coverage": float(covered[labels == i].mean()) if (labels == i).any() else None,
                        "mean_set_size": float(size[labels == i].mean()) if (labels == i).any() else None}
                 for i, name in enumerate(classes)}
    return {"method": "APS (split conformal)", "target_coverage": coverage, "calibration_scores": len(scores),
            "coverage": float(covered.mean()), "mean_set_size": float(size.mean()), "per_class": per_class}
