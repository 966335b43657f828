"""What the tests share besides fixtures: where the repository and the real data are, and generated images and
HAM10000-style folders, and pictures that are not dermoscopy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkit import CLASSES

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("LESIONKIT_DATA", REPO.parent / "shared" / "data" / "ham10000"))
FULLRES = REAL_DATA.parent / "ham10000_fullres_sample"


def write_image(path: Path, seed: int, size=(200, 150), mode="RGB") -> Path:
    """A small noisy picture whose mean colour depends on ``seed`` (so classes differ a little)."""
    rng = np.random.default_rng(seed)
    base = np.array([40 + 30 * (seed % 7), 120, 200 - 25 * (seed % 7)], dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_ham_folder(root: Path, lesions_per_class: int = 5, images_per_lesion: int = 2) -> Path:
    """A HAM10000-shaped folder: metadata CSV and JPEGs split over the two official part folders."""
    rows, n = [], 0
    for c, dx in enumerate(CLASSES):
        for lesion in range(lesions_per_class):
            for _ in range(images_per_lesion):
                image_id = f"ISIC_{n:07d}"
                part = "HAM10000_images_part_1" if n % 2 else "HAM10000_images_part_2"
                write_image(root / part / f"{image_id}.jpg", seed=c + 7 * n)
                rows.append({"lesion_id": f"HAM_{c:02d}{lesion:05d}", "image_id": image_id, "dx": dx,
                             "dx_type": "histo", "age": 50.0, "sex": "male", "localization": "back"})
                n += 1
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def assert_no_lesion_leak(split: pd.DataFrame | Path, metadata: pd.DataFrame | Path) -> pd.DataFrame:
    """Every lesion of ``metadata`` (its own ``lesion_id`` column, not the split's) lies in one part of ``split``.

    ``split`` (a split.csv or its frame) is joined with ``metadata`` (the metadata CSV or its frame) on
    ``image_id``: a split that rewrote lesion ids, or listed images the metadata does not, cannot hide a lesion
    whose images sit in two parts. Returns the joined frame (``split`` and the metadata's ``lesion_id``)."""
    split = pd.read_csv(split) if isinstance(split, (str, Path)) else split
    metadata = pd.read_csv(metadata) if isinstance(metadata, (str, Path)) else metadata
    assert split["image_id"].is_unique, "split lists an image more than once"
    assert metadata["image_id"].is_unique, "metadata lists an image more than once"
    joined = split[["image_id", "split"]].merge(metadata[["image_id", "lesion_id"]], on="image_id", how="left",
                                                validate="one_to_one")
    unknown = joined.loc[joined["lesion_id"].isna(), "image_id"]
    assert unknown.empty, f"split lists image(s) the metadata does not: {list(unknown[:10])}"
    parts = joined.groupby("lesion_id")["split"].nunique()
    leaking = list(parts.index[parts > 1])
    assert not leaking, f"lesion(s) of the metadata in more than one part: {leaking[:10]}"
    return joined


def fake_checkpoint(path: Path, model_name: str = "test_efficientnet", classes=CLASSES, *,
                    weights_of: str | None = None, num_classes: int | None = None, version: str = "0.1.0") -> Path:
    """A checkpoint as `lesionkit train` writes it (what inference reads), without training: ~0.5 MB, 0.1 s."""
    import timm
    import torch

    from lesionkit.data.preprocessing import Preprocessing

    model = timm.create_model(weights_of or model_name, num_classes=num_classes or len(classes))
    meta = {"model_name": model_name, "classes": list(classes), "lesionkit_version": version,
            "preprocessing": Preprocessing(48, 64, (0.5,) * 3, (0.5,) * 3).to_dict()}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": meta,
                "epoch": 0, "lesionkit": {"phase": "head", "phase_index": 0}}, path)
    return path


PHOTOS = ("astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "coins", "moon", "page", "text", "colorwheel", "brick", "grass", "gravel", "logo")


def not_dermoscopy(folder: Path, photos=PHOTOS) -> list[Path]:
    """scikit-image's photos (those shipped with it), uniform noise, and blank white, black and grey images."""
    data = pytest.importorskip("skimage.data")
    folder.mkdir(parents=True, exist_ok=True)
    images = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in photos}
    rng = np.random.default_rng(0)
    for seed in range(3):
        images[f"noise{seed}"] = Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8))
    for name, grey in (("white", 255), ("black", 0), ("grey", 128)):
        images[name] = Image.new("RGB", (600, 450), (grey,) * 3)
    for name, image in images.items():
        image.save(folder / f"{name}.png")
    return sorted(folder.glob("*.png"))


def interrupt_at_epoch(monkeypatch, phase: int, epoch: int) -> list[tuple[int, int]]:
    """Make training stop as by Ctrl-C when epoch ``epoch`` of phase ``phase`` starts (the previous epoch's
    checkpoint written); returns the (phase, epoch) pairs started. ``monkeypatch.undo()`` lets runs go on."""
    from lesionkit.train.resume import EpochSeed

    seen, start = [], EpochSeed.on_train_epoch_start

    def stop_there(self, trainer, module):
        seen.append((module.phase_index, trainer.current_epoch))
        if seen[-1] == (phase, epoch):
            raise KeyboardInterrupt
        start(self, trainer, module)

    monkeypatch.setattr(EpochSeed, "on_train_epoch_start", stop_there)
    return seen
