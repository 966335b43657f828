"""What a checkpoint carries so that every consumer sees images exactly as training did, and the evaluation
framing in Pillow and NumPy alone, for serving without torch (``predict --backend onnx``).

Dermoscopy frames are 4:3 (600x450): images are scaled to cover the target and centre-cropped, never squashed,
so any photo a user brings keeps its proportions. :func:`lesionkit.data.transforms.eval_transform` does the same
with torchvision, whose resize of a Pillow image is Pillow's own: the two give the same numbers (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """Size, mean, std, interpolation and crop, from the weights' own config (timm's
    ``resolve_model_data_config``): nothing here knows 224 or the ImageNet mean."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    @classmethod
    def from_model_config(cls, data_config: dict, image_size: list[int] | None) -> Preprocessing:
        """Build from timm's resolved data config; the default size keeps the weights' scale at 4:3."""
        side = data_config["input_size"][-1]
        height, width = image_size or (side, round(side * 4 / 3))
        return cls(height, width, tuple(data_config["mean"]), tuple(data_config["std"]),
                   data_config.get("interpolation", "bicubic"), data_config.get("crop_pct", 1.0))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @property
    def cover(self) -> tuple[int, int]:
        """``(height, width)`` every image is scaled to cover before the centre crop: ``size / crop_pct``."""
        return round(self.height / self.crop_pct), round(self.width / self.crop_pct)


def cover_shape(height: int, width: int, box: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` an image of ``height`` x ``width`` is scaled to so that it covers ``box``, aspect
    kept."""
    scale = max(box[0] / height, box[1] / width)
    return max(box[0], round(height * scale)), max(box[1], round(width * scale))


def normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[float], list[float]]:
    """Per-channel ``scale`` and ``shift`` such that ``pixel * scale - shift`` is ``(pixel / 255 - mean) / std``:
    one multiply and one subtract, the same for the torch and the NumPy framing."""
    return [1 / (255 * s) for s in std], [m / s for m, s in zip(mean, std, strict=True)]


PIL_RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                  "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def eval_array(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """An RGB image as the network's float32 ``(3, height, width)`` input: scaled to cover ``pre.cover``,
    centre-cropped to ``(pre.height, pre.width)`` with torchvision's rounding, scaled to [0, 1] and normalised."""
    height, width = cover_shape(image.height, image.width, pre.cover)
    image = image.resize((width, height), PIL_RESAMPLING[pre.interpolation])
    top, left = int(round((height - pre.height) / 2.0)), int(round((width - pre.width) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + pre.width, top + pre.height)), dtype=np.float32)
    # The same float32 operations as lesionkit.data.transforms.ToNormalizedTensor, in the same order.
    scale, shift = (np.array(values, dtype=np.float32) for values in normalisation(pre.mean, pre.std))
    return np.ascontiguousarray((pixels * scale - shift).transpose(2, 0, 1))
