"""Read HAM10000 as it is really distributed, and find everything wrong with it before anything trains.

The official download has ``HAM10000_metadata.csv`` beside ``HAM10000_images_part_1/2``; Kaggle's copy adds
lower-case duplicates of both folders and ``hmnist_*.csv`` files. Images are therefore found by
``image_id`` anywhere under the data folder, and the same id found twice counts as one image.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lesionkit import CLASSES, LesionkitError
from lesionkit.data.images import IMAGE_SUFFIXES, check_decodable

METADATA_NAME = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
# What to write into a blank cell of each required column.
FILL_IN = {
    "lesion_id": "fill in the lesion each image shows (images of one lesion share an id; a lesion seen once gets an "
                 "id of its own), so that no lesion lands in two parts of the split",
    "image_id": "fill in the image's file name without its extension",
    "dx": f"fill in the diagnosis, one of {', '.join(CLASSES)}",
}


@dataclass
class Dataset:
    """HAM10000's metadata with a ``path`` column, and every problem found, keyed by image id."""

    frame: pd.DataFrame
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> pd.DataFrame:
        return self.frame[~self.frame["image_id"].isin(self.problems)].reset_index(drop=True)


def find_metadata(data_dir: Path) -> Path:
    direct = data_dir / METADATA_NAME
    if direct.is_file():
        return direct
    found = sorted(data_dir.rglob(METADATA_NAME))
    if not found:
        raise LesionkitError(
            f"no {METADATA_NAME} under {data_dir}: point --data-dir at the HAM10000 folder "
            f"(or fetch it with `lesionkit download --to DIR`)")
    return found[0]


def read_metadata(path: Path) -> pd.DataFrame:
    """Read the metadata CSV and check its structure; row-level problems raise with the rows named."""
    try:
        frame = pd.read_csv(path, dtype={"lesion_id": str, "image_id": str, "dx": str}, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise LesionkitError(f"{path} is empty: it must hold a header with {', '.join(REQUIRED_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LesionkitError(f"{path} is not a readable CSV: {err}") from None
    if frame.empty:
        raise LesionkitError(f"{path} has a header but no rows: list one image per row")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise LesionkitError(
            f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, frame.columns))}. "
            f"A comma-separated file with at least {', '.join(REQUIRED_COLUMNS)} is needed")
    for column in REQUIRED_COLUMNS:
        blank = frame.index[frame[column].isna() | (frame[column].str.strip() == "")]
        if len(blank):
            raise LesionkitError(f"{path}: column {column} is blank on row(s) {rows_named(blank)}: {FILL_IN[column]}")
        frame[column] = frame[column].str.strip()
    unknown = frame.index[~frame["dx"].isin(CLASSES)]
    if len(unknown):
        labels = sorted(set(frame.loc[unknown, "dx"]))
        raise LesionkitError(
            f"{path}: unknown label(s) {', '.join(labels)} on row(s) {rows_named(unknown)}; "
            f"dx must be one of {', '.join(CLASSES)}")
    duplicated = frame["image_id"][frame["image_id"].duplicated()].unique()
    if len(duplicated):
        raise LesionkitError(
            f"{path}: image_id listed more than once: {', '.join(duplicated[:10])}"
            f"{' ...' if len(duplicated) > 10 else ''} ({len(duplicated)} ids); each image needs exactly one row")
    return frame


def rows_named(index: pd.Index) -> str:
    """Row numbers as a user sees them in an editor (the header is line 1), the first ten of them."""
    shown = ", ".join(str(i + 2) for i in index[:10])
    return shown + (f" ... ({len(index)} rows)" if len(index) > 10 else "")


def index_images(data_dir: Path) -> dict[str, Path]:
    """Map image id (file stem) to one file under ``data_dir``; Kaggle's duplicated folders collapse."""
    found: dict[str, Path] = {}
    for path in sorted(data_dir.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    return found


def load_dataset(data_dir: str | Path, metadata: str | Path | None = None, *, decode: bool = True,
                 workers: int = 8) -> Dataset:
    """Read the metadata, locate every listed image and (``decode``) check that each one decodes."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise LesionkitError(f"data folder {data_dir} {what}: check --data-dir")
    frame = read_metadata(Path(metadata) if metadata else find_metadata(data_dir))
    return Dataset(frame, locate_images(frame, index_images(data_dir), decode=decode, workers=workers))


def locate_images(frame: pd.DataFrame, images: dict[str, Path], *, decode: bool = True, workers: int = 8
                  ) -> dict[str, str]:
    """Add each row's image file as a ``path`` column (None where ``images`` has none); return every problem
    by image id: missing, and (``decode``) unreadable."""
    frame["path"] = frame["image_id"].map(lambda i: str(images[i]) if i in images else None)
    problems = {i: "missing: no image file with this id" for i in frame.loc[frame["path"].isna(), "image_id"]}
    if decode:
        present = frame.dropna(subset=["path"])
        # PIL releases the GIL while decoding, so threads check images in parallel.
        with ThreadPoolExecutor(workers) as pool:
            verdicts = pool.map(check_decodable, map(Path, present["path"]))
            problems.update({i: v for i, v in zip(present["image_id"], verdicts, strict=True) if v})
    return problems


def limit_per_class(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """Keep at most ``limit`` images per class, whole lesions at a time, chosen reproducibly."""
    if limit is None:
        return frame
    lesions = frame[["lesion_id", "dx"]].drop_duplicates("lesion_id").sample(frac=1.0, random_state=seed)
    keep = set(lesions.groupby("dx").head(limit)["lesion_id"])
    return frame[frame["lesion_id"].isin(keep)].reset_index(drop=True)


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Images and lesions per class, in class order."""
    table = frame.groupby("dx").agg(images=("image_id", "size"), lesions=("lesion_id", "nunique"))
    return table.reindex(CLASSES, fill_value=0)


def refuse_problems(problems: dict[str, str], allow_missing: bool, listed: str = "in the run folder") -> None:
    """Stop when images are missing or unreadable (``problems``: image id to what is wrong), unless the user
    allowed skipping them; ``listed`` says where the skipped ones are named."""
    if not problems or allow_missing:
        return
    ids = sorted(problems)
    shown = "\n".join(f"  {i}: {problems[i]}" for i in ids[:20])
    more = f"\n  ... and {len(ids) - 20} more" if len(ids) > 20 else ""
    raise LesionkitError(
        f"{len(ids)} listed image(s) are missing or unreadable:\n{shown}{more}\n"
        f"Fix the data folder, or pass --allow-missing to skip them (they are listed {listed}).")
