"""Cross-validation: K ordinary runs on lesion-grouped, class-stratified folds of the non-test part, their
out-of-fold estimate, and the K models as one ensemble.

``lesionkit train --folds K --out RUN`` writes::

    RUN/config.yaml     the settings every fold trains with (split.val_fraction unused: a fold is 1/K)
    RUN/folds.json      K and the folds finished: what a rerun (with or without --resume) continues
    RUN/fold-N/         a normal run folder; its split.csv (fold N: val, the other folds: train, the test part
                        as a single run carves it) is written first and passed as split.split_file
    RUN/oof.csv, RUN/cv.json        the out-of-fold predictions and the estimate (lesionkit.evaluate.crossval)
    RUN/ensemble.json   the K best checkpoints as one classifier (lesionkit.serve.ensemble)
    RUN/test/           with split.test_fraction > 0 and split.evaluate_test: the ensemble's test report, once

No fold measures the test part (each sets split.evaluate_test false) and nothing is chosen on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_only

from lesionkit import CLASSES, LesionkitError
from lesionkit.config import WHERE, Config, differences, load_config, save_config
from lesionkit.data.metadata import limit_per_class
from lesionkit.data.split import check_folds, make_folds, read_split, save_split
from lesionkit.evaluate.crossval import CV_NAME, OOF_NAME, cv_estimate, fold_folder, oof_arrays, out_of_fold
from lesionkit.evaluate.decisions import (fit_ensemble_calibration, melanoma_weight, melanomas_found, on_melanoma,
                                         weigh)
from lesionkit.evaluate.evaluation import EvalSettings, Images, evaluate_frame
from lesionkit.files import atomic_write_csv, atomic_write_text
from lesionkit.serve.ensemble import MANIFEST_NAME, EnsembleClassifier, read_manifest, write_manifest
from lesionkit.train.loop import check_hardware, train
from lesionkit.train.prepare import check_data
from lesionkit.train.runfolder import FOLDS_NAME, LOCK_NAME, check_free, run_lock

KIND = "lesionkit-cross-validation"


def train_folds(config: Config, out: Path, folds: int, resume: bool = False) -> dict:
    """Train every unfinished fold (an interrupted one from its last checkpoint), then write the out-of-fold
    predictions, the estimate, the ensemble manifest and, where asked, the ensemble's test report. Returns the
    estimate (``cv.json``'s content)."""
    with run_lock(out) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        dataset = check_data(config)
        frame = limit_per_class(dataset.usable, config.data.per_class_limit, config.split.seed)
        # What can be refused is refused before the cross-validation's folder is written.
        splits = make_folds(frame, folds, config.split.test_fraction, config.split.seed)
        check_hardware(config.train)
        finished = start(config, out, folds, resume)
        paces = []  # seconds of each fold trained from its start by this call
        for n, split in enumerate(splits, 1):
            fold = fold_folder(out, n)
            if n in finished:
                print(f"Fold {n}/{folds}: finished ({fold}), skipped")
                continue
            begun = (fold / "config.yaml").is_file()
            print(f"Fold {n}/{folds}: {'resuming' if begun else 'training'} {fold}")
            if not begun:
                fold.mkdir(parents=True, exist_ok=True)
                save_split(split, fold / "split.csv")
            started = time.monotonic()
            report = train(fold_config(config, fold), fold, resume=begun)
            if rank_zero_only.rank != 0:
                continue
            print(f"Fold {n}/{folds} validation (best checkpoint): {report.headline()}")
            finished = sorted({*finished, n})
            record(out, folds, finished)
            if not begun:  # a whole fold's time: the pace of those left
                paces.append(time.monotonic() - started)
            print(pace(n, folds, paces, folds - len(finished)))
        if rank_zero_only.rank != 0:
            return {}
        return summarise(config, out, [read_split(fold_folder(out, n) / "split.csv", dataset.frame)
                                       for n in range(1, folds + 1)], frame, sorted(dataset.problems))


def pace(n: int, folds: int, paces: list[float], left: int) -> str:
    """How long fold ``n`` took, and how long the ``left`` folds will at the pace of those trained whole."""
    if not left:
        return f"Fold {n}/{folds}: every fold has finished"
    if not paces:
        return f"Fold {n}/{folds}: {left} fold(s) to go"
    mean = sum(paces) / len(paces)
    return (f"Fold {n}/{folds}: {left} fold(s) to go, about {minutes(left * mean)} at {minutes(mean)} a fold "
            f"(stop at any time: the same command with --resume continues)")


def minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def fold_config(config: Config, fold: Path) -> Config:
    """The settings of one fold: the base config on the fold's own split, without a test report."""
    return replace(config, split=replace(config.split, split_file=str((fold / "split.csv").resolve()),
                                         evaluate_test=False))


def start(config: Config, out: Path, folds: int, resume: bool) -> list[int]:
    """Check that ``out`` is free, or holds this very cross-validation (the same K and settings); record it.
    Returns the folds finished so far."""
    if config.split.split_file:
        raise LesionkitError(f"--folds makes each fold's split itself; drop split.split_file "
                             f"({config.split.split_file}) or train without --folds")
    path = out / FOLDS_NAME
    if not path.is_file():
        if resume:
            raise LesionkitError(f"--resume: {out} holds no cross-validation ({FOLDS_NAME}); nothing to resume")
        if any((out / name).exists() for name in ("config.yaml", "metrics.csv", "checkpoints")):
            raise LesionkitError(f"{out} already holds a single run, not a cross-validation: choose another --out")
        check_free(out, (LOCK_NAME,))
        record(out, folds, [])
    held = json.loads(path.read_text())
    if held["folds"] != folds:
        raise LesionkitError(f"{out} holds a {held['folds']}-fold cross-validation, not {folds} folds: pass "
                             f"--folds {held['folds']} to continue it, or choose another --out")
    saved = out / "config.yaml"
    if saved.is_file():
        differ = [key for key in differences(load_config(saved), config) if key not in WHERE]
        if differ:
            raise LesionkitError(f"{out} holds a cross-validation with other settings ({', '.join(differ[:8])} "
                                 f"differ from {saved}): continue it with `lesionkit train --folds {folds} --out "
                                 f"{out} --resume`, or choose another --out")
    elif rank_zero_only.rank == 0:
        save_config(config, saved)
    return list(held["finished"])


def record(out: Path, folds: int, finished: list[int]) -> None:
    if rank_zero_only.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / FOLDS_NAME, json.dumps({"kind": KIND, "folds": folds, "finished": finished}) + "\n")


def summarise(config: Config, out: Path, splits: list[pd.DataFrame], frame: pd.DataFrame, skipped: list[str]) -> dict:
    """``oof.csv``, ``cv.json``, ``ensemble.json`` and the ensemble's test report, from the finished folds (their
    split files as the runs wrote them)."""
    check_folds(splits)  # no lesion in two folds' validation parts, one test part for all
    folds = len(splits)
    checkpoints = [fold_folder(out, n) / "checkpoints" / "best.ckpt" for n in range(1, folds + 1)]
    ensemble = EnsembleClassifier.from_checkpoints(checkpoints)  # refuses members unlike or uncalibrated
    cv, manifest = write_ensemble(out, out_of_fold(out, splits), ensemble, checkpoints,
                                  f"out-of-fold predictions of {out.name}'s {folds} folds",
                                  {"validation_lesions_disjoint": True,
                                   "test_images": int((splits[0]["split"] == "test").sum())}, folds=folds)
    print(f"Ensemble of {folds} folds: {manifest}")

    test_ids = splits[0].loc[splits[0]["split"] == "test", "image_id"]
    if len(test_ids) and config.split.evaluate_test:
        # In the split's order and with its paths, as the folds cached the images.
        trained_on = splits[0].merge(frame[["image_id", "path"]], on="image_id")
        images = Images(frame[frame["image_id"].isin(test_ids)].reset_index(drop=True),
                        f"test part of {out.name} (ensemble of {folds} folds)", skipped=skipped,
                        trained_on=trained_on)
        settings = EvalSettings(batch_size=config.data.batch_size, workers=config.data.num_workers,
                                device="cuda" if torch.cuda.is_available() else "cpu")
        report = evaluate_frame(manifest, images, out / "test", settings)
        print(f"Test part (the ensemble, once): {report.headline()}")
    return cv


def write_ensemble(out: Path, oof: pd.DataFrame, ensemble: EnsembleClassifier, checkpoints: list[Path], title: str,
                   about: dict, favour_melanoma: float | None = None, **manifest_extra) -> tuple[dict, Path]:
    """Write ``oof`` (the out-of-fold predictions), its estimate (``cv.json``, with ``about``) and the manifest of
    ``checkpoints`` (loaded as ``ensemble``) as one ensemble, whose calibration record is fitted on ``oof`` (called
    ``title``). With ``favour_melanoma`` (a sensitivity), the ensemble weights p(mel) as
    :func:`fit_melanoma_weight` fits it: ``oof.csv`` and ``cv.json`` then say what the weight gives on lesions it
    was not fitted on, and the record is fitted on ``oof`` as the ensemble serves it, under the one weight. Returns
    the estimate and the manifest's path."""
    classes = list(CLASSES)
    labels, probabilities = oof_arrays(oof, classes)
    if favour_melanoma is not None:
        fitted = fit_melanoma_weight(oof, favour_melanoma)
        weights = on_melanoma(classes, fitted.weight)
        probabilities, oof = weigh(probabilities, weights), fitted.oof
        manifest_extra.update(class_weights=dict(zip(classes, map(float, weights), strict=True)),
                              favour_melanoma=favour_melanoma)
        about = {**about, "favour_melanoma": {
            "sensitivity": favour_melanoma, "weight": fitted.weight, "found": fitted.found,
            "per_fold": fitted.per_fold,
            "estimate": "each fold's probabilities weighted by the weight fitted on the other folds"}}
        title += f", p(mel) weighted {fitted.weight:.2f}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(oof, out / OOF_NAME, "out-of-fold predictions", index=False, float_format="%.6f")
    cv = {**cv_estimate(oof, classes), **about}
    atomic_write_text(out / CV_NAME, json.dumps(cv, indent=2) + "\n", "cross-validation estimate")
    calibration = fit_ensemble_calibration(probabilities, labels, classes, ensemble.members[0].calibration, title)
    manifest = write_manifest(out / MANIFEST_NAME, checkpoints, classes, ensemble.preprocessing, calibration,
                              cv=CV_NAME, oof=OOF_NAME, **manifest_extra)
    return cv, manifest


class MelanomaWeight(NamedTuple):
    weight: float
    """What the ensemble serves: the smallest weight on p(mel) that reaches the sensitivity on all the folds."""
    found: float
    """The share of the out-of-fold melanomas that ``weight`` finds (under the sensitivity asked for only where
    even the largest weight tried falls short)."""
    per_fold: list[float]
    """Each fold's weight, fitted on the other folds."""
    oof: pd.DataFrame
    """The out-of-fold predictions, each fold's weighted by its weight: what the weight gives on unseen lesions."""


def check_sensitivity(sensitivity: float) -> None:
    if not 0 < sensitivity < 1:
        raise LesionkitError(f"--favour-melanoma {sensitivity:g}: must be between 0 and 1 (exclusive), e.g. 0.75 to "
                             f"find 75% of melanomas at the argmax")


def fit_melanoma_weight(oof: pd.DataFrame, sensitivity: float) -> MelanomaWeight:
    """The weight on p(mel) whose argmax finds ``sensitivity`` of the melanomas of ``oof``
    (:func:`lesionkit.evaluate.decisions.melanoma_weight`), and the same fit cross-fitted over the folds."""
    check_sensitivity(sensitivity)
    classes = list(CLASSES)
    labels, probabilities = oof_arrays(oof, classes)
    folds, weighted, per_fold = oof["fold"].to_numpy(), probabilities.copy(), []
    for fold in np.unique(folds):
        here = folds == fold
        if not (labels[~here] == classes.index("mel")).any():
            raise LesionkitError(f"--favour-melanoma: the folds other than fold {fold} hold no melanoma to fit fold "
                                 f"{fold}'s weight on; it needs melanomas in at least two folds")
        per_fold.append(melanoma_weight(probabilities[~here], labels[~here], classes, sensitivity))
        weighted[here] = weigh(probabilities[here], on_melanoma(classes, per_fold[-1]))
    columns = [f"p_{c}" for c in classes]
    weight = melanoma_weight(probabilities, labels, classes, sensitivity)
    return MelanomaWeight(weight, melanomas_found(probabilities, labels, classes, weight), per_fold, oof.assign(
        prediction=[classes[i] for i in weighted.argmax(axis=1)], **dict(zip(columns, weighted.T, strict=True))))


def combine(runs: list[Path], out: Path, favour_melanoma: float | None = None) -> tuple[dict, Path]:
    """The members of several finished cross-validations that cut the same folds (the same data, ``split.seed``,
    ``split.test_fraction`` and K; other training seeds or recipes) as one ensemble in ``out``: each non-test
    image's out-of-fold probabilities are the mean of those of every run's model that did not train on it, which
    is what the ensemble would give it with the members that saw it left out. With ``favour_melanoma``, one run
    is enough: the ensemble then weights p(mel) (:func:`fit_melanoma_weight`). Writes ``oof.csv``, ``cv.json`` and
    ``ensemble.json`` (members named relative to ``out``); reads no test image."""
    runs = [Path(run) for run in runs]
    if favour_melanoma is not None:
        check_sensitivity(favour_melanoma)
    if len(runs) < 2 and favour_melanoma is None:
        raise LesionkitError("give two or more `lesionkit train --folds K` run folders to combine, or one with "
                             "--favour-melanoma S to weigh its ensemble's p(mel)")
    if len({run.resolve() for run in runs}) < len(runs):
        raise LesionkitError(f"{' '.join(map(str, runs))}: a run is named twice; give each run once")
    if any(out.resolve() == run.resolve() for run in runs) or (out / FOLDS_NAME).exists() or (
            out / "config.yaml").exists():
        raise LesionkitError(f"{out} holds a run: choose a new folder for the combined ensemble")
    folds = [finished_folds(run) for run in runs]
    reference = [read_fold_parts(fold_folder(runs[0], n)) for n in range(1, folds[0] + 1)]
    for run, k in zip(runs[1:], folds[1:], strict=True):
        if k != folds[0]:
            raise LesionkitError(f"{run} holds {k} folds and {runs[0]} {folds[0]}: runs combine only when they cut "
                                 f"the same folds")
        for n, ours in enumerate(reference, 1):
            if not read_fold_parts(fold_folder(run, n)).equals(ours):
                raise LesionkitError(f"fold {n} of {run} splits the images otherwise than fold {n} of {runs[0]}: "
                                     f"runs combine only when they cut the same folds (the same data, split.seed, "
                                     f"split.test_fraction and --folds)")
    members = [read_manifest(run / MANIFEST_NAME)[1] for run in runs]
    checkpoints = [member for each in members for member in each]
    tables = [pd.read_csv(run / OOF_NAME, dtype={"image_id": str, "dx": str}).set_index("image_id") for run in runs]
    first = tables[0]
    columns = [f"p_{c}" for c in CLASSES]
    for run, table in zip(runs[1:], tables[1:], strict=True):
        if set(table.index) != set(first.index) or not table.loc[first.index, "fold"].equals(first["fold"]):
            raise LesionkitError(f"{run / OOF_NAME} does not score the images of {runs[0] / OOF_NAME} by the same "
                                 f"folds: finish the run again (`lesionkit train --folds K --out {run} --resume`)")
    mean = sum(table.loc[first.index, columns].to_numpy(dtype=float) for table in tables) / len(tables)
    oof = first[["lesion_id", "dx", "fold"]].reset_index().assign(
        prediction=[CLASSES[i] for i in mean.argmax(axis=1)], **dict(zip(columns, mean.T, strict=True)))
    oof = oof[["image_id", "lesion_id", "dx", "fold", "prediction", *columns]]  # as out_of_fold writes it
    named = [os.path.relpath(run.resolve(), out.resolve()) for run in runs]
    parts = reference[0]
    scored_by = f"the mean of the {len(runs)} runs' fold models" if len(runs) > 1 else "the fold model"
    about = {"runs": named, "estimate": f"pooled out-of-fold predictions: each non-test image scored by "
                                        f"{scored_by} that did not train on it",
             "validation_lesions_disjoint": True, "test_images": int((parts["split"] == "test").sum())}
    try:
        ensemble = EnsembleClassifier.from_checkpoints(checkpoints)  # refuses members unlike or uncalibrated
    except LesionkitError as err:  # an unlike member, numbered in the combined list: say whose it is
        first_member = np.cumsum([1, *map(len, members[:-1])])
        owners = ", ".join(f"{start}-{start + len(each) - 1} are {run}'s"
                           for start, each, run in zip(first_member, members, runs, strict=True))
        raise LesionkitError(f"{err} (members {owners}); runs combine when their members share the image size, "
                             f"preprocessing and clinical fields") from None
    return write_ensemble(out, oof, ensemble, checkpoints, f"out-of-fold predictions of {', '.join(named)} "
                          f"({folds[0]} folds each{', averaged' if len(runs) > 1 else ''})", about, favour_melanoma,
                          folds=folds[0], runs=named)


def finished_folds(run: Path) -> int:
    """K of the finished cross-validation in ``run``; refused where a fold or the summary is missing."""
    path = run / FOLDS_NAME
    if not path.is_file():
        raise LesionkitError(f"{run} holds no cross-validation ({FOLDS_NAME}): give the folder of a "
                             f"`lesionkit train --folds K` run")
    held = json.loads(path.read_text())
    resume = f"`lesionkit train --folds {held['folds']} --out {run} --resume`"
    if sorted(held["finished"]) != list(range(1, held["folds"] + 1)):
        raise LesionkitError(f"{run} has not finished (folds done: {held['finished'] or 'none'} of "
                             f"{held['folds']}): continue it with {resume}")
    if not (run / MANIFEST_NAME).is_file() or not (run / OOF_NAME).is_file():
        raise LesionkitError(f"{run}: its folds finished but it holds no {MANIFEST_NAME} or {OOF_NAME}: write them "
                             f"with {resume}")
    return held["folds"]


def read_fold_parts(fold: Path) -> pd.DataFrame:
    """Each image's part (train, val or test) in the split file of ``fold``, in image order."""
    parts = pd.read_csv(fold / "split.csv", usecols=["image_id", "split"], dtype=str)
    return parts.sort_values("image_id", ignore_index=True)
