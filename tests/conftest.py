"""Shared fixtures: a generated HAM10000-style folder, and the real shared copy when it is there."""

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


@pytest.fixture
def ham_folder(tmp_path: Path) -> Path:
    return make_ham_folder(tmp_path / "ham")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 copy not found at {REAL_DATA} (set LESIONKIT_DATA)")
    return REAL_DATA


@pytest.fixture(autouse=True, scope="session")
def image_cache_in_tmp(tmp_path_factory):
    """Image caches (lesionkit.cache) go to a temporary folder, not the user's ~/.cache; subprocesses inherit it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
