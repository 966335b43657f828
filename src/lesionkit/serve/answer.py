"""What a served answer says of an image, from either backend: the calibrated probabilities and, from the record
fitted on validation (:mod:`lesionkit.evaluate.record`), when not to take them at their word:

- ``prediction_set``: the classes that hold the true one for a chosen share of images (split conformal APS,
  :mod:`lesionkit.evaluate.conformal`), when a coverage is asked;
- ``out_of_distribution`` and ``ood_score``: the image's features lie further from the validation images' than
  all but 2.5% of those did (:mod:`lesionkit.evaluate.ood`): probably not a dermoscopic lesion photo;
- ``refer``: p(mel) reaches the threshold that caught ``refer_sensitivity`` of the validation melanomas
  (``refer_threshold``).

Each part was fitted on the plain view, so each is decided on the plain view, also with test-time augmentation
(whose average gives ``prediction`` and ``probabilities``). A part the record lacks is None. NumPy alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.evaluate.conformal import conformal_threshold, prediction_sets
from lesionkit.evaluate.record import refit_command
from lesionkit.serve.classifier import Classifier, average_probabilities, view_outputs


def check_coverage(classifier: Classifier, coverage: float, name: str) -> None:
    """Refuse a ``coverage`` outside (0, 1), or one the record of ``name`` (a checkpoint or export) cannot give."""
    if not 0 < coverage < 1:
        raise LesionkitError(f"--coverage {coverage:g}: must be between 0 and 1 (exclusive), e.g. 0.9 for sets "
                             f"that hold the true class of 90% of images")
    scores = classifier.calibration.conformal_scores
    if scores is None:
        raise LesionkitError(f"{name} has no conformal scores to build prediction sets from: refit with "
                             f"{refit_command(Path(name).with_suffix('.ckpt'))} (and export again for --backend onnx)")
    try:
        conformal_threshold(scores, coverage)
    except LesionkitError as err:  # too few scores for this coverage: says how high it may go
        raise LesionkitError(f"--{err}") from None


def missing_parts(classifier: Classifier) -> list[str]:
    """What the record of ``classifier`` lacks of the out-of-distribution flag and the referral, in words."""
    calibration, missing = classifier.calibration, []
    if calibration.ood is None:
        missing.append("no out-of-distribution detector")
    elif getattr(classifier, "has_features", True) is False:
        missing.append("an export without the features output the out-of-distribution detector reads")
    if calibration.melanoma is None:
        missing.append("no melanoma referral threshold")
    return missing


def assess_batch(classifier: Classifier, batch: np.ndarray, tta: bool = False,
                 coverage: float | None = None, metadata: np.ndarray | None = None) -> list[dict]:
    """One answer per image of an ``(n, 3, height, width)`` batch (see the module's docstring for the fields),
    with its encoded ``metadata`` rows where the model reads them."""
    calibration, classes = classifier.calibration, classifier.classes
    logits, features, _ = view_outputs(classifier, batch, tta, metadata)
    averaged = average_probabilities(logits, classifier.temperature)
    plain = average_probabilities(logits[:, :1], classifier.temperature)
    n = len(batch)
    members = None
    if coverage is not None:
        members = prediction_sets(plain, conformal_threshold(calibration.conformal_scores, coverage))
    ood_scores = calibration.ood.scores(features) if calibration.ood and features is not None else None
    melanoma = calibration.melanoma
    p_mel = plain[:, classes.index(melanoma["class"])] if melanoma else None
    answers = []
    for i in range(n):
        scores = dict(zip(classes, averaged[i].tolist(), strict=True))
        answer = {"prediction": max(scores, key=scores.get), "probabilities": scores}
        if members is not None:
            answer["prediction_set"] = [c for c, inside in zip(classes, members[i], strict=True) if inside]
        answer["out_of_distribution"] = None if ood_scores is None else bool(ood_scores[i] > calibration.ood.threshold)
        answer["ood_score"] = None if ood_scores is None else float(ood_scores[i])
        answer["refer"] = None if p_mel is None else bool(p_mel[i] >= melanoma["threshold"])
        answer["refer_threshold"] = melanoma["threshold"] if melanoma else None
        answer["refer_sensitivity"] = melanoma["sensitivity"] if melanoma else None
        answers.append(answer)
    return answers


def assess(classifier: Classifier, image: Image.Image, coverage: float | None = None, tta: bool = False,
           metadata: dict | None = None) -> dict:
    """The answer for one Pillow image (any mode; made RGB): probabilities, prediction, the prediction set at
    ``coverage`` (checked with :func:`check_coverage` first), the out-of-distribution flag and score, and the
    melanoma referral. A model that reads clinical metadata gets ``metadata``'s values (``{"age": 55, ...}``;
    unknown where absent)."""
    encoding = classifier.encoding
    rows = None
    if encoding is not None and metadata:
        rows = encoding.encode_one(metadata)
    return assess_batch(classifier, classifier.transform(image.convert("RGB"))[None], tta, coverage, rows)[0]
