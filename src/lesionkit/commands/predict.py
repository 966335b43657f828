"""``lesionkit predict``: class probabilities for your own images, each with an out-of-distribution flag, a
melanoma referral and, with ``--coverage``, a prediction set (:mod:`lesionkit.serve.answer`).

With ``--backend onnx`` nothing of PyTorch is imported: onnxruntime, NumPy and Pillow frame and score the images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from lesionkit import LesionkitError
from lesionkit.evaluate.record import refit_command
from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default
from lesionkit.serve.answer import check_coverage, missing_parts
from lesionkit.serve.ensemble import load_torch_classifier, manifest_for
from lesionkit.serve.onnx_classifier import OnnxClassifier, onnx_path_for
from lesionkit.serve.predict import Output, collect_images, predict_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    add_checkpoint_argument(parser)
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average 8 flips and 90-degree rotations (8x slower; with "
                             "--backend onnx, the file of `lesionkit export --tta`); the prediction set, the "
                             "out-of-distribution flag and the referral stay on the plain view they were fitted on")
    parser.add_argument("--coverage", type=float, metavar="C",
                        help="add each image's prediction set: the classes that hold the true one for a share C of "
                             "images like the validation part (e.g. 0.9; split conformal, APS)")
    clinical = parser.add_argument_group("clinical metadata, for a model trained with model.metadata (optional: "
                                         "without it the model answers as for a patient it knows nothing of)")
    clinical.add_argument("--age", help="the patient's age in years, for every image given")
    clinical.add_argument("--sex", help="female or male, for every image given")
    clinical.add_argument("--site", help="the body site (localization), e.g. back, face, lower extremity")
    clinical.add_argument("--metadata", type=Path, metavar="CSV",
                          help="per-image values: a CSV with image_id (the file name without its suffix) and any of "
                               "age, sex, localization")
    parser.add_argument("--backend", choices=("torch", "onnx"),
                        help="onnx: onnxruntime on the file `lesionkit export` wrote (the .onnx beside X.ckpt): "
                             "starts without loading PyTorch and runs about twice as fast per image on a CPU "
                             "(default: onnx for --checkpoint X.onnx, else torch)")


def load_classifier(checkpoint: Path, backend: str | None, device: str, tta: bool):
    """The classifier ``--backend`` names (by default, the one the checkpoint's suffix suggests): for an ensemble
    manifest ``RUN/ensemble.json``, its members under PyTorch, or under onnxruntime the one graph that `lesionkit
    export` wrote of them all (``RUN/ensemble.onnx``)."""
    if (backend or ("onnx" if checkpoint.suffix == ".onnx" else "torch")) == "torch":
        return load_torch_classifier(checkpoint, device)  # torch and timm are imported only then
    classifier = OnnxClassifier(onnx_path_for(checkpoint))
    height, width = classifier.preprocessing.height, classifier.preprocessing.width
    if tta and height != width and not classifier.meta.get("turned"):
        raise LesionkitError(f"--tta turns images by 90 degrees, from {height}x{width} to {width}x{height}, and "
                             f"this export serves {height}x{width} only: export it with `lesionkit export --tta`, "
                             f"or predict with PyTorch (--backend torch and the .ckpt)")
    return classifier


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
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if "image_id" not in columns or not columns & set(encoding.fields):
        raise LesionkitError(f"--metadata {path} needs an image_id column and one or more of "
                             f"{', '.join(encoding.fields)}; it has {', '.join(sorted(columns)) or 'no header'}")
    table = {row["image_id"].strip(): {f: row.get(f) for f in encoding.fields if f in columns} for row in rows}
    encoding.encode({"image_id": list(table), **table_columns(table)}, len(table), where=f"--metadata {path}")
    return table


def table_columns(table: dict[str, dict]) -> dict[str, list]:
    fields = sorted({f for values in table.values() for f in values})
    return {f: [values.get(f) for values in table.values()] for f in fields}


def run(args: argparse.Namespace) -> int:
    args.checkpoint = checkpoint_or_default(args.checkpoint, onnx=args.backend == "onnx")
    args.checkpoint = manifest_for(args.checkpoint) or args.checkpoint  # an ensemble's folder: its manifest
    classifier = load_classifier(args.checkpoint, args.backend, args.device, args.tta)
    if args.coverage is not None:
        check_coverage(classifier, args.coverage, str(args.checkpoint))
    missing = missing_parts(classifier)
    if missing:
        print(f"warning: {args.checkpoint} has {' and '.join(missing)}: out_of_distribution and refer are left "
              f"blank. Fit them with {refit_command(args.checkpoint.with_suffix('.ckpt'))}"
              + (" and export again" if isinstance(classifier, OnnxClassifier) else ""), file=sys.stderr)
    paths = collect_images(args.images)
    metadata = metadata_source(args, classifier, paths)
    output = Output(args.format, classifier.classes, sys.stdout, paths, args.coverage, classifier.calibration.melanoma)
    try:
        _, errors = predict_paths(classifier, paths, args.batch_size, args.tta, emit=output.write,
                                  coverage=args.coverage, metadata=metadata)
    finally:
        output.close()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0
