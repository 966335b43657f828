"""``lesionkit evaluate``: the report a reviewer can check, for any checkpoint on any labelled images.

Images come from a HAM10000 folder (optionally one part of a run's ``split.csv``) or from an external folder
with a labels CSV (HAM10000 style or ISIC 2018 Task 3 one-hot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionkit import LesionkitError
from lesionkit.data.labels import load_labelled_folder
from lesionkit.data.metadata import find_metadata, load_dataset, refuse_problems
from lesionkit.data.split import PARTS, read_split
from lesionkit.evaluate.bootstrap import BootstrapSettings
from lesionkit.evaluate.evaluation import EvalSettings, Images, evaluate_frame
from lesionkit.files import file_hash
from lesionkit.model.shipped import checkpoint_or_default
from lesionkit.serve.ensemble import run_folder
from lesionkit.serve.device import add_device_argument, check_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint written by `lesionkit train`, or an ensemble: RUN/ensemble.json of "
                             "`lesionkit train --folds K` (or that RUN folder)")
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
                        help="fit the calibration record on these images and save it beside the checkpoint: "
                             "the temperature, the conformal scores of the prediction sets, the out-of-distribution "
                             "threshold and the melanoma referral threshold; only with --split-file and --split val")
    parser.add_argument("--melanoma-sensitivity", type=float, metavar="S",
                        help="refit the record (as --fit-temperature) with the referral threshold on p(mel) that "
                             "refers a share S of validation melanomas (default: the record's own, else 0.90)")
    parser.add_argument("--no-gallery", dest="gallery", action="store_false",
                        help="leave out the Grad-CAM gallery (each class's most confident right and wrong image)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% intervals (default: 1000; 0 skips them)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="data loading processes (default: one per core, at most 8)")
    add_device_argument(parser)




def select_images(args: argparse.Namespace) -> tuple[Images, str]:
    """The images ``args`` name, checked, and the name of their part."""
    if args.images or args.labels:
        if not (args.images and args.labels) or args.data_dir or args.split_file:
            raise LesionkitError("give --images with --labels for an external set, or --data-dir (with "
                                 "--split-file) for HAM10000, not a mix")
        folder = load_labelled_folder(args.images, args.labels)
        refuse_problems(folder.problems, args.allow_missing, "in the report")
        if folder.unlabelled:
            shown = ", ".join(folder.unlabelled[:10]) + (" ..." if len(folder.unlabelled) > 10 else "")
            print(f"warning: {len(folder.unlabelled)} image(s) under {args.images} have no label in {args.labels} "
                  f"and are not evaluated: {shown} (all listed in the report)", file=sys.stderr)
        data = {"images": str(args.images.resolve()), "labels": str(args.labels.resolve()),
                "labels_md5": file_hash(args.labels), "label_format": folder.label_format}
        return Images(folder.usable, f"{args.labels.stem} images of {args.images}", data, sorted(folder.problems),
                      folder.unlabelled), args.labels.stem
    if not args.data_dir:
        raise LesionkitError("no images: pass --data-dir (a HAM10000 folder) or --images with --labels")
    dataset = load_dataset(args.data_dir, args.metadata)
    frame, part, trained_on, problems = dataset.usable, "all", None, dataset.problems
    if args.split_file:
        split = read_split(args.split_file, dataset.frame)
        chosen = split.loc[split["split"] == args.split, "image_id"]
        if chosen.empty:
            raise LesionkitError(f"{args.split_file} has no '{args.split}' images: choose another --split")
        frame, part = frame[frame["image_id"].isin(chosen)].reset_index(drop=True), args.split
        scored = set(chosen)
        problems = {i: problem for i, problem in problems.items() if i in scored}  # this part's only
        # In the split file's order, as training cached them (lesionkit.train.prepare.prepare_split).
        trained_on = split.merge(dataset.usable[["image_id", "path"]], on="image_id")
    refuse_problems(problems, args.allow_missing, "in the report")
    metadata = args.metadata or find_metadata(args.data_dir)  # load_dataset found it already
    data = {"data_folder": str(args.data_dir.resolve()), "metadata_md5": file_hash(metadata),
            "split_file": str(args.split_file.resolve()) if args.split_file else None,
            "part": part}
    return Images(frame, f"{part} images of {args.data_dir}", data, sorted(problems), trained_on=trained_on), part


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--bootstrap", args.bootstrap, 0)):
        if value is not None and value < least:
            raise LesionkitError(f"{flag} {value}: must be at least {least}")
    sensitivity = args.melanoma_sensitivity
    if sensitivity is not None and not 0 < sensitivity <= 1:
        raise LesionkitError(f"--melanoma-sensitivity {sensitivity:g}: must be above 0 and at most 1, e.g. 0.9 to "
                             f"refer 90% of melanomas")
    fit = args.fit_temperature or sensitivity is not None
    if fit and not (args.split_file and args.split == "val"):
        flag = "--fit-temperature" if args.fit_temperature else "--melanoma-sensitivity"
        raise LesionkitError(f"{flag} fits on validation images only: add --split-file RUN/split.csv "
                             "--split val (never fit it on test or external data)")
    bootstrap = BootstrapSettings(args.bootstrap, args.seed) if args.bootstrap else None
    settings = EvalSettings(args.batch_size, args.workers, args.device, args.tta, bootstrap, args.gallery)
    args.checkpoint = checkpoint_or_default(args.checkpoint)  # an ensemble's folder: its manifest
    images, part = select_images(args)
    out = args.out or run_folder(args.checkpoint) / f"evaluate-{part}{'-tta' if args.tta else ''}"
    report = evaluate_frame(args.checkpoint, images, out, settings, fit_temperature_here=fit,
                            melanoma_sensitivity=sensitivity)
    ci, ece = report.interval("balanced_accuracy"), report.ece
    print(f"balanced accuracy {report.balanced_accuracy:.4f}"
          + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
          + f"  accuracy {report.accuracy:.4f}  macro AUC {report.macro_auc or float('nan'):.4f}  melanoma "
          f"sensitivity {report.melanoma_sensitivity or 0:.4f}  ({report.n_images} images)\n"
          f"ECE {ece['before']:.4f} before temperature scaling"
          + (f", {ece['after']:.4f} after (T={report.calibration['temperature']:.3f})" if ece["after"] is not None
             else " (no temperature fitted)")
          + "".join(f"\n{line}" for line in decision_lines(report))
          + f"\nReport: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def decision_lines(report) -> list[str]:
    """The prediction sets', out-of-distribution flags' and referral's figures on these images, one line each."""
    sets, ood, referral = report.conformal, report.out_of_distribution, report.referral
    lines = []
    if sets:
        lines.append(f"prediction sets at {sets['target_coverage']:g}: coverage {sets['coverage']:.4f}, mean size "
                     f"{sets['mean_set_size']:.2f} classes")
    if ood:
        lines.append(f"out of distribution: {ood['flagged_images']} image(s) flagged ({100 * ood['flagged']:.1f}%)")
    if referral and referral["sensitivity_here"] is not None:
        lines.append(f"melanoma referral at p(mel) >= {referral['threshold']:.4f}: sensitivity "
                     f"{referral['sensitivity_here']:.4f}, specificity {referral['specificity_here']:.4f}")
    if not sets:
        lines.append("no conformal scores, out-of-distribution or referral threshold for this checkpoint: fit them "
                     "with --split-file RUN/split.csv --split val --fit-temperature")
    return lines
