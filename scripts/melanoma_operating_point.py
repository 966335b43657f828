"""What favouring melanoma at the argmax would cost, measured on the out-of-fold predictions of `train --folds`.

    python scripts/melanoma_operating_point.py RUN [--targets 0.70 0.75 0.80] [--every-class] [--test]

A weight w on p(mel) before the argmax trades the other classes' recall for melanoma's. For each target
sensitivity, and for each fold in turn, the smallest w that reaches the target on the other folds' predictions is
applied to this fold's, so that no image's decision was fitted on that image; the pooled figures (with lesion
bootstrap intervals) say what the weight would give on images it has not seen. With --every-class, a last row
weighs every class, the weights chosen for the balanced accuracy of the other folds (coordinate ascent over
log-weights), cross-fitted the same way. Nothing here reads the test part
unless asked: with --test, the weight fitted on all the out-of-fold predictions is applied to the ensemble's test
predictions (RUN/test/predictions.csv), which is a look at the test part.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import CLASSES
from lesionkit.evaluate.bootstrap import BootstrapSettings, intervals
from lesionkit.evaluate.crossval import OOF_NAME, fold_folder, oof_arrays
from lesionkit.evaluate.decisions import melanoma_weight, on_melanoma, weigh
from lesionkit.evaluate.metrics import classification_metrics

MELANOMA = "mel"


def balanced_weights(probabilities: np.ndarray, labels: np.ndarray, rounds: int = 3) -> np.ndarray:
    """One weight per class (geometric mean 1) whose argmax reaches the highest balanced accuracy on
    ``labels``: each class's log-weight in turn set to the best of -1.5 to 1.5 in steps of 0.05, ``rounds``
    times over. Among equally good values a log-weight stays where it is if it can, else takes the one nearest
    0, so that a flat stretch leaves the weight alone rather than at the grid's edge."""
    logs, grid, classes = np.log(np.clip(probabilities, 1e-12, None)), np.arange(-1.5, 1.501, 0.05), range(
        probabilities.shape[1])
    weights = np.zeros(probabilities.shape[1])

    def balanced(candidate: np.ndarray) -> float:
        decided = (logs + candidate).argmax(axis=1)
        return float(np.mean([(decided[labels == k] == k).mean() for k in classes if (labels == k).any()]))

    for _ in range(rounds):
        for k in classes:
            scores = np.array([balanced(np.where(np.arange(len(weights)) == k, value, weights)) for value in grid])
            best = grid[scores == scores.max()]
            weights[k] = weights[k] if np.isclose(best, weights[k]).any() else best[np.abs(best).argmin()]
        weights -= weights.mean()
    return np.exp(weights)


def table_header(classes: list[str], weight_column: str) -> str:
    return (f"| fitted for | {weight_column} | balanced accuracy (95% CI) "
            "| melanoma sensitivity (95% CI) | " + " | ".join(f"{c} recall" for c in classes) + " |\n"
            + "| --- " * (4 + len(classes)) + "|")


def table_row(target: float | str | None, weights: list[float], labels: np.ndarray, decided: np.ndarray,
              classes: list[str], groups: np.ndarray) -> str:
    found = classification_metrics(labels, decided, classes)
    bounds = intervals(labels, decided, classes, groups, BootstrapSettings())["intervals"]

    def figure(name: str) -> str:
        low, high = bounds[name]
        return f"{100 * found[name]:.2f}% ({100 * low:.2f}-{100 * high:.2f})"

    recalls = " | ".join(f"{100 * found['per_class'][c]['recall']:.1f}%" for c in classes)
    fitted_for = ("argmax" if target is None else target if isinstance(target, str)
                  else f"melanoma sensitivity {100 * target:.0f}%")
    return (f"| {fitted_for} | {', '.join(f'{w:.2f}' for w in weights)} "
            f"| {figure('balanced_accuracy')} | {figure('melanoma_sensitivity')} | {recalls} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `lesionkit train --folds K` run folder (its oof.csv)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.70, 0.75, 0.80, 0.85, 0.90])
    parser.add_argument("--every-class", action="store_true",
                        help="also a weight on every class, fitted for balanced accuracy (p(mel)'s listed per fold)")
    parser.add_argument("--test", action="store_true",
                        help="also apply the weight fitted on all out-of-fold predictions to RUN/test/predictions.csv")
    args = parser.parse_args()

    if not (args.run / OOF_NAME).is_file():
        parser.error(f"{args.run / OOF_NAME} does not exist: give the folder of a finished "
                     f"`lesionkit train --folds K` run")
    if args.test and not (args.run / "test" / "predictions.csv").is_file():
        parser.error(f"{args.run / 'test' / 'predictions.csv'} does not exist: --test needs a run whose ensemble "
                     f"reported the test part (split.test_fraction > 0)")
    classes = list(CLASSES)
    table = pd.read_csv(args.run / OOF_NAME)
    labels, probabilities = oof_arrays(table, classes)
    groups, folds, mel = table["lesion_id"].to_numpy(), table["fold"].to_numpy(), classes.index(MELANOMA)

    print(f"{args.run / OOF_NAME}: {len(table)} images, {len(np.unique(folds))} folds\n")
    print(table_header(classes, "weight on p(mel) against nv, per fold"))
    for target in [None, *args.targets]:
        decided, used = np.empty_like(probabilities), []
        for fold in np.unique(folds):
            here = folds == fold
            weight = 1.0 if target is None else melanoma_weight(probabilities[~here], labels[~here], classes,
                                                                target)
            decided[here] = weigh(probabilities[here], on_melanoma(classes, weight))
            used.append(weight)
        print(table_row(target, used, labels, decided, classes, groups))
    if args.every_class:
        decided, used = np.empty_like(probabilities), []
        for fold in np.unique(folds):
            here = folds == fold
            weights = balanced_weights(probabilities[~here], labels[~here])
            weights /= weights[classes.index("nv")]  # against nv, like the melanoma rows' weight (others at 1)
            decided[here] = weigh(probabilities[here], weights)
            used.append(weights)
        print(table_row("balanced accuracy, a weight per class", [w[mel] for w in used], labels, decided, classes,
                        groups))
        print("\nweights per fold against nv (" + ", ".join(classes) + "): "
              + "; ".join(" ".join(f"{v:.2f}" for v in w) for w in used))

    if args.test:
        test = pd.read_csv(args.run / "test" / "predictions.csv")
        test_labels, test_probabilities = oof_arrays(test, classes)  # the same columns as oof.csv
        lesions = pd.read_csv(fold_folder(args.run, 1) / "split.csv", usecols=["image_id", "lesion_id"])
        test_groups = test.merge(lesions, on="image_id", how="left")["lesion_id"].to_numpy()
        print(f"\n{args.run / 'test' / 'predictions.csv'}: {len(test)} images, {len(set(test_groups))} lesions; "
              f"each weight fitted on all {len(table)} out-of-fold predictions\n")
        print(table_header(classes, "weight on p(mel) against nv"))
        for target in [None, *args.targets]:
            weight = 1.0 if target is None else melanoma_weight(probabilities, labels, classes, target)
            print(table_row(target, [weight], test_labels, weigh(test_probabilities, on_melanoma(classes, weight)),
                            classes, test_groups))


if __name__ == "__main__":
    main()
