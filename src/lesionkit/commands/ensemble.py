"""``lesionkit ensemble``: several cross-validations that cut the same folds as one ensemble."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Combine finished `lesionkit train --folds K` runs that cut the same folds (the same data, split.seed, "
    "split.test_fraction and K: other training seeds, other recipes) into one ensemble of all their members. "
    "OUT gets the combined out-of-fold predictions (each image's from the models that did not train on it), "
    "their estimate with its interval (cv.json) and ensemble.json, which evaluate, predict, export and serve take "
    "as one model. No test image is read: score the test part once, when you choose, with `lesionkit "
    "evaluate --checkpoint OUT --split test`.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished `train --folds K` run folders")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the combined ensemble")


def run(args: argparse.Namespace) -> int:
    import json

    from lesionkit.evaluate.crossval import cv_line
    from lesionkit.train.folds import combine

    cv, manifest = combine(args.runs, args.out)
    members = len(json.loads(manifest.read_text())["members"])
    print(f"{cv_line(cv)}\nEnsemble of {members} members from {len(args.runs)} runs: {manifest}\n"
          f"Its test part, once: lesionkit evaluate --checkpoint {manifest} --data-dir DIR --split-file "
          f"{args.runs[0] / 'fold-1' / 'split.csv'} --split test --out {args.out / 'test'} [--allow-missing]")
    return 0
