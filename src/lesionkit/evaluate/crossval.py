"""Cross-validation's figures: the out-of-fold predictions of a ``lesionkit train --folds K`` run and the estimate
they give.

Each non-test image is scored once, by the one model that did not train on it (its fold's, at that fold's fitted
temperature): pooled, those predictions are one validation set as large as the whole non-test part, so the
estimate's interval (whole lesions resampled, :mod:`lesionkit.evaluate.bootstrap`) is far narrower than one
fold's. The mean and standard deviation over folds say how much the figure moves from one training set to the
next.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import LesionkitError
from lesionkit.evaluate.bootstrap import BootstrapSettings, intervals
from lesionkit.evaluate.metrics import classification_metrics
from lesionkit.evaluate.report import HEADLINE

OOF_NAME = "oof.csv"
CV_NAME = "cv.json"


def fold_folder(run: Path, n: int) -> Path:
    """Fold ``n``'s run folder (``n`` from 1)."""
    return run / f"fold-{n}"


def out_of_fold(run: Path, splits: list[pd.DataFrame]) -> pd.DataFrame:
    """``image_id, lesion_id, dx, fold, prediction, p_<class>...``: each fold's validation predictions (its
    ``predictions.csv``), every non-test image of ``splits`` exactly once."""
    frames = []
    for n, split in enumerate(splits, 1):
        path = fold_folder(run, n) / "predictions.csv"
        predictions = pd.read_csv(path, dtype={"image_id": str, "dx": str})
        val = split.loc[split["split"] == "val", ["image_id", "lesion_id", "dx"]]
        if sorted(predictions["image_id"]) != sorted(val["image_id"]):
            raise LesionkitError(f"{path} does not hold exactly fold {n}'s validation images: rerun the fold "
                                 f"(remove {fold_folder(run, n)} and run `lesionkit train --folds K` again)")
        frames.append(val.merge(predictions.drop(columns="dx"), on="image_id").assign(fold=n))
    oof = pd.concat(frames, ignore_index=True)
    rest = splits[0].loc[splits[0]["split"] != "test", "image_id"]
    if not oof["image_id"].is_unique or set(oof["image_id"]) != set(rest):
        raise LesionkitError(f"the folds of {run} do not score every non-test image exactly once")
    first = ["image_id", "lesion_id", "dx", "fold", "prediction"]
    return oof[first + [c for c in oof.columns if c not in first]]


def oof_arrays(oof: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels and the ``(n, classes)`` probabilities of out-of-fold predictions."""
    return (np.array([classes.index(d) for d in oof["dx"]]),
            oof[[f"p_{c}" for c in classes]].to_numpy(dtype=np.float64))


def _headline(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    measured = classification_metrics(labels, probabilities, classes)
    return {key: measured[key] for key in HEADLINE}


def cv_estimate(oof: pd.DataFrame, classes: list[str], bootstrap: BootstrapSettings = BootstrapSettings()) -> dict:
    """The pooled out-of-fold headline metrics with their lesion-level bootstrap intervals, each fold's, and
    their mean and standard deviation over folds (``ddof=1``)."""
    labels, probabilities = oof_arrays(oof, classes)
    drawn = intervals(labels, probabilities, classes, oof["lesion_id"].to_numpy(), bootstrap)
    per_fold = []
    for n, rows in oof.groupby("fold", sort=True).indices.items():
        per_fold.append({"fold": int(n), "images": len(rows), "lesions": int(oof["lesion_id"].iloc[rows].nunique()),
                         **_headline(labels[rows], probabilities[rows], classes)})
    over = {}
    for key in HEADLINE:
        values = np.array([fold[key] for fold in per_fold if fold[key] is not None], dtype=np.float64)
        over[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1))} if len(values) > 1 else None
    return {"folds": len(per_fold), "images": len(oof), "lesions": int(oof["lesion_id"].nunique()),
            "estimate": "pooled out-of-fold predictions: each non-test image scored once, by the fold model that did "
                        "not train on it, at that fold's fitted temperature",
            "pooled": _headline(labels, probabilities, classes), "intervals": drawn["intervals"],
            "bootstrap": {**drawn["bootstrap"], "unit": "lesion"}, "per_fold": per_fold, "over_folds": over}


def cv_line(cv: dict) -> str:
    """The estimate in one line, for the command line."""
    pooled, ci, spread = cv["pooled"], cv["intervals"]["balanced_accuracy"], cv["over_folds"]["balanced_accuracy"]
    notes = ([f"95% CI {ci[0]:.4f}-{ci[1]:.4f}"] if ci else []) + (
        [f"over folds {spread['mean']:.4f} ± {spread['sd']:.4f}"] if spread else [])
    return (f"Cross-validation, {cv['folds']} folds, out of fold ({cv['images']} images of {cv['lesions']} "
            f"lesions): balanced accuracy {pooled['balanced_accuracy']:.4f}"
            + (f" ({'; '.join(notes)})" if notes else "")
            + f", macro AUC {pooled['macro_auc'] or float('nan'):.4f}, melanoma sensitivity "
            f"{pooled['melanoma_sensitivity'] or 0:.4f}")
