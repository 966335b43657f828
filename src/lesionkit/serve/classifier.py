"""Test-time augmentation: the eight flips and 90-degree rotations of each image, probabilities averaged.

A dermoscopic lesion has no "up", so all eight symmetries of the square (the dihedral group D4) are equally
valid views. A 90-degree turn makes a 4:3 input 3:4; the network pools globally, so it takes either.
TTA is a configuration chosen before evaluation (``--tta``) and reported as such, never picked on test
results; it costs eight forward passes per image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from lesionkit.calibration import softmax
from lesionkit.inference import Classifier
from lesionkit.predict import progress

VIEW_NAMES = ("identity", "rot90", "rot180", "rot270", "hflip", "hflip+rot90", "hflip+rot180", "hflip+rot270")


def views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The eight D4 views of an ``(n, c, h, w)`` batch, identity first, in ``VIEW_NAMES`` order."""
    flipped = batch.flip(-1)
    return [torch.rot90(b, k, dims=(-2, -1)) for b in (batch, flipped) for k in range(4)]


def batch_logits(classifier: Classifier, batch: torch.Tensor, tta: bool) -> torch.Tensor:
    """``(n, views, classes)`` logits: one view without TTA, eight with it."""
    return torch.stack([classifier.logits(view) for view in (views(batch) if tta else [batch])], dim=1)


def loader_logits(classifier: Classifier, loader: DataLoader, tta: bool) -> np.ndarray:
    """``(n, views, classes)`` logits for every image a loader yields, in order."""
    logits = []
    with progress(len(loader.dataset), tta) as bar:
        for images, _ in loader:
            logits.append(batch_logits(classifier, images, tta))
            bar.update(len(images))
    return torch.cat(logits).numpy()


def average_probabilities(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Each view's softmax at ``temperature`` (1 when None), averaged over views: ``(n, classes)``."""
    return softmax(logits, temperature or 1.0).mean(axis=1)


def probabilities(classifier: Classifier, batch: torch.Tensor, tta: bool) -> torch.Tensor:
    """``(n, classes)`` calibrated probabilities (the classifier's own temperature), averaged over views with TTA."""
    if not tta:
        return classifier.probabilities(batch)
    return torch.stack([classifier.probabilities(view) for view in views(batch)]).mean(dim=0)
