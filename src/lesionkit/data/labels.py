"""Labels of an external test set, in either format they come in, matched to a folder of images.

- HAM10000 style: ``image_id,dx`` and optionally ``lesion_id``, ``age``, ``sex``, ``localization`` (the
  Dataverse copy of the ISIC 2018 test labels has this form).
- ISIC 2018 Task 3 ground truth: ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot (``1.0``/``0.0``).

Nothing is dropped silently: a label without an image is a problem (refused unless ``--allow-missing``),
and an image without a label is listed in the report by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import CLASSES, LesionkitError
from lesionkit.data.metadata import Dataset, index_images, locate_images, rows_named

ISIC2018_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


@dataclass
class LabelledFolder(Dataset):
    """A :class:`lesionkit.data.metadata.Dataset` of an external folder, with the ids of images nobody labelled."""

    unlabelled: list[str] = field(default_factory=list)
    label_format: str = ""


def read_labels(path: Path) -> tuple[pd.DataFrame, str]:
    """``image_id``, ``dx`` and whatever metadata the CSV has; and the format recognised."""
    if not path.is_file():
        raise LesionkitError(f"labels file {path} does not exist: check --labels")
    try:
        frame = pd.read_csv(path, dtype=str, encoding="utf-8-sig")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LesionkitError(f"{path} is not a readable CSV: {err}") from None
    frame.columns = [c.strip() for c in frame.columns]
    if {"image", *ISIC2018_COLUMNS} <= set(frame.columns):
        frame, kind = _from_one_hot(frame, path), "ISIC 2018 Task 3 ground truth (one-hot)"
    elif {"image_id", "dx"} <= set(frame.columns):
        kind = "HAM10000 style (image_id, dx)"
    else:
        raise LesionkitError(
            f"{path} has columns {', '.join(frame.columns)}; expected HAM10000 style (image_id,dx[,lesion_id,age,"
            f"sex,localization]) or ISIC 2018 Task 3 ground truth (image,{','.join(ISIC2018_COLUMNS)})")
    frame["image_id"], frame["dx"] = frame["image_id"].str.strip(), frame["dx"].str.strip()
    unknown = frame.index[~frame["dx"].isin(CLASSES)]
    if len(unknown):
        raise LesionkitError(f"{path}: unknown label(s) {', '.join(sorted(set(frame.loc[unknown, 'dx'].astype(str))))}"
                             f" on row(s) {rows_named(unknown)}; dx must be one of {', '.join(CLASSES)}")
    duplicated = frame["image_id"][frame["image_id"].duplicated()].unique()
    if len(duplicated):
        raise LesionkitError(f"{path}: image id(s) listed more than once: {', '.join(duplicated[:10])}")
    if "age" in frame:
        frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    return frame.reset_index(drop=True), kind


def _from_one_hot(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    try:
        hot = frame[list(ISIC2018_COLUMNS)].astype(float).to_numpy()
    except ValueError as err:
        raise LesionkitError(f"{path}: the class columns must be numbers 0 or 1: {err}") from None
    bad = frame.index[~((np.isin(hot, (0.0, 1.0))).all(axis=1) & (hot.sum(axis=1) == 1))]
    if len(bad):
        raise LesionkitError(f"{path}: row(s) {rows_named(bad)} do not mark exactly one class with 1")
    dx = np.array([c.lower() for c in ISIC2018_COLUMNS])[hot.argmax(axis=1)]
    rest = frame.drop(columns=[*ISIC2018_COLUMNS, "image"])
    return pd.concat([pd.DataFrame({"image_id": frame["image"], "dx": dx}), rest], axis=1)


def load_labelled_folder(images: Path, labels: Path, workers: int = 8) -> LabelledFolder:
    """Match ``labels`` to the images under ``images``; check that every labelled image decodes."""
    if not images.is_dir():
        raise LesionkitError(f"image folder {images} does not exist: check --images")
    frame, kind = read_labels(labels)
    found = index_images(images)
    problems = locate_images(frame, found, workers=workers)
    unlabelled = sorted(set(found) - set(frame["image_id"]))
    return LabelledFolder(frame, problems, unlabelled, kind)
