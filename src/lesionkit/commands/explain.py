"""``lesionkit explain``: Grad-CAM heat maps of your own images, where the network looked for its answer.

Per image, ``OUT/<stem>_<method>_<class>.png`` shows the image as the network saw it beside the map laid over
it, and ``OUT/explanations.jsonl`` gets one line, written as soon as the image is done. An unreadable file gets
a message of its own; every other image still gets its answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.serve.clinical_flags import add_clinical_arguments, metadata_source
from lesionkit.data.images import load_image
from lesionkit.files import atomic_write
from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default
from lesionkit.serve.explain import METHODS, Explanation, explain
from lesionkit.serve.predict import collect_images, used_metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    add_checkpoint_argument(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder for the pictures and explanations.jsonl")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="the class to explain (default: each image's predicted class)")
    parser.add_argument("--method", choices=list(METHODS), default="gradcam",
                        help="gradcam (default), gradcam++, or eigencam (the same map for every class, no gradients)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add_clinical_arguments(parser)


def load_classifier(checkpoint: Path, device: str):
    """The network to explain: the PyTorch classifier of ``checkpoint``. An ensemble is refused: Grad-CAM maps one
    network's gradients, and an average of its members' maps would explain no network that answers."""
    from lesionkit.serve.ensemble import manifest_for, read_manifest
    from lesionkit.serve.torch_classifier import TorchClassifier

    manifest = manifest_for(checkpoint)
    if manifest is not None:
        _, members = read_manifest(manifest)
        raise LesionkitError(f"{manifest} is an ensemble of {len(members)} networks, and Grad-CAM explains one: "
                             f"explain a member, e.g. --checkpoint {members[0]}")
    return TorchClassifier.load(checkpoint, device)


def side_by_side(explanation: Explanation) -> np.ndarray:
    """The framed image, a white gap of 4 pixels, then the overlay."""
    gap = np.full((explanation.framed.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([explanation.framed, gap, explanation.overlay], axis=1)


def unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when images of one name in different folders came first."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def write_png(pixels: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), "picture")


def run(args: argparse.Namespace) -> int:
    args.checkpoint = checkpoint_or_default(args.checkpoint)
    classifier = load_classifier(args.checkpoint, args.device)
    if args.class_name is not None and args.class_name not in classifier.classes:
        raise LesionkitError(f"--class {args.class_name}: not a class of {args.checkpoint}; use one of "
                             f"{', '.join(classifier.classes)}")
    paths = collect_images(args.images)
    metadata = metadata_source(args, classifier, paths)
    args.out.mkdir(parents=True, exist_ok=True)
    errors, taken = [], set()
    with (args.out / "explanations.jsonl").open("w", encoding="utf-8") as lines:
        for path in paths:
            values = used_metadata(metadata(path) if metadata else {})
            try:
                explanation = explain(classifier, load_image(path), args.method, args.class_name, values)
            except LesionkitError as err:
                errors.append(str(err))
                print(f"error: {err}", file=sys.stderr)
                continue
            name = unique(f"{path.stem}_{args.method}_{explanation.class_name}", taken)
            write_png(side_by_side(explanation), args.out / f"{name}.png")
            line = {"image": str(path), "class": explanation.class_name, "probability": explanation.probability,
                    "method": explanation.method, "layer": explanation.layer,
                    "faithfulness_metric": explanation.faithfulness_metric, "faithfulness": explanation.faithfulness,
                    "overlay": f"{name}.png"}
            if classifier.encoding is not None:
                line["metadata"] = values or None  # as predict's records say what they used
            lines.write(json.dumps(line) + "\n")
            lines.flush()  # each line as soon as its image is done: an interrupted run keeps what it finished
    print(f"{len(paths) - len(errors)} of {len(paths)} image(s) explained in {args.out}", file=sys.stderr)
    return 1 if errors else 0
