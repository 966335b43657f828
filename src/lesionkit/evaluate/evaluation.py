"""``lesionkit evaluate``: the report a reviewer can check, for any checkpoint on any labelled images.

Images come from a HAM10000 folder (optionally one part of a run's ``split.csv``) or from an external
folder with a labels CSV (HAM10000 style or ISIC 2018 Task 3 one-hot). The report holds the headline with
bootstrap intervals, per-class and melanoma operating-point metrics, calibration before and after
temperature scaling, subgroups, pictures, the data used and every setting.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.bootstrap import BootstrapSettings, intervals
from lesionkit.cache import find_cache
from lesionkit.calibration import fit_temperature, nll, reliability_bins, save_temperature
from lesionkit.data import find_metadata, load_dataset, refuse_problems
from lesionkit.inference import Classifier
from lesionkit.labels import load_labelled_folder
from lesionkit.loader import ImageDataset, make_loader
from lesionkit.metrics import ECE_BINS, brier_score, expected_calibration_error
from lesionkit.plots import report_figures
from lesionkit.report import build_report, write_predictions, write_report
from lesionkit.runfolder import file_hash
from lesionkit.split import PARTS, read_split
from lesionkit.subgroups import subgroup_metrics
from lesionkit.tta import VIEW_NAMES, average_probabilities, loader_logits


def evaluate_frame(checkpoint: Path, frame: pd.DataFrame, out_dir: Path, *, title: str, skipped: list[str] = (),
                   batch_size: int = 32, workers: int | None = None, device: str = "cpu", tta: bool = False,
                   fit_temperature_here: bool = False, bootstrap: BootstrapSettings | None = BootstrapSettings(),
                   data: dict | None = None, unlabelled: list[str] = (), cache=None,
                   trained_on: pd.DataFrame | None = None) -> dict:
    """Score ``checkpoint`` on the images of ``frame`` (``image_id``, ``path``, ``dx``, optionally
    ``lesion_id`` and metadata); write the report into ``out_dir`` and return it.

    ``fit_temperature_here`` fits T on these images and saves it beside the checkpoint: pass it for a
    validation part only, never for data that the report is meant to judge. ``cache``: training's ImageCache
    (lesionkit.cache); or ``trained_on``, the whole split of the run, whose cache is read if training left one. A
    one-off evaluation otherwise reads each image once, uncached.
    """
    checkpoint = Path(checkpoint)
    classifier = Classifier.load(checkpoint, device)
    unknown = sorted(set(frame["dx"]) - set(classifier.classes))
    if unknown:
        raise LesionkitError(f"labels {', '.join(unknown)} are not classes of {checkpoint} ({classifier.classes})")
    if cache is None and trained_on is not None:
        cache_dir = classifier.meta.get("config", {}).get("data", {}).get("cache_dir")
        cache = find_cache(trained_on, classifier.preprocessing, cache_dir)
    loader = make_loader(ImageDataset.from_frame(frame, classifier.transform, cache), batch_size, train=False,
                         workers=workers)
    logits = loader_logits(classifier, loader, tta)  # (images, views, classes)
    labels = np.array([classifier.classes.index(d) for d in frame["dx"]])
    if fit_temperature_here:
        temperature, source = fit_and_save_temperature(checkpoint, logits, labels, title)
    else:
        temperature, source = (classifier.temperature, classifier.temperature_source) \
            if classifier.temperature_source else (None, None)
    raw = average_probabilities(logits)
    calibrated = average_probabilities(logits, temperature) if temperature else None
    probabilities = raw if calibrated is None else calibrated

    report = build_report(labels, probabilities, classifier.classes)
    report.update(calibration_section(labels, {"before": raw, "after": calibrated}, temperature, source,
                                      fit_temperature_here))
    lesions_known = "lesion_id" in frame and frame["lesion_id"].notna().all()
    groups = (frame["lesion_id"] if lesions_known else frame["image_id"]).to_numpy()
    if bootstrap:
        report.update(intervals(labels, probabilities, classifier.classes, groups, bootstrap))
        report["bootstrap"]["unit"] = "lesion" if lesions_known else "image"
    report["subgroups"] = subgroup_metrics(frame, labels, probabilities, classifier.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = checkpoint.resolve().parent.parent
    bins = report["calibration"]["reliability"]
    report["figures"] = report_figures(
        out_dir, labels, probabilities, classifier.classes,
        {f"{k} temperature scaling (ECE {100 * report['ece'][k]:.1f}%)": b for k, b in bins.items()},
        run_dir / "metrics.csv")
    report["context"] = {"checkpoint": str(checkpoint), "model": classifier.meta["model_name"],
                         "configuration": "TTA, 8 flips and rotations averaged" if tta else "plain (no TTA)",
                         "images": len(frame), "lesions": int(pd.unique(groups).size) if lesions_known else "unknown"}
    report["data"] = {**(data or {}), **describe_images(frame, classifier.classes, run_dir)}
    report["settings"] = {
        "checkpoint": str(checkpoint.resolve()), "model": classifier.meta["model_name"],
        "preprocessing": classifier.preprocessing.to_dict(), "tta": tta, "tta_views": list(VIEW_NAMES) if tta else
        ["identity"], "temperature": temperature, "bootstrap": report.get("bootstrap"), "batch_size": batch_size,
        "device": device, "training_config": classifier.meta.get("config")}
    report["skipped_images"] = list(skipped)
    report["unlabelled_images"] = list(unlabelled)
    write_report(report, out_dir, title)
    write_predictions(frame, probabilities, classifier.classes, out_dir / "predictions.csv")
    return report


def fit_and_save_temperature(checkpoint: Path, logits: np.ndarray, labels: np.ndarray, title: str
                             ) -> tuple[float, str]:
    """Fit T on the plain view of ``logits`` (T must not depend on --tta), save it beside ``checkpoint``;
    return T and the file it went to."""
    plain = logits[:, 0]
    temperature = fit_temperature(plain, labels)
    source = save_temperature(checkpoint, temperature, {
        "fitted_on": title, "images": len(labels), "nll_before": nll(plain, labels),
        "nll_after": nll(plain, labels, temperature)})
    print(f"Temperature {temperature:.4f} fitted on {len(labels)} images; saved in {source}")
    return temperature, str(source)


def calibration_section(labels: np.ndarray, probabilities: dict[str, np.ndarray | None], temperature: float | None,
                        source: str | None, fitted_here: bool) -> dict:
    """ECE, Brier score and reliability bins ``before`` and ``after`` temperature scaling (None without T)."""
    return {
        "ece": {k: None if p is None else expected_calibration_error(labels, p) for k, p in probabilities.items()},
        "brier": {k: None if p is None else brier_score(labels, p) for k, p in probabilities.items()},
        "calibration": {"temperature": temperature, "source": source, "fitted_here": fitted_here, "n_bins": ECE_BINS,
                        "reliability": {k: reliability_bins(labels, p, ECE_BINS) for k, p in probabilities.items()
                                        if p is not None}},
    }


def describe_images(frame: pd.DataFrame, classes: list[str], run_dir: Path) -> dict:
    """Counts per class (and per part of the run's split, when the checkpoint sits in a run) and image sizes."""
    counts = frame["dx"].value_counts()
    out = {"images_per_class": {"evaluated": {c: int(counts.get(c, 0)) for c in classes}}}
    if (run_dir / "split.csv").is_file():
        split = pd.read_csv(run_dir / "split.csv", dtype=str)
        # A class absent from a part is a gap (NaN) in the pivot table: a count of 0.
        table = split.pivot_table(index="dx", columns="split", values="image_id", aggfunc="size").fillna(0)
        out["training_run_split"] = {p: {c: int(table[p].get(c, 0)) for c in classes} for p in PARTS if p in table}
    sizes = Counter()
    for path in frame["path"]:
        with Image.open(path) as image:  # reads the header only
            sizes[f"{image.width}x{image.height}"] += 1
    out["image_sizes"] = ", ".join(f"{size} ({n})" for size, n in sizes.most_common(3))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by `lesionkit train`")
    source = parser.add_argument_group("images: a HAM10000 folder, or --images with --labels")
    source.add_argument("--data-dir", type=Path, help="folder with HAM10000_metadata.csv and images")
    source.add_argument("--metadata", type=Path, help="metadata CSV (default: HAM10000_metadata.csv in --data-dir)")
    source.add_argument("--split-file", type=Path, help="a split.csv; with --split, evaluate one part of it")
    source.add_argument("--split", choices=PARTS, default="val", help="part of --split-file to evaluate (default: val)")
    source.add_argument("--images", type=Path, help="an external folder of images (e.g. the ISIC 2018 test set)")
    source.add_argument("--labels", type=Path, help="labels of --images: image_id,dx[,lesion_id,age,sex,localization] "
                        "or ISIC 2018 Task 3 ground truth (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)")
    parser.add_argument("--out", type=Path, help="report folder (default: evaluate-<part> beside the checkpoints)")
    parser.add_argument("--allow-missing", action="store_true", help="skip missing or unreadable images (listed)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average 8 flips and 90-degree rotations (8x slower)")
    parser.add_argument("--fit-temperature", action="store_true",
                        help="fit the temperature on these images and save it beside the checkpoint; "
                             "only with --split-file and --split val")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals (default: 1000; 0 skips them)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="data loading processes (default: one per core, at most 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


class Selection(NamedTuple):
    """The images to evaluate, the part's name, where they came from, the skipped and the unlabelled ids, and
    with a run's split file, the run's whole split (whose image cache training may have left)."""

    frame: pd.DataFrame
    part: str
    data: dict
    skipped: list[str]
    unlabelled: list[str]
    trained_on: pd.DataFrame | None = None


def _select(args: argparse.Namespace) -> Selection:
    """The images ``args`` name, checked."""
    if args.images or args.labels:
        if not (args.images and args.labels) or args.data_dir or args.split_file:
            raise LesionkitError("give --images with --labels for an external set, or --data-dir (with "
                                 "--split-file) for HAM10000, not a mix")
        folder = load_labelled_folder(args.images, args.labels)
        refuse_problems(folder, args.allow_missing)
        if folder.unlabelled:
            shown = ", ".join(folder.unlabelled[:10]) + (" ..." if len(folder.unlabelled) > 10 else "")
            print(f"warning: {len(folder.unlabelled)} image(s) under {args.images} have no label in {args.labels} "
                  f"and are not evaluated: {shown} (all listed in the report)", file=sys.stderr)
        data = {"images": str(args.images.resolve()), "labels": str(args.labels.resolve()),
                "labels_md5": file_hash(args.labels), "label_format": folder.label_format}
        return Selection(folder.usable, args.labels.stem, data, sorted(folder.problems), folder.unlabelled)
    if not args.data_dir:
        raise LesionkitError("no images: pass --data-dir (a HAM10000 folder) or --images with --labels")
    dataset = load_dataset(args.data_dir, args.metadata)
    refuse_problems(dataset, args.allow_missing)
    frame, part, trained_on = dataset.usable, "all", None
    if args.split_file:
        split = read_split(args.split_file, dataset.frame)
        chosen = split.loc[split["split"] == args.split, "image_id"]
        if chosen.empty:
            raise LesionkitError(f"{args.split_file} has no '{args.split}' images: choose another --split")
        frame, part = frame[frame["image_id"].isin(chosen)].reset_index(drop=True), args.split
        # In the split file's order, as training cached them (lesionkit.train.prepare_data).
        trained_on = split.merge(dataset.usable[["image_id", "path"]], on="image_id")
    metadata = args.metadata or find_metadata(args.data_dir)  # load_dataset found it already
    data = {"data_folder": str(args.data_dir.resolve()), "metadata_md5": file_hash(metadata),
            "split_file": str(args.split_file.resolve()) if args.split_file else None,
            "part": part}
    return Selection(frame, part, data, sorted(dataset.problems), [], trained_on)


def run(args: argparse.Namespace) -> int:
    if args.fit_temperature and not (args.split_file and args.split == "val"):
        raise LesionkitError("--fit-temperature fits on validation images only: add --split-file RUN/split.csv "
                             "--split val (never fit it on test or external data)")
    bootstrap = BootstrapSettings(args.bootstrap, args.seed) if args.bootstrap else None
    chosen = _select(args)
    out = args.out or args.checkpoint.resolve().parent.parent / f"evaluate-{chosen.part}{'-tta' if args.tta else ''}"
    source = f"{args.images}" if args.images else f"{args.data_dir}"
    report = evaluate_frame(args.checkpoint, chosen.frame, out, title=f"{chosen.part} images of {source}",
                            skipped=chosen.skipped, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, tta=args.tta, fit_temperature_here=args.fit_temperature,
                            bootstrap=bootstrap, data=chosen.data, unlabelled=chosen.unlabelled,
                            trained_on=chosen.trained_on)
    ci = report.get("intervals", {}).get("balanced_accuracy")
    ece = report["ece"]
    print(f"balanced accuracy {report['balanced_accuracy']:.4f}"
          + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
          + f"  accuracy {report['accuracy']:.4f}  macro AUC {report['macro_auc'] or float('nan'):.4f}  melanoma "
          f"sensitivity {report['melanoma_sensitivity'] or 0:.4f}  ({report['n_images']} images)\n"
          f"ECE {ece['before']:.4f} before temperature scaling"
          + (f", {ece['after']:.4f} after (T={report['calibration']['temperature']:.3f})" if ece["after"] is not None
             else " (no temperature fitted)")
          + f"\nReport: {out / 'report.md'} and {out / 'report.html'}")
    return 0
