"""Image presets for training and evaluation, with torchvision. Size, mean, std, interpolation and crop come
from the weights' own config (:class:`lesionkit.data.preprocessing.Preprocessing`); nothing here knows 224 or the
ImageNet mean.

Dermoscopy frames are 4:3 (600x450): images are scaled to cover the target and centre-cropped, never
squashed, so any photo a user brings keeps its proportions.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.functional import InterpolationMode

from lesionkit.config import AugmentConfig
from lesionkit.data.preprocessing import Preprocessing, cover_shape, normalisation


class ResizeCover(torch.nn.Module):
    """Scale so the image covers ``(height, width)`` with its aspect ratio kept; the overhang is cropped later."""

    def __init__(self, height: int, width: int, interpolation: InterpolationMode):
        super().__init__()
        self.height, self.width, self.interpolation = height, width, interpolation

    def forward(self, image):
        size = cover_shape(*v2.functional.get_size(image), (self.height, self.width))
        return v2.functional.resize(image, list(size), interpolation=self.interpolation, antialias=True)


class ToNormalizedTensor(torch.nn.Module):
    """A PIL image (or a uint8 CHW tensor) as a contiguous float CHW tensor, scaled to [0, 1] and normalised
    with ``mean`` and ``std``.

    torchvision's ``PILToTensor``, ``ToDtype`` and ``Normalize`` do the same in three passes over a strided
    view; this is one copy and two in-place passes, several times faster (docs/speed.md has the figures).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.scale, self.shift = (torch.tensor(values).view(-1, 1, 1) for values in normalisation(mean, std))

    def forward(self, image) -> torch.Tensor:
        pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image)).permute(2, 0, 1)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return out.copy_(pixels).mul_(self.scale).sub_(self.shift)


def eval_transform(pre: Preprocessing) -> v2.Compose:
    """Deterministic: cover ``size / crop_pct``, then centre-crop ``size``, as the weights were evaluated."""
    interpolation = InterpolationMode(pre.interpolation)
    cover = ResizeCover(*pre.cover, interpolation)
    return v2.Compose([cover, v2.CenterCrop((pre.height, pre.width)), ToNormalizedTensor(pre.mean, pre.std)])


def train_transform(pre: Preprocessing, aug: AugmentConfig) -> v2.Compose:
    """The study's augmentation: flips, rotation, zoom, brightness and contrast (and saturation and hue where
    set), on the eval framing."""
    if not aug.enabled:
        return eval_transform(pre)
    interpolation = InterpolationMode(pre.interpolation)
    cover = ResizeCover(*pre.cover, interpolation)
    return v2.Compose([
        cover,
        v2.RandomHorizontalFlip(aug.hflip),
        v2.RandomVerticalFlip(aug.vflip),
        # Rotate and zoom in one resampling; bilinear is plenty for augmentation and cheaper.
        v2.RandomAffine(degrees=aug.rotation, scale=(1 - aug.zoom, 1 + aug.zoom)),
        v2.CenterCrop((pre.height, pre.width)),
        v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue),
        ToNormalizedTensor(pre.mean, pre.std),
    ])
