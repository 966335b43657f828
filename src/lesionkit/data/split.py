"""Lesion-grouped, class-stratified train/val/test split: no lesion's pictures ever straddle two parts.

HAM10000 holds 10,015 images of 7,470 lesions; an image-level split puts photos of the same lesion in train
and validation and flatters every number. ``StratifiedGroupKFold`` keeps lesions whole and class shares
close to the whole set's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lesionkit import LesionkitError
from lesionkit.files import atomic_write_csv

SPLIT_COLUMNS = ["image_id", "lesion_id", "dx", "split"]
PARTS = ("train", "val", "test")


def _hold_out(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about ``fraction`` of the rows, whole lesions, stratified by class."""
    n_splits = max(2, round(1 / fraction))
    lesions = frame["lesion_id"].nunique()
    if lesions < n_splits:
        raise LesionkitError(f"only {lesions} lesion(s) to split: holding out {fraction:.0%} needs at least "
                             f"{n_splits}; use more lesions (data.per_class_limit) or a larger "
                             f"split.val_fraction / split.test_fraction")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, held = next(folds.split(frame, frame["dx"], groups=frame["lesion_id"]))
    mask = np.zeros(len(frame), dtype=bool)
    mask[held] = True
    return mask


def make_split(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Assign each image to ``train``, ``val`` or ``test``, keeping lesions whole.

    Test is carved out first; validation then takes its share of the whole from what is left.
    """
    split = frame[SPLIT_COLUMNS[:3]].copy().reset_index(drop=True)
    split["split"] = "train"
    rest = np.ones(len(split), dtype=bool)
    if test_fraction > 0:
        rest = ~_hold_out(split, test_fraction, seed)
        split.loc[~rest, "split"] = "test"
    val = _hold_out(split[rest], val_fraction / (1 - test_fraction), seed)
    split.loc[split.index[rest][val], "split"] = "val"
    check_split(split)
    return split


def check_split(split: pd.DataFrame, source: str = "the split") -> None:
    """Refuse a split with unknown parts or a lesion in two parts."""
    missing = [c for c in SPLIT_COLUMNS if c not in split.columns]
    if missing:
        raise LesionkitError(f"{source} lacks column(s) {', '.join(missing)}; it needs {', '.join(SPLIT_COLUMNS)}")
    twice = split["image_id"][split["image_id"].duplicated()].unique()
    if len(twice):
        raise LesionkitError(f"{source} lists image(s) {', '.join(map(str, twice[:10]))} more than once "
                             f"({len(twice)} ids); each image belongs to exactly one part")
    bad = sorted(set(split["split"]) - set(PARTS))
    if bad:
        raise LesionkitError(f"{source}: unknown part(s) {', '.join(map(str, bad))}; use {', '.join(PARTS)}")
    parts = split.groupby("lesion_id")["split"].nunique()
    leaking = parts[parts > 1].index
    if len(leaking):
        raise LesionkitError(
            f"{source} puts lesion(s) {', '.join(leaking[:10])} in more than one part ({len(leaking)} lesions); "
            f"all images of a lesion must share a part")
    if not (split["split"] == "val").any():
        raise LesionkitError(f"{source} has no 'val' images: the best checkpoint is chosen on validation")


def read_split(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Load a saved ``split.csv`` and check that it matches the metadata it is used with."""
    if not path.is_file():
        raise LesionkitError(f"split file {path} does not exist: check --split-file")
    try:
        split = pd.read_csv(path, dtype=str, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise LesionkitError(f"split file {path} is empty: it needs a header {', '.join(SPLIT_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LesionkitError(f"split file {path} is not a readable CSV: {err}") from None
    check_split(split, str(path))
    known = frame.set_index("image_id")
    unknown = split.loc[~split["image_id"].isin(known.index), "image_id"]
    if len(unknown):
        raise LesionkitError(
            f"{path} lists {len(unknown)} image(s) the metadata does not: {', '.join(unknown[:10])}; "
            f"was it made for another data folder?")
    mine = known.loc[split["image_id"], ["lesion_id", "dx"]].reset_index(drop=True)
    differ = split[(mine["lesion_id"] != split["lesion_id"].values) | (mine["dx"] != split["dx"].values)]
    if len(differ):
        raise LesionkitError(
            f"{path} disagrees with the metadata on lesion_id or dx for {', '.join(differ['image_id'][:10])}")
    return split


def save_split(split: pd.DataFrame, path: Path) -> None:
    atomic_write_csv(split[SPLIT_COLUMNS], path, index=False)
