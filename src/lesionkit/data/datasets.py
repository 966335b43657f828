"""Samples as small records (path, label) and the DataLoaders that feed them to the network."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lesionkit import CLASSES
from lesionkit.data.cache import ImageCache
from lesionkit.data.images import load_image


class ImageDataset(Dataset):
    """Images at ``paths`` with integer ``labels`` (or -1 where unknown), passed through ``transform``.

    With a ``cache`` (and the images' ``ids``), pictures come from the memory-mapped cache instead of being
    decoded; the transform is the same either way.
    """

    def __init__(self, paths: list[str], labels: list[int], transform, *, ids: list[str] | None = None,
                 cache: ImageCache | None = None):
        self.paths, self.labels, self.transform, self.ids, self.cache = paths, labels, transform, ids, cache
        if cache is not None and (ids is None or any(i not in cache for i in ids)):
            raise ValueError("every image of a cached dataset must be in its cache")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, transform, cache: ImageCache | None = None) -> ImageDataset:
        labels = [CLASSES.index(dx) for dx in frame["dx"]]
        return cls(list(frame["path"]), labels, transform, ids=list(frame["image_id"]), cache=cache)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache is not None:
            image = self.cache.image(self.ids[index])
        else:
            image = load_image(Path(self.paths[index]))
        return self.transform(image), self.labels[index]


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int | None = None,
                sampler: Sampler | None = None) -> DataLoader:
    """A DataLoader whose workers stay alive between epochs (persistent) and, on a GPU, fill pinned memory so
    that the host-to-device copy runs asynchronously. Training shuffles, or draws through ``sampler``."""
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=workers,
        # A last batch of a handful of images makes a noisy step: drop it in training only.
        drop_last=train and len(dataset) > batch_size,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        # Four batches in flight per worker: the GPU draws from a queue instead of waiting on one decode.
        prefetch_factor=4 if workers > 0 else None)
