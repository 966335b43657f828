"""``lesionkit explain``: Grad-CAM heat maps of your own images, where the network looked for its answer.

Per image, ``OUT/<stem>_<method>_<class>.png`` shows the image as the network saw it beside the map laid over
it, and ``OUT/explanations.jsonl`` gets one line. An unreadable file gets a message of its own; every other image
still gets its answer.

Explaining into the folder of an earlier run adds to it: a new entry replaces an earlier one of the same image,
method and class (and its picture), every other earlier entry and picture stays. The file is rewritten whole,
never half-written, every two seconds while images are done and when the run ends, Ctrl-C included (a killed
process loses at most the last two seconds' entries); a run that explains nothing changes nothing. Entries are
matched on the image path as given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.serve.clinical_flags import add_clinical_arguments, metadata_source
from lesionkit.data.images import load_image
from lesionkit.files import atomic_write, atomic_write_text, file_above
from lesionkit.model.shipped import add_checkpoint_argument, checkpoint_or_default
from lesionkit.serve.device import add_device_argument, check_device
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
    add_device_argument(parser)
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


LINES = "explanations.jsonl"
SAVE_EVERY = 2.0  # seconds between rewrites of LINES: each rewrites the whole file, of thousands of lines maybe


def check_out(out: Path) -> None:
    """``--out`` is a folder or can become one: said before the model loads, not as a traceback after."""
    if out.exists() and not out.is_dir():
        raise LesionkitError(f"--out {out} is a file: give a folder for the pictures and {LINES} (a new one, or "
                             f"that of an earlier explain run, whose explanations are kept)")
    above = file_above(out)
    if above is not None:
        raise LesionkitError(f"--out {out} cannot be a folder: {above} is a file; give a folder elsewhere")


def identity(line: str) -> tuple | str:
    """What an entry explains: its image, method and class. A line that is no entry (edited by hand, say) is its
    own identity: nothing replaces it, so it is kept as it is."""
    try:
        entry = json.loads(line)
        return tuple(str(entry[field]) for field in ("image", "method", "class"))
    except (ValueError, TypeError, KeyError):
        return line


class Explanations:
    """``OUT/explanations.jsonl``: the lines of earlier runs, less those replaced by an entry of this run, then
    this run's entries."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
        except (UnicodeDecodeError, IsADirectoryError):
            raise LesionkitError(f"{path} is not a file of explanations (lines of JSON): move it away, or give "
                                 f"another --out") from None
        self.earlier = [(identity(line), line) for line in text.splitlines() if line.strip()]
        # The pictures of earlier entries, by name without .png: only an entry of the same identity overwrites one.
        self.owners = {}
        for key, line in self.earlier:
            overlay = json.loads(line).get("overlay") if isinstance(key, tuple) else None
            if isinstance(overlay, str):
                self.owners[overlay.removesuffix(".png")] = key
        self.named, self.new, self.saved = {}, {}, time.monotonic()

    def name(self, key: tuple, base: str) -> str:
        """The picture's name for the entry ``key``: ``base``, or ``base-2``, ``base-3``, ... where an image of the
        same name in another folder, now or in an earlier run, has it."""
        if key in self.named:  # the same image given twice
            return self.named[key]
        taken = set(self.named.values())
        candidate, n = base, 1
        while candidate in taken or self.owners.get(candidate, key) != key:
            n += 1
            candidate = f"{base}-{n}"
        self.named[key] = candidate
        return candidate

    def add(self, key: tuple, entry: dict) -> None:
        self.new[key] = json.dumps(entry)
        if time.monotonic() - self.saved >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        if self.new:  # a run that explained nothing leaves the file as it was
            kept = [line for key, line in self.earlier if key not in self.new]
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept + list(self.new.values())),
                              "explanations")
            self.saved = time.monotonic()


def write_png(pixels: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), "picture")


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    check_out(args.out)
    lines = Explanations(args.out / LINES)
    args.checkpoint = checkpoint_or_default(args.checkpoint)
    classifier = load_classifier(args.checkpoint, args.device)
    if args.class_name is not None and args.class_name not in classifier.classes:
        raise LesionkitError(f"--class {args.class_name}: not a class of {args.checkpoint}; use one of "
                             f"{', '.join(classifier.classes)}")
    paths = collect_images(args.images)
    metadata = metadata_source(args, classifier, paths)
    errors = []
    try:
        for path in paths:
            values = used_metadata(metadata(path) if metadata else {})
            try:
                explanation = explain(classifier, load_image(path), args.method, args.class_name, values)
            except LesionkitError as err:
                errors.append(str(err))
                print(f"error: {err}", file=sys.stderr)
                continue
            key = str(path), explanation.method, explanation.class_name
            name = lines.name(key, f"{path.stem}_{args.method}_{explanation.class_name}")
            args.out.mkdir(parents=True, exist_ok=True)  # not before: a run that explains nothing leaves no folder
            write_png(side_by_side(explanation), args.out / f"{name}.png")
            line = {"image": str(path), "class": explanation.class_name, "probability": explanation.probability,
                    "method": explanation.method, "layer": explanation.layer,
                    "faithfulness_metric": explanation.faithfulness_metric, "faithfulness": explanation.faithfulness,
                    "overlay": f"{name}.png"}
            if classifier.encoding is not None:
                line["metadata"] = values or None  # as predict's records say what they used
            lines.add(key, line)
    finally:  # Ctrl-C too: what is done is kept
        lines.save()
    print(f"{len(paths) - len(errors)} of {len(paths)} image(s) explained in {args.out}", file=sys.stderr)
    return 1 if errors else 0
