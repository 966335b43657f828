"""``lesionkit predict``: class probabilities for your own images, each with an out-of-distribution flag, a
melanoma referral and, with ``--coverage``, a prediction set (:mod:`lesionkit.serve.answer`).

With ``--backend onnx`` nothing of PyTorch is imported: onnxruntime, NumPy and Pillow frame and score the images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionkit import LesionkitError
from lesionkit.serve.clinical_flags import add_clinical_arguments, metadata_source
from lesionkit.evaluate.record import refit_command
from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default
from lesionkit.serve.answer import check_coverage, missing_parts
from lesionkit.serve.device import add_device_argument, check_device
from lesionkit.serve.ensemble import load_torch_classifier
from lesionkit.serve.onnx_classifier import OnnxClassifier, load_export
from lesionkit.serve.predict import Output, collect_images, predict_paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    add_checkpoint_argument(parser)
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=int, default=16)
    add_device_argument(parser)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average 8 flips and 90-degree rotations (8x slower; with "
                             "--backend onnx, the file of `lesionkit export --tta`); the prediction set, the "
                             "out-of-distribution flag and the referral stay on the plain view they were fitted on")
    parser.add_argument("--coverage", type=float, metavar="C",
                        help="add each image's prediction set: the classes that hold the true one for a share C of "
                             "images like the validation part (e.g. 0.9; split conformal, APS)")
    add_clinical_arguments(parser)
    parser.add_argument("--backend", choices=("torch", "onnx"),
                        help="onnx: onnxruntime on the file `lesionkit export` wrote (the .onnx beside X.ckpt): "
                             "starts without loading PyTorch and runs about twice as fast per image on a CPU "
                             "(default: onnx for --checkpoint X.onnx, else torch)")


def backend_for(checkpoint: Path, backend: str | None) -> str:
    """``--backend``, or by default the one the checkpoint's suffix suggests."""
    return backend or ("onnx" if checkpoint.suffix == ".onnx" else "torch")


def load_classifier(checkpoint: Path, backend: str, device: str, tta: bool):
    """The classifier of ``backend``: for an ensemble manifest ``RUN/ensemble.json``, its members under PyTorch, or
    under onnxruntime the one graph that `lesionkit export` wrote of them all (``RUN/ensemble.onnx``)."""
    if backend == "torch":
        return load_torch_classifier(checkpoint, device)  # torch and timm are imported only then
    classifier = load_export(checkpoint)
    height, width = classifier.preprocessing.height, classifier.preprocessing.width
    if tta and height != width and not classifier.meta.get("turned"):
        raise LesionkitError(f"--tta turns images by 90 degrees, from {height}x{width} to {width}x{height}, and "
                             f"this export serves {height}x{width} only: export it with `lesionkit export --tta`, "
                             f"or predict with PyTorch (--backend torch and the .ckpt)")
    return classifier


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise LesionkitError(f"--batch-size {args.batch_size}: must be at least 1 (default 16)")
    args.checkpoint = checkpoint_or_default(args.checkpoint, onnx=args.backend == "onnx")
    backend = backend_for(args.checkpoint, args.backend)
    if backend == "torch":
        check_device(args.device)
    elif args.device != "cpu":  # the session is made for the CPU only (OnnxClassifier)
        raise LesionkitError(f"--device {args.device}: onnxruntime runs on the CPU here; leave out --device, or "
                             f"predict with PyTorch (--backend torch and the .ckpt)")
    classifier = load_classifier(args.checkpoint, backend, args.device, args.tta)
    if args.coverage is not None:
        check_coverage(classifier, args.coverage, str(args.checkpoint))
    missing = missing_parts(classifier)
    if missing:
        print(f"warning: {args.checkpoint} has {' and '.join(missing)}: out_of_distribution and refer are left "
              f"blank. Fit them with {refit_command(args.checkpoint.with_suffix('.ckpt'))}"
              + (" and export again" if isinstance(classifier, OnnxClassifier) else ""), file=sys.stderr)
    paths = collect_images(args.images)
    metadata = metadata_source(args, classifier, paths)
    output = Output(args.format, classifier.classes, sys.stdout, paths, args.coverage, classifier.calibration.melanoma,
                    classifier.encoding.fields if classifier.encoding else ())
    try:
        _, errors = predict_paths(classifier, paths, args.batch_size, args.tta, emit=output.write,
                                  coverage=args.coverage, metadata=metadata)
    finally:
        output.close()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0
