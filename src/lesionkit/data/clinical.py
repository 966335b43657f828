"""The clinical metadata a model may read beside the image (``model.metadata``): age, sex and body site, as a
vector of numbers, and what that vector is when a value, or everything, is unknown.

- ``age``: standardised by the training part's mean and spread, with a missing flag (HAM10000 leaves 57 ages
  blank); blank or absent is missing, anything else must be a number of years from 0 to 120.
- ``sex`` and ``localization`` (the body site): one-hot over a fixed list of levels, ``unknown`` among them
  (HAM10000 has 57 unknown sexes and 234 unknown sites); blank or absent is ``unknown``, anything else must be
  a level.

The levels are HAM10000's, and those of the data a model trains on, so one vocabulary holds for every part of
a split. The encoding travels in the checkpoint (``to_dict``) and in an ONNX export's metadata, so a served
model reads a user's values as it read training's. NumPy alone: the ONNX path imports neither torch nor pandas.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lesionkit import LesionkitError

if TYPE_CHECKING:
    import pandas as pd

FIELDS = ("age", "sex", "localization")
UNKNOWN = "unknown"
MAX_AGE = 120
LEVELS = {
    "sex": ("female", "male", UNKNOWN),
    "localization": ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
                     "lower extremity", "neck", "scalp", "trunk", "upper extremity", UNKNOWN),
}


@dataclass(frozen=True)
class ClinicalEncoding:
    """How ``fields`` become a ``(n, width)`` float32 vector; :meth:`fit` makes one from a training part."""

    fields: tuple[str, ...]
    age_mean: float = 50.0
    age_std: float = 20.0
    levels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def fit(cls, fields: list[str] | tuple[str, ...], train_part: pd.DataFrame, every_part: pd.DataFrame
            ) -> ClinicalEncoding:
        """Age's scale from ``train_part``; the levels of sex and site are HAM10000's and any others that
        ``every_part`` (all images of the run, whose values are no label) holds."""
        unknown = [f for f in fields if f not in FIELDS]
        if unknown:
            raise LesionkitError(f"model.metadata: unknown field(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(FIELDS)}")
        levels = {}
        for name in (f for f in fields if f != "age"):
            seen = {_text(v).lower() for v in every_part[name]} if name in every_part else set()
            extra = sorted(seen - set(LEVELS[name]) - {""})
            levels[name] = (*LEVELS[name][:-1], *extra, UNKNOWN)
        encoding = cls(tuple(fields), levels=levels)
        encoding.encode(every_part, where="the metadata CSV")  # a bad value stops the run here, its images named
        ages = np.array([float(t) for t in map(_text, train_part.get("age", [])) if t])
        if "age" not in fields or len(ages) < 2 or ages.std() == 0:
            return encoding
        return cls(tuple(fields), float(ages.mean()), float(ages.std(ddof=1)), levels)

    @property
    def widths(self) -> dict[str, int]:
        return {name: 2 if name == "age" else len(self.levels[name]) for name in self.fields}

    @property
    def width(self) -> int:
        return sum(self.widths.values())

    @property
    def slices(self) -> list[tuple[int, int]]:
        """Each field's columns, ``(start, stop)``, in ``fields`` order."""
        bounds, start = [], 0
        for width in self.widths.values():
            bounds.append((start, start + width))
            start += width
        return bounds

    def age_from(self, other: ClinicalEncoding) -> tuple[int, float, float] | None:
        """How a known age that ``other`` wrote becomes this encoding's: ``(column, scale, shift)`` with
        ``ours = scale * theirs + shift`` (a missing age is 0 in both, its flag in ``column + 1``); None where
        nothing changes. The folds of one run each scale age by their own training part."""
        if "age" not in self.fields or (self.age_mean, self.age_std) == (other.age_mean, other.age_std):
            return None
        column = self.slices[self.fields.index("age")][0]
        return column, other.age_std / self.age_std, (other.age_mean - self.age_mean) / self.age_std

    def unknown(self, n: int = 1) -> np.ndarray:
        """``(n, width)``: every field unknown (age missing, sex and site ``unknown``)."""
        return self.encode({}, n)

    def encode_one(self, values: Mapping | None) -> np.ndarray:
        """``(1, width)``: one patient's ``{"age": 55, ...}`` (fields the model does not read are ignored; a field
        not given is unknown)."""
        return self.encode({k: [v] for k, v in (values or {}).items() if k in self.fields}, 1)

    def encode(self, columns: Mapping[str, Sequence], n: int | None = None, where: str = "the metadata"
               ) -> np.ndarray:
        """``(n, width)`` float32 of the fields' values in ``columns`` (a DataFrame, or a dict of equal-length
        lists); an absent column is unknown throughout. A bad value raises, naming its images (by ``image_id``
        where ``columns`` has one) and the values allowed."""
        if n is None:
            n = len(columns.index) if hasattr(columns, "index") else len(next(iter(columns.values()), []))
        ids = list(columns["image_id"]) if "image_id" in columns else None
        parts = []
        for name in self.fields:
            values = [_text(v) for v in columns[name]] if name in columns else [""] * n
            parts.append(self._age(values, ids, where) if name == "age" else self._one_hot(name, values, ids, where))
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((n, 0), np.float32)

    def _age(self, values: list[str], ids: list | None, where: str) -> np.ndarray:
        years, bad = np.full(len(values), np.nan), []
        for i, value in enumerate(values):
            if value:
                try:
                    years[i] = float(value)
                except ValueError:
                    bad.append(i)
                    continue
                if not 0 <= years[i] <= MAX_AGE:
                    bad.append(i)
        if bad:
            shown = ", ".join(repr(values[i]) for i in bad[:5])
            raise LesionkitError(f"{where}: age must be a number of years from 0 to {MAX_AGE} (or blank for "
                                 f"unknown), got {shown}{_images(ids, bad)}")
        missing = np.isnan(years)
        return np.stack([np.where(missing, 0.0, (years - self.age_mean) / self.age_std), missing], axis=1)

    def _one_hot(self, name: str, values: list[str], ids: list | None, where: str) -> np.ndarray:
        levels = self.levels[name]
        text = np.array([value.lower() or UNKNOWN for value in values], dtype=object)
        bad = [i for i, value in enumerate(text) if value not in levels]
        if bad:
            shown = ", ".join(sorted({text[i] for i in bad})[:5])
            raise LesionkitError(f"{where}: {name} {shown!r} is not one this model knows{_images(ids, bad)}; "
                                 f"use one of: {', '.join(levels)} (or leave it blank)")
        return (text[:, None] == np.array(levels)[None, :]).astype(np.float64)

    def describe(self, columns: Mapping[str, Sequence]) -> str:
        """Which fields ``columns`` gives values for, in words, for reports and ``predict``."""
        given = [name for name in self.fields if name in columns and any(map(known, columns[name]))]
        return ", ".join(given) if given else "none (every field unknown)"

    def to_dict(self) -> dict:
        return {"fields": list(self.fields), "age_mean": self.age_mean, "age_std": self.age_std,
                "levels": {k: list(v) for k, v in self.levels.items()}}

    @classmethod
    def from_dict(cls, entry: dict) -> ClinicalEncoding:
        return cls(tuple(entry["fields"]), float(entry["age_mean"]), float(entry["age_std"]),
                   {k: tuple(v) for k, v in entry["levels"].items()})


def same_columns(a: ClinicalEncoding | None, b: ClinicalEncoding | None) -> bool:
    """Whether two encodings (None: an image-only model) write the same columns, fields and levels, whatever
    their age scales."""
    if a is None or b is None:
        return a is b
    return a.fields == b.fields and a.levels == b.levels


def known(value) -> bool:
    """Whether a cell says something: not blank, NaN or ``unknown``."""
    return _text(value).lower() not in ("", UNKNOWN)


def _text(value) -> str:
    """A cell as stripped text; blank for None, NaN and NA (pandas' empty cells)."""
    # pandas' NA can only come from pandas, so it is looked up only where pandas is already loaded.
    if value is None or value is getattr(sys.modules.get("pandas"), "NA", None) or (
            isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def _images(ids: list | None, rows: list[int]) -> str:
    """The images with a bad value, by id where there are ids."""
    if ids is None:
        return ""
    return f" for image(s) {', '.join(str(ids[i]) for i in rows[:10])}{' ...' if len(rows) > 10 else ''}"
