"""Samples as small records (path, label) and the DataLoaders that feed them to the network."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from lesionkit import CLASSES
from lesionkit.data import load_image


class ImageDataset(Dataset):
    """Images at ``paths`` with integer ``labels`` (or -1 where unknown), passed through ``transform``."""

    def __init__(self, paths: list[str], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, transform) -> ImageDataset:
        labels = [CLASSES.index(dx) for dx in frame["dx"]]
        return cls(list(frame["path"]), labels, transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(Path(self.paths[index]))), self.labels[index]


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int | None = None) -> DataLoader:
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
        # A last batch of a handful of images makes a noisy step: drop it in training only.
        drop_last=train and len(dataset) > batch_size,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
