"""``lesionkit ensemble``: cross-validations that cut the same folds as one ensemble, its p(mel) weighted at
will."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = (
    "Combine finished `lesionkit train --folds K` runs that cut the same folds (the same data, split.seed, "
    "split.test_fraction and K: other training seeds, other recipes) into one ensemble of all their members. "
    "OUT gets the combined out-of-fold predictions (each image's from the models that did not train on it), "
    "their estimate with its interval (cv.json) and ensemble.json, which evaluate, predict, export and serve take "
    "as one model. With --favour-melanoma S (one run is then enough), the ensemble multiplies p(mel) by the "
    "smallest weight whose argmax finds a share S of the out-of-fold melanomas; oof.csv and cv.json then say what "
    "that weight gives on lesions it was not fitted on (each fold's weighted by the weight fitted on the others). "
    "No test image is read: score the test part once, when you choose, with `lesionkit evaluate --checkpoint OUT "
    "--split test`.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="finished `train --folds K` run folders (two or more, or one with --favour-melanoma)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the combined ensemble")
    parser.add_argument("--favour-melanoma", type=float, metavar="S",
                        help="weigh p(mel) so that the argmax finds a share S of the out-of-fold melanomas, e.g. "
                             "0.75 (trades other classes' recall for melanoma's; the probabilities become those of "
                             "a prior with more melanoma)")


def run(args: argparse.Namespace) -> int:
    import json

    from lesionkit.evaluate.crossval import cv_line
    from lesionkit.train.folds import combine

    cv, manifest = combine(args.runs, args.out, args.favour_melanoma)
    members = len(json.loads(manifest.read_text())["members"])
    favoured = cv.get("favour_melanoma")
    if favoured and favoured["found"] < favoured["sensitivity"]:
        print(f"Warning: even the largest weight tried on p(mel), {favoured['weight']:.2f}, finds only "
              f"{100 * favoured['found']:.1f}% of the out-of-fold melanomas, short of the "
              f"{100 * favoured['sensitivity']:g}% asked for; the ensemble serves that weight")
    print(f"{cv_line(cv)}\nEnsemble of {members} members from {len(args.runs)} run{'s' * (len(args.runs) > 1)}"
          + (f", p(mel) weighted {favoured['weight']:.2f} (fitted out of fold for melanoma sensitivity "
             f"{favoured['sensitivity']:g}; per fold {', '.join(f'{w:.2f}' for w in favoured['per_fold'])})"
             if favoured else "") + f": {manifest}\n"
          f"Its test part, once: lesionkit evaluate --checkpoint {manifest} --data-dir DIR --split-file "
          f"{args.runs[0] / 'fold-1' / 'split.csv'} --split test --out {args.out / 'test'} [--allow-missing]")
    return 0
