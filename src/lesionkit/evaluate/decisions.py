"""The calibration record fitted from one validation pass, and how its decisions fare on any labelled set.

:func:`fit_and_save_calibration` is the one place the record is fitted, from the plain view's logits and pooled
features of the validation images: training calls it (through ``evaluate_frame(..., fit_temperature_here=True)``
at the end of the run), and so does ``lesionkit evaluate --split val --fit-temperature``, which upgrades a run
fitted before the record had its other parts. :func:`decision_sections` reports, on the images evaluated, the
coverage and size of the prediction sets, the share flagged as out of distribution and the referral's
sensitivity and specificity.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from lesionkit import LesionkitError
from lesionkit.evaluate.calibration import fit_temperature, nll
from lesionkit.evaluate.conformal import aps_scores, coverage_report
from lesionkit.evaluate.metrics import melanoma_referral
from lesionkit.evaluate.ood import fit_ood
from lesionkit.evaluate.record import Calibration, save_calibration
from lesionkit.serve.classifier import softmax

REFERRAL_SENSITIVITY = 0.90  # of validation melanomas referred, unless `evaluate --melanoma-sensitivity` says
REPORTED_COVERAGE = 0.90
MELANOMA_WEIGHTS = np.exp(np.arange(0, 3.001, 0.01))  # weights on p(mel) tried: log-weights 0 to 3 by 0.01


def fit_and_save_calibration(checkpoint: Path, logits: np.ndarray, features: np.ndarray, labels: np.ndarray,
                             groups: np.ndarray, classes: list[str], title: str,
                             sensitivity: float = REFERRAL_SENSITIVITY) -> Calibration:
    """Fit every part of the record on the plain view (none may depend on --tta) and save it beside
    ``checkpoint``: the temperature, then on the calibrated probabilities the APS scores and the melanoma
    threshold for ``sensitivity``, and on ``features`` the out-of-distribution detector (folds of whole
    ``groups``)."""
    temperature = fit_temperature(logits, labels)
    probabilities = softmax(logits, temperature)
    calibration = Calibration(
        temperature, aps_scores(probabilities, labels), fit_ood(features, labels, groups, len(classes)),
        melanoma_referral(labels, probabilities, classes, sensitivity),
        {"fitted_on": title, "images": len(labels), "nll_before": nll(logits, labels),
         "nll_after": nll(logits, labels, temperature)})
    path = save_calibration(checkpoint, calibration)
    melanoma = calibration.melanoma
    print(f"Temperature {temperature:.4f}, conformal scores, out-of-distribution thresholds "
          f"({100 * calibration.ood.details['validation_flagged']:.1f}% of validation flagged when held out)"
          + (f" and melanoma referral at p(mel) >= {melanoma['threshold']:.4f} (sensitivity "
             f"{melanoma['validation_sensitivity']:.3f}, specificity {melanoma['validation_specificity']:.3f})"
             if melanoma else "")
          + f" fitted on {len(labels)} images; saved in {path}")
    return replace(calibration, source=str(path))


def weigh(probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``probabilities`` times one weight per class, renormalised: the posterior under a class prior shifted by
    ``weights``."""
    shifted = probabilities * weights
    return shifted / shifted.sum(axis=-1, keepdims=True)


def on_melanoma(classes: list[str], weight: float) -> np.ndarray:
    """One weight per class for :func:`weigh`: ``weight`` on melanoma, 1 on every other class."""
    return np.where(np.array(classes) == "mel", weight, 1.0)


def melanomas_found(probabilities: np.ndarray, labels: np.ndarray, classes: list[str], weight: float) -> float:
    """The share of the melanomas among ``labels`` that the argmax finds with p(mel) weighted by ``weight``."""
    mel = classes.index("mel")
    return float((weigh(probabilities[labels == mel], on_melanoma(classes, weight)).argmax(axis=1) == mel).mean())


def melanoma_weight(probabilities: np.ndarray, labels: np.ndarray, classes: list[str], target: float) -> float:
    """The smallest weight of :data:`MELANOMA_WEIGHTS` on p(mel) whose argmax finds ``target`` of the melanomas
    among ``labels`` (the largest where none does: check with :func:`melanomas_found`)."""
    if not (labels == classes.index("mel")).any():
        raise LesionkitError("a weight on p(mel) is fitted on melanomas, and these labels hold none")
    for weight in MELANOMA_WEIGHTS:
        if melanomas_found(probabilities, labels, classes, weight) >= target:
            return float(weight)
    return float(MELANOMA_WEIGHTS[-1])


def fit_ensemble_calibration(probabilities: np.ndarray, labels: np.ndarray, classes: list[str], first: Calibration,
                             title: str) -> Calibration:
    """An ensemble's record, from out-of-fold ``probabilities`` (each image's from the fold model that did not
    train on it, calibrated): temperature 1 (the members' own temperatures are in the average already), the APS
    scores and the melanoma threshold at ``first``'s sensitivity, and ``first``'s out-of-distribution detector,
    since the ensemble serves the first member's features and that member's detector was fitted on its validation
    fold.

    The ensemble is not the model that scored each image, so these are not exactly its own validation scores:
    the ensemble's prediction sets and referral need measuring on held-out images (the test report's sections).
    """
    sensitivity = (first.melanoma or {}).get("sensitivity") or REFERRAL_SENSITIVITY
    return Calibration(
        1.0, aps_scores(probabilities, labels), first.ood, melanoma_referral(labels, probabilities, classes,
                                                                              sensitivity),
        {"fitted_on": title, "images": len(labels),
         "ood_fitted_on": "the first member's validation fold (the ensemble serves that member's features)"})


def decision_sections(labels: np.ndarray, logits: np.ndarray, features: np.ndarray, calibration: Calibration,
                      classes: list[str], fitted_here: bool) -> tuple[dict | None, dict | None, dict | None]:
    """On labelled images (the plain view's ``logits`` and ``features``): the prediction sets at
    :data:`REPORTED_COVERAGE`, the out-of-distribution flags and the melanoma referral of ``calibration``, each
    None where the record lacks it."""
    probabilities = softmax(logits, calibration.temperature or 1.0)
    conformal = ood = referral = None
    scores = calibration.conformal_scores
    # n scores give sets up to n / (n + 1) coverage: a tiny validation part may not reach the reported one.
    if scores is not None and REPORTED_COVERAGE <= len(scores) / (len(scores) + 1):
        conformal = {**coverage_report(probabilities, labels, scores, classes,
                                       REPORTED_COVERAGE), "fitted_here": fitted_here}
    if calibration.ood is not None:
        flagged = calibration.ood.scores(features) > calibration.ood.threshold
        ood = {"method": "Mahalanobis distances of the pooled features and the colour moments",
               "threshold": calibration.ood.threshold,
               "validation_flagged": calibration.ood.details.get("validation_flagged"),
               "flagged": float(flagged.mean()), "flagged_images": int(flagged.sum()),
               "flagged_per_class": {name: float(flagged[labels == i].mean()) if (labels == i).any() else None
                                     for i, name in enumerate(classes)}}
    melanoma = calibration.melanoma
    if melanoma is not None:
        positive = labels == classes.index(melanoma["class"])
        referred = probabilities[:, classes.index(melanoma["class"])] >= melanoma["threshold"]
        referral = {**melanoma, "referred": float(referred.mean()),
                    "sensitivity_here": float(referred[positive].mean()) if positive.any() else None,
                    "specificity_here": float((~referred[~positive]).mean()) if (~positive).any() else None}
    return conformal, ood, referral
