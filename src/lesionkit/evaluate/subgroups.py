"""Metrics by sex, age band and body site, where the metadata has them (HAM10000's columns).

A reviewer asks whether the model fails one group; a number from 12 images cannot answer that, so groups
under ``MIN_IMAGES`` are marked too small to judge and classes under ``MIN_CLASS_IMAGES`` in a group are
named: their recall, and so the group's balanced accuracy, rests on a handful of pictures.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics

MIN_IMAGES = 30
MIN_CLASS_IMAGES = 5
# Bands of 15 years from 30: HAM10000's ages run 0-85 in steps of 5, median 50.
AGE_EDGES = [0, 30, 45, 60, 75, np.inf]
AGE_NAMES = ["<30", "30-44", "45-59", "60-74", "75+"]
COLUMNS = {"sex": "sex", "age_band": "age", "localization": "localization"}


def _groups(frame: pd.DataFrame, name: str) -> pd.Series:
    if name == "age_band":
        ages = pd.to_numeric(frame["age"], errors="coerce")
        bands = pd.cut(ages, AGE_EDGES, right=False, labels=AGE_NAMES).astype(object)
        return bands.where(ages.notna(), "unknown")
    return frame[COLUMNS[name]].fillna("unknown").astype(str).str.strip().replace("", "unknown")


def group_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], lesions: int) -> dict:
    """Counts and the headline metrics of one group, with a verdict on whether it is large enough to judge."""
    predictions = probabilities.argmax(axis=1)
    counts = np.bincount(labels, minlength=len(classes))
    present = [i for i in range(len(classes)) if counts[i]]
    recall = metrics.recall_score(labels, predictions, labels=present, average=None, zero_division=0)
    mel = classes.index("mel") if "mel" in classes else None
    thin = [f"{classes[i]} ({counts[i]})" for i in present if counts[i] < MIN_CLASS_IMAGES]
    if len(labels) < MIN_IMAGES:
        status = f"too small to judge (< {MIN_IMAGES} images)"
    elif thin:
        status = f"few images of {', '.join(thin)}: their recall is not reliable"
    else:
        status = "ok"
    return {"images": int(len(labels)), "lesions": lesions,
            "per_class_images": dict(zip(classes, counts.tolist(), strict=True)),
            "accuracy": float(metrics.accuracy_score(labels, predictions)),
            "balanced_accuracy": float(np.mean(recall)),
            "melanoma_sensitivity": float(recall[present.index(mel)]) if mel in present else None,
            "judged": len(labels) >= MIN_IMAGES, "status": status}


def subgroup_metrics(frame: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray,
                     classes: list[str]) -> dict:
    """``{"sex": {"female": {...}, ...}, "age_band": ..., "localization": ...}`` for the columns present."""
    lesion_ids = frame["lesion_id"] if "lesion_id" in frame else frame["image_id"]
    out = {}
    for name, column in COLUMNS.items():
        if column not in frame or frame[column].isna().all():
            continue
        groups = _groups(frame.reset_index(drop=True), name).to_numpy()
        order = [g for g in [*AGE_NAMES, "unknown"] if g in set(groups)] if name == "age_band" else sorted(set(groups))
        out[name] = {str(g): group_metrics(labels[groups == g], probabilities[groups == g], classes,
                                           int(lesion_ids[groups == g].nunique()))
                     for g in order}
    return out
