"""The report of one evaluation as a typed record, read back from ``report.json``, and ``predictions.csv``
(:mod:`lesionkit.evaluate.render` writes the report's own files).

The metrics come from :mod:`lesionkit.evaluate.metrics`; the rest of the report is added by the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import LesionkitError
from lesionkit.evaluate.metrics import classification_metrics, operating_points
from lesionkit.files import atomic_write_csv

# The headline metrics, in the order every table shows them, with their short names.
HEADLINE = {"balanced_accuracy": "balanced accuracy", "melanoma_sensitivity": "melanoma sensitivity",
            "macro_auc": "macro AUC", "macro_f1": "macro F1", "accuracy": "accuracy"}


@dataclass
class Report:
    """Every number of one evaluation. Fields are in ``report.json``'s order; the nested sections stay plain
    dicts as written there."""

    n_images: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    weighted_f1: float
    macro_auc: float | None
    macro_average_precision: float | None
    melanoma_sensitivity: float | None
    per_class: dict
    """Per class: precision, recall (= sensitivity), specificity, F1, AUC, average precision, support."""
    confusion_matrix: dict
    """``classes`` and ``matrix`` (rows: true class, columns: predicted)."""
    melanoma_operating_points: dict | None = None
    ece: dict = field(default_factory=dict)
    """Top-label ECE ``before`` and ``after`` temperature scaling (None without a temperature)."""
    brier: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    """The temperature, where it came from, and the reliability bins."""
    conformal: dict | None = None
    """Coverage and mean size of the checkpoint's prediction sets at 90%, overall and per class."""
    out_of_distribution: dict | None = None
    """The detector's threshold and the share of these images it flags, overall and per class."""
    referral: dict | None = None
    """The melanoma threshold and the sensitivity, specificity and share referred it gives here."""
    intervals: dict | None = None
    """Bootstrap interval ``[low, high]`` of each headline metric; None when no bootstrap was drawn."""
    bootstrap: dict | None = None
    """How the intervals were drawn (resamples, seed, confidence, unit)."""
    subgroups: dict = field(default_factory=dict)
    lesion_level: dict = field(default_factory=dict)
    """The headline metrics with one answer per lesion (its images' probabilities averaged), and the lesion
    count; empty where the images' lesions are unknown."""
    metadata: dict = field(default_factory=dict)
    """For a model that reads clinical metadata: the fields these images gave, and the headline metrics with
    that metadata (the report's own) and without it (every field unknown); empty for an image-only model."""
    figures: dict = field(default_factory=dict)
    """Picture file name: caption, in reading order."""
    context: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    skipped_images: list = field(default_factory=list)
    unlabelled_images: list = field(default_factory=list)
    gallery: dict = field(default_factory=dict)
    """Per predicted class, its most confident right and wrong image with its Grad-CAM picture."""

    def to_dict(self) -> dict:
        """``report.json``'s content; the bootstrap's two sections appear only where one was drawn."""
        out = dataclasses.asdict(self)
        if self.bootstrap is None:
            del out["intervals"], out["bootstrap"]
        return out

    @classmethod
    def from_dict(cls, values: dict) -> Report:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def interval(self, key: str) -> list[float] | None:
        return (self.intervals or {}).get(key)

    def headline(self) -> str:
        """One line of the headline metrics, for the command line."""
        return (f"balanced accuracy {self.balanced_accuracy:.4f}, accuracy {self.accuracy:.4f}, macro AUC "
                f"{self.macro_auc or float('nan'):.4f}, melanoma sensitivity {self.melanoma_sensitivity or 0:.4f}")


def build_report(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> Report:
    """Headline, per-class and melanoma operating-point metrics (see :mod:`lesionkit.evaluate.metrics`)."""
    return Report(**classification_metrics(labels, probabilities, classes),
                  melanoma_operating_points=operating_points(labels, probabilities, classes))


def lesion_level(labels: np.ndarray, probabilities: np.ndarray, lesions: np.ndarray, classes: list[str]) -> dict:
    """:data:`HEADLINE` metrics and per-class recall over lesions: each lesion's images' probabilities
    averaged, its label the one most of its images carry (in HAM10000 all of them)."""
    frame = pd.DataFrame(probabilities, columns=range(len(classes))).assign(lesion=lesions, label=labels)
    grouped = frame.groupby("lesion", sort=True)
    averaged = grouped[list(range(len(classes)))].mean().to_numpy()
    truth = grouped["label"].agg(lambda values: values.mode().iloc[0]).to_numpy()
    measured = classification_metrics(truth, averaged, classes)
    return {"lesions": len(truth), **{key: measured[key] for key in HEADLINE},
            "recall": {name: c["recall"] for name, c in measured["per_class"].items()}}


def headline(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """:data:`HEADLINE` metrics alone."""
    measured = classification_metrics(labels, probabilities, classes)
    return {key: measured[key] for key in HEADLINE}


def load_report(path: Path) -> Report:
    """The report in ``path``: a ``report.json``, or a folder holding one (a run or an evaluation folder)."""
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise LesionkitError(f"{path} is neither a report.json nor a folder holding one")
    try:
        return Report.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise LesionkitError(f"{file} is not a lesionkit report ({err}): pass a report.json that `lesionkit "
                             f"evaluate` or `lesionkit train` wrote") from None


def write_predictions(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    """Per image: its id, true class, predicted class and every class probability."""
    table = frame[["image_id", "dx"]].reset_index(drop=True).copy()
    table["prediction"] = [classes[i] for i in probabilities.argmax(axis=1)]
    table[[f"p_{c}" for c in classes]] = probabilities
    atomic_write_csv(table, path, "predictions", index=False, float_format="%.6f")
