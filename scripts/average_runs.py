"""What averaging several runs' probabilities gives on the validation part they share: each run's validation
predictions (``RUN/predictions.csv``, at the run's fitted temperature) and their mean, side by side.

    python scripts/average_runs.py RUN_A RUN_B [...]

The runs must have validated on the same images (the same split: the same data, ``split.seed`` and fractions,
another training seed or recipe). The mean is what an ensemble of their best checkpoints would answer on those
images. Each run's checkpoint was chosen on them, so every row is optimistic by about as much: compare the rows,
not the levels. Intervals resample whole lesions (``lesionkit.evaluate.bootstrap``). Nothing reads a test image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import CLASSES
from lesionkit.evaluate.bootstrap import BootstrapSettings, intervals
from lesionkit.evaluate.crossval import oof_arrays
from lesionkit.evaluate.metrics import classification_metrics


def row(name: str, labels: np.ndarray, probabilities: np.ndarray, groups: np.ndarray) -> str:
    found = classification_metrics(labels, probabilities, list(CLASSES))
    low, high = intervals(labels, probabilities, list(CLASSES), groups, BootstrapSettings())["intervals"][
        "balanced_accuracy"]
    return (f"| {name} | {100 * found['balanced_accuracy']:.2f}% ({100 * low:.2f}-{100 * high:.2f}) "
            f"| {100 * found['macro_auc']:.2f}% | {100 * found['melanoma_sensitivity']:.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished `lesionkit train` run folders")
    args = parser.parse_args()
    if len(args.runs) < 2:
        parser.error("give two or more runs to average")
    tables = []
    for run in args.runs:
        if not (run / "predictions.csv").is_file():
            parser.error(f"{run / 'predictions.csv'} does not exist: give the folder of a finished `lesionkit train`")
        tables.append(pd.read_csv(run / "predictions.csv", dtype={"image_id": str}).set_index("image_id"))
    first = tables[0]
    for run, table in zip(args.runs[1:], tables[1:], strict=True):
        if set(table.index) != set(first.index):
            parser.error(f"{run} validated on other images than {args.runs[0]}: average runs of the same split")
    lesions = pd.read_csv(args.runs[0] / "split.csv", dtype=str).set_index("image_id")["lesion_id"]
    groups = lesions.loc[first.index].to_numpy()
    labels, _ = oof_arrays(first, list(CLASSES))
    each = [oof_arrays(table.loc[first.index], list(CLASSES))[1] for table in tables]

    print(f"validation part of {args.runs[0]}: {len(first)} images, {len(set(groups))} lesions\n")
    print("| probabilities | balanced accuracy (95% CI) | macro AUC | melanoma sensitivity |\n" + "| --- " * 4 + "|")
    for run, probabilities in zip(args.runs, each, strict=True):
        print(row(str(run), labels, probabilities, groups))
    print(row(f"mean of the {len(each)}", labels, sum(each) / len(each), groups))


if __name__ == "__main__":
    main()
