"""The data a run trains on: the checked data folder, the lesion-grouped split (made or reused) and the class
weights of its training part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from lesionkit import CLASSES, LesionkitError
from lesionkit.config import Config
from lesionkit.data.metadata import Dataset, limit_per_class, load_dataset, refuse_problems, summary
from lesionkit.data.split import PARTS, make_split, read_split, save_split
from lesionkit.files import atomic_write_csv


def check_data(config: Config) -> Dataset:
    """The data folder read and every image decoded; missing or unreadable ones refused unless allowed."""
    dataset = load_dataset(config.data.data_dir, config.data.metadata)
    refuse_problems(dataset.problems, config.data.allow_missing)
    return dataset


def prepare_split(config: Config, dataset: Dataset, out: Path, resume: bool) -> tuple[pd.DataFrame, list[str]]:
    """Make or reuse the split of the checked ``dataset`` and save it as ``out/split.csv``; return the split
    frame (with paths and the metadata columns) and the skipped ids."""
    skipped = sorted(dataset.problems)
    if skipped:
        atomic_write_csv(pd.DataFrame({"image_id": skipped, "problem": [dataset.problems[i] for i in skipped]}),
                         out / "skipped.csv", index=False)
        print(f"Skipping {len(skipped)} missing or unreadable image(s), listed in {out / 'skipped.csv'}")
    frame = limit_per_class(dataset.usable, config.data.per_class_limit, config.split.seed)
    split_file = out / "split.csv" if resume else config.split.split_file
    if split_file:
        split = read_split(Path(split_file), dataset.frame)
        split = split[split["image_id"].isin(frame["image_id"])]
    else:
        split = make_split(frame, config.split.val_fraction, config.split.test_fraction, config.split.seed)
    save_split(split, out / "split.csv")
    # Paths, and the metadata the report's subgroups read (sex, age band, body site) where the CSV has it.
    extra = [c for c in ("age", "sex", "localization") if c in frame.columns]
    split = split.merge(frame[["image_id", "path", *extra]], on="image_id")
    table = summary(split).join(split.pivot_table(index="dx", columns="split", values="image_id", aggfunc="size"))
    print(f"Data: {len(split)} images of {split['lesion_id'].nunique()} lesions\n{table.fillna(0).to_string()}")
    return split, skipped


def split_parts(split: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: split[split["split"] == name].reset_index(drop=True) for name in PARTS}


def class_weights(labels: np.ndarray, mode: str) -> list[float] | None:
    """Per-class loss weights: scikit-learn's ``balanced`` n / (k * count_c), under which every class contributes
    equally to the loss; ``sqrt``, proportional to 1 / sqrt(count_c) and scaled like it (the weights of all
    images sum to n); None for ``none``."""
    if mode == "none":
        return None
    present = np.unique(labels)
    if len(present) < len(CLASSES):
        missing = sorted(set(CLASSES) - {CLASSES[i] for i in present})
        raise LesionkitError(f"the train part has no images of {', '.join(missing)}; {mode} class weights "
                             f"need every class (use more data or train.class_weights=none)")
    if mode == "balanced":
        return compute_class_weight("balanced", classes=np.arange(len(CLASSES)), y=labels).tolist()
    counts = np.bincount(labels, minlength=len(CLASSES))
    return (len(labels) / (np.sqrt(counts) * np.sqrt(counts).sum())).tolist()


def sample_weights(labels: np.ndarray, mode: str) -> np.ndarray | None:
    """Each training image's chance to be drawn under ``data.sampler`` (unnormalised): 1 / count of its class
    for ``balanced``, 1 / sqrt(count) for ``sqrt``; None for ``shuffle``."""
    if mode == "shuffle":
        return None
    counts = np.bincount(labels, minlength=len(CLASSES)).astype(np.float64)
    return 1.0 / (counts if mode == "balanced" else np.sqrt(counts))[labels]
