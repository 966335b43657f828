"""Samples as small records (path, label) and the DataLoaders that feed them to the network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lesionkit import CLASSES
from lesionkit.data.cache import ImageCache
from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.data.images import load_image


class ImageDataset(Dataset):
    """Images at ``paths`` with integer ``labels`` (or -1 where unknown), passed through ``transform``.

    With a ``cache`` (and the images' ``ids``), pictures come from the memory-mapped cache instead of being
    decoded; the transform is the same either way. With ``metadata`` (one encoded row per image,
    :mod:`lesionkit.data.clinical`) a sample is ``((image, metadata), label)``.
    """

    def __init__(self, paths: list[str], labels: list[int], transform, *, ids: list[str] | None = None,
                 cache: ImageCache | None = None, metadata: np.ndarray | None = None):
        self.paths, self.labels, self.transform, self.ids, self.cache = paths, labels, transform, ids, cache
        self.metadata = None if metadata is None else torch.from_numpy(np.asarray(metadata, dtype=np.float32))
        if cache is not None and (ids is None or any(i not in cache for i in ids)):
            raise ValueError("every image of a cached dataset must be in its cache")
        if self.metadata is not None and len(self.metadata) != len(paths):
            raise ValueError(f"{len(self.metadata)} metadata rows for {len(paths)} images")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, transform, cache: ImageCache | None = None,
                   encoding: ClinicalEncoding | None = None) -> ImageDataset:
        """The images of ``frame`` (``path``, ``image_id``, ``dx``), with its metadata columns encoded by
        ``encoding`` when given."""
        labels = [CLASSES.index(dx) for dx in frame["dx"]]
        metadata = None if encoding is None else encoding.encode(frame)
        return cls(list(frame["path"]), labels, transform, ids=list(frame["image_id"]), cache=cache,
                   metadata=metadata)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], int]:
        if self.cache is not None:
            image = self.cache.image(self.ids[index])
        else:
            image = load_image(Path(self.paths[index]))
        image = self.transform(image)
        return (image if self.metadata is None else (image, self.metadata[index])), self.labels[index]


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
