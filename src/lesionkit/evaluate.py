"""``lesionkit evaluate``: the same report as training writes, for any checkpoint on any labelled images."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit import LesionkitError
from lesionkit.data import load_dataset, refuse_problems
from lesionkit.inference import Classifier
from lesionkit.loader import ImageDataset, make_loader
from lesionkit.report import build_report, write_predictions, write_report
from lesionkit.split import PARTS, read_split


def evaluate_frame(checkpoint: Path, frame: pd.DataFrame, out_dir: Path, *, title: str, skipped: list[str] = (),
                   batch_size: int = 32, workers: int | None = None, device: str = "cpu") -> dict:
    """Score ``checkpoint`` on the images of ``frame`` (``path``, ``dx``); write the report into ``out_dir``."""
    classifier = Classifier.load(checkpoint, device)
    unknown = sorted(set(frame["dx"]) - set(classifier.classes))
    if unknown:
        raise LesionkitError(f"labels {', '.join(unknown)} are not classes of {checkpoint} ({classifier.classes})")
    loader = make_loader(ImageDataset.from_frame(frame, classifier.transform), batch_size, train=False,
                         workers=workers)
    probabilities = classifier.predict_loader(loader).numpy()
    labels = np.array([classifier.classes.index(d) for d in frame["dx"]])
    report = build_report(labels, probabilities, classifier.classes)
    report["context"] = {"checkpoint": str(checkpoint), "model": classifier.meta["model_name"],
                         "images": len(frame), "lesions": int(frame["lesion_id"].nunique())}
    report["skipped_images"] = list(skipped)
    write_report(report, out_dir, title)
    write_predictions(frame, probabilities, classifier.classes, out_dir / "predictions.csv")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by `lesionkit train`")
    parser.add_argument("--data-dir", required=True, type=Path, help="folder with HAM10000_metadata.csv and images")
    parser.add_argument("--metadata", type=Path, help="metadata CSV (default: HAM10000_metadata.csv in --data-dir)")
    parser.add_argument("--split-file", type=Path, help="a split.csv; with --split, evaluate one part of it")
    parser.add_argument("--split", choices=PARTS, default="val", help="part of --split-file to evaluate (default: val)")
    parser.add_argument("--out", type=Path, help="report folder (default: evaluate-<part> beside the checkpoints)")
    parser.add_argument("--allow-missing", action="store_true", help="skip missing or unreadable images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="data loading processes (default: one per core, at most 8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def run(args: argparse.Namespace) -> int:
    dataset = load_dataset(args.data_dir, args.metadata)
    refuse_problems(dataset, args.allow_missing)
    frame, part = dataset.usable, "all"
    if args.split_file:
        split = read_split(args.split_file, dataset.frame)
        chosen = split.loc[split["split"] == args.split, "image_id"]
        if chosen.empty:
            raise LesionkitError(f"{args.split_file} has no '{args.split}' images: choose another --split")
        frame, part = frame[frame["image_id"].isin(chosen)].reset_index(drop=True), args.split
    out = args.out or args.checkpoint.resolve().parent.parent / f"evaluate-{part}"
    report = evaluate_frame(args.checkpoint, frame, out, title=f"{part} images of {args.data_dir}",
                            skipped=sorted(dataset.problems), batch_size=args.batch_size, workers=args.workers,
                            device=args.device)
    print(f"balanced accuracy {report['balanced_accuracy']:.4f}  accuracy {report['accuracy']:.4f}  "
          f"macro AUC {report['macro_auc'] or float('nan'):.4f}  melanoma sensitivity "
          f"{report['melanoma_sensitivity'] or 0:.4f}  ({report['n_images']} images)\nReport: {out / 'report.md'}")
    return 0
