"""``lesionkit data check``: images per class, lesions, and every problem by id."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "Check a HAM10000 folder: columns, labels, unique ids, every image present and decodable."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="folder with HAM10000_metadata.csv and images")
    parser.add_argument("--metadata", type=Path, help="metadata CSV (default: HAM10000_metadata.csv in --data-dir)")


def run(args: argparse.Namespace) -> int:
    from lesionkit.data.metadata import load_dataset, summary  # pandas: not for `lesionkit --help`

    dataset = load_dataset(args.data_dir, args.metadata)
    print(summary(dataset.frame).to_string())
    print(f"total: {len(dataset.frame)} images of {dataset.frame['lesion_id'].nunique()} lesions")
    if not dataset.problems:
        print("OK: every listed image is present and decodes.")
        return 0
    print(f"\n{len(dataset.problems)} problem(s):")
    for image_id, problem in sorted(dataset.problems.items()):
        print(f"  {image_id}: {problem}")
    print("Train on the rest with `lesionkit train --allow-missing`, or fix the data folder.")
    return 1
