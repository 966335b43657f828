"""The clinical-metadata flags of ``predict`` and ``explain``: ``--age/--sex/--site`` for every image, or
``--metadata CSV`` per image, checked against the model's encoding before any image is scored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from lesionkit import LesionkitError


def add_clinical_arguments(parser: argparse.ArgumentParser) -> None:
    clinical = parser.add_argument_group("clinical metadata, for a model trained with model.metadata (optional: "
                                         "without it the model answers as for a patient it knows nothing of)")
    clinical.add_argument("--age", help="the patient's age in years, for every image given")
    clinical.add_argument("--sex", help="female or male, for every image given")
    clinical.add_argument("--site", help="the body site (localization), e.g. back, face, lower extremity")
    clinical.add_argument("--metadata", type=Path, metavar="CSV",
                          help="per-image values: a CSV with image_id (the file name without its suffix) and any of "
                               "age, sex, localization")


def metadata_source(args: argparse.Namespace, classifier, paths: list[Path]) -> Callable[[Path], dict] | None:
    """Each image's clinical values from ``--age/--sex/--site`` or ``--metadata``, checked against the model's
    encoding before any image is scored; a line on standard error says what the model reads."""
    flags = {"age": args.age, "sex": args.sex, "localization": args.site}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags and args.metadata:
        raise LesionkitError("give clinical metadata either as --age/--sex/--site (every image) or as --metadata "
                             "CSV (per image), not both")
    encoding = classifier.encoding
    if encoding is None:
        if flags or args.metadata:
            print(f"note: {args.checkpoint} was trained on images alone; --age/--sex/--site/--metadata are not used",
                  file=sys.stderr)
        return None
    if args.metadata:
        table = read_clinical_csv(args.metadata, encoding)
        known = sum(path.stem in table for path in paths)
        print(f"metadata: {args.metadata} gives {encoding.describe(table_columns(table))} for {known} of "
              f"{len(paths)} image(s); the others are answered without", file=sys.stderr)
        return lambda path: table.get(path.stem, {})
    if not flags:
        print(f"metadata: none given, so the model answers as for a patient of unknown {', '.join(encoding.fields)} "
              f"(give --age/--sex/--site or --metadata CSV)", file=sys.stderr)
        return None
    unused = [f"--{'site' if k == 'localization' else k}" for k in flags if k not in encoding.fields]
    if unused:
        raise LesionkitError(f"{args.checkpoint} reads {', '.join(encoding.fields)}, not {', '.join(unused)}: "
                             f"leave {'it' if len(unused) == 1 else 'them'} out")
    given = {k: [v] for k, v in flags.items()}
    encoding.encode(given, 1, where="--age/--sex/--site")
    print(f"metadata: {encoding.describe(given)} (the model reads "
          f"{', '.join(encoding.fields)}; what is not given counts as unknown)", file=sys.stderr)
    return lambda path: flags


def read_clinical_csv(path: Path, encoding) -> dict[str, dict]:
    """``--metadata``: image id to its values, every row checked against ``encoding``."""
    import csv

    if not path.is_file():
        raise LesionkitError(f"--metadata {path} does not exist: give a CSV with image_id and age, sex, localization")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns, rows = set(reader.fieldnames or ()), list(reader)
    if "image_id" not in columns or not columns & set(encoding.fields):
        raise LesionkitError(f"--metadata {path} needs an image_id column and one or more of "
                             f"{', '.join(encoding.fields)}; it has {', '.join(sorted(columns)) or 'no header'}")
    ids = [(row["image_id"] or "").strip() for row in rows]
    blank = [str(line) for line, image_id in enumerate(ids, 2) if not image_id]
    if blank:
        raise LesionkitError(f"--metadata {path}: image_id is blank on line(s) {', '.join(blank[:10])}: give each "
                             f"row the file name of its image without the suffix")
    twice = sorted({image_id for image_id in ids if ids.count(image_id) > 1})
    if twice:
        raise LesionkitError(f"--metadata {path} lists {', '.join(twice[:10])} more than once: keep one row per image")
    table = {image_id: {f: row.get(f) for f in encoding.fields if f in columns} for image_id, row in zip(ids, rows)}
    encoding.encode({"image_id": list(table), **table_columns(table)}, len(table), where=f"--metadata {path}")
    return table


def table_columns(table: dict[str, dict]) -> dict[str, list]:
    fields = sorted({f for values in table.values() for f in values})
    return {f: [values.get(f) for values in table.values()] for f in fields}
