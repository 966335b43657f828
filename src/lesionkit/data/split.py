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


def _carve_test(frame: pd.DataFrame, test_fraction: float, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The split frame (every image ``train``, but the test part when ``test_fraction`` > 0) and the mask of the
    rest: the one place a test part is carved, for a single split and for cross-validation's folds alike."""
    split = frame[SPLIT_COLUMNS[:3]].copy().reset_index(drop=True)
    split["split"] = "train"
    rest = np.ones(len(split), dtype=bool)
    if test_fraction > 0:
        rest = ~_hold_out(split, test_fraction, seed)
        split.loc[~rest, "split"] = "test"
    return split, rest


def make_split(frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Assign each image to ``train``, ``val`` or ``test``, keeping lesions whole.

    Test is carved out first; validation then takes its share of the whole from what is left.
    """
    split, rest = _carve_test(frame, test_fraction, seed)
    val = _hold_out(split[rest], val_fraction / (1 - test_fraction), seed)
    split.loc[split.index[rest][val], "split"] = "val"
    check_split(split)
    return split


def make_folds(frame: pd.DataFrame, folds: int, test_fraction: float, seed: int) -> list[pd.DataFrame]:
    """``folds`` splits for cross-validation: the test part carved as :func:`make_split` carves it (the same in
    every fold), the rest cut into ``folds`` lesion-grouped, class-stratified folds (``StratifiedGroupKFold``);
    split N validates on fold N and trains on the others. Rows keep ``frame``'s order in every split, so that
    the folds share one image cache."""
    if folds < 2:
        raise LesionkitError(f"--folds {folds}: cross-validation needs at least 2 folds (5 is usual)")
    base, rest = _carve_test(frame, test_fraction, seed)
    lesions = base.loc[rest, "lesion_id"].nunique()
    if lesions < folds:
        raise LesionkitError(f"only {lesions} lesion(s) outside the test part for --folds {folds}: use fewer folds "
                             f"or more lesions (data.per_class_limit)")
    kept = base[rest]
    cuts = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = []
    for _, held in cuts.split(kept, kept["dx"], groups=kept["lesion_id"]):
        split = base.copy()
        split.loc[kept.index[held], "split"] = "val"
        splits.append(split)
    check_folds(splits)
    return splits


def check_folds(splits: list[pd.DataFrame]) -> None:
    """Refuse folds that are not a cross-validation: each split must pass :func:`check_split`, all must hold the
    same images and the same test part, and every other lesion must be validated in exactly one fold."""
    for n, split in enumerate(splits, 1):
        check_split(split, f"fold {n}'s split")
    first = splits[0].set_index("image_id")["split"]
    for n, split in enumerate(splits[1:], 2):
        parts = split.set_index("image_id")["split"]
        if set(parts.index) != set(first.index) or \
                (parts.eq("test").to_numpy() != first.loc[parts.index].eq("test").to_numpy()).any():
            raise LesionkitError(f"fold {n}'s split differs from fold 1's in its images or its test part: the "
                                 f"folds must share both")
    val = pd.concat([split.loc[split["split"] == "val", "lesion_id"].drop_duplicates() for split in splits])
    twice = val[val.duplicated()].unique()
    if len(twice):
        raise LesionkitError(f"lesion(s) {', '.join(map(str, twice[:10]))} lie in more than one fold's validation "
                             f"part ({len(twice)} lesions)")
    never = set(splits[0].loc[splits[0]["split"] != "test", "lesion_id"]) - set(val)
    if never:
        raise LesionkitError(f"lesion(s) {', '.join(sorted(never)[:10])} lie in no fold's validation part "
                             f"({len(never)} lesions)")


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
            f"was it made for another data folder? Check --data-dir, or give the split of a run on this folder "
            f"(--split-file, or split.split_file in the config)")
    mine = known.loc[split["image_id"], ["lesion_id", "dx"]].reset_index(drop=True)
    differ = split[(mine["lesion_id"] != split["lesion_id"].values) | (mine["dx"] != split["dx"].values)]
    if len(differ):
        raise LesionkitError(
            f"{path} disagrees with the metadata on lesion_id or dx for {', '.join(differ['image_id'][:10])}")
    return split


def save_split(split: pd.DataFrame, path: Path) -> None:
    atomic_write_csv(split[SPLIT_COLUMNS], path, index=False)
