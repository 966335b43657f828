"""Shared fixtures: a generated HAM10000-style folder, and the real shared copy when it is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import REAL_DATA, make_ham_folder


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
    """Image caches (lesionkit.data.cache) go to a temporary folder, not the user's ~/.cache; subprocesses inherit
    it."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
