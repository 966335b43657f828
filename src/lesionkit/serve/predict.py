"""``lesionkit predict``: class probabilities for a user's own images, of any size or mode.

An unreadable file gets a message on stderr and the exit code 1; every other image still gets its answer.
With ``--backend onnx`` nothing of PyTorch is imported (:mod:`lesionkit.serving`): one image takes 0.2 s from
the command line instead of 4 (measured on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from tqdm import tqdm

from lesionkit import LesionkitError
from lesionkit.images import IMAGE_SUFFIXES, load_image
from lesionkit.serving import OnnxClassifier, onnx_path_for

if TYPE_CHECKING:  # imports torch and timm: only the torch backend loads it, when it runs
    from lesionkit.inference import Classifier

# Threads that decode and frame images while the network works: Pillow and NumPy release the GIL.
DECODERS = min(8, os.cpu_count() or 1)


def progress(total: int, tta: bool) -> tqdm:
    """A progress bar in images for runs long enough to want one (shown after a second, gone when done)."""
    return tqdm(total=total, desc="Predicting" + (", 8 views each" if tta else ""), unit="img", delay=1,
                leave=False)


def batch_probabilities(classifier: Classifier | OnnxClassifier, images: list, tta: bool) -> np.ndarray:
    """``(n, classes)`` probabilities of transformed ``images``, averaged over the eight views with ``tta``."""
    if isinstance(classifier, OnnxClassifier):  # NumPy through and through
        return classifier.probabilities(np.stack(images), tta)
    import torch

    from lesionkit.tta import probabilities
    return probabilities(classifier, torch.stack(images), tta).numpy()


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given, and image files anywhere under given folders, in name order."""
    paths = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.exists():
            paths.append(item)
        else:
            raise LesionkitError(f"{item} does not exist: give image files or folders")
    if not paths:
        raise LesionkitError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, inputs))}")
    return paths


def predict_paths(classifier: Classifier | OnnxClassifier, paths: list[Path], batch_size: int = 16,
                  tta: bool = False, emit: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], list[str]]:
    """One ``{"image", "prediction", "probabilities"}`` record per readable image, and one error per other.

    ``tta`` averages the probabilities of eight flipped and rotated views (:mod:`lesionkit.tta`); ``emit``, when
    given, receives each batch's records as soon as they are known.
    """
    results, errors, pending = [], [], []

    def prepare(path: Path):
        try:
            return path, classifier.transform(load_image(path)), None
        except LesionkitError as err:
            return path, None, str(err)

    def flush():
        probabilities = batch_probabilities(classifier, [image for _, image in pending], tta)
        batch = []
        for (path, _), row in zip(pending, probabilities.tolist(), strict=True):
            scores = dict(zip(classifier.classes, row, strict=True))
            batch.append({"image": str(path), "prediction": max(scores, key=scores.get), "probabilities": scores})
        pending.clear()
        results.extend(batch)
        if emit:
            emit(batch)

    with ThreadPoolExecutor(DECODERS) as pool, progress(len(paths), tta) as bar:
        for path, image, error in ahead(pool, prepare, paths, 2 * batch_size):
            if error:
                errors.append(error)
            else:
                pending.append((path, image))
            if len(pending) == batch_size:
                flush()
            bar.update()
        if pending:
            flush()
    return results, errors


def ahead(pool: ThreadPoolExecutor, function: Callable, items: list, lookahead: int) -> Iterator:
    """``function(item)`` for each item in order, computed by ``pool`` up to ``lookahead`` items ahead: the
    decoding of the next images overlaps the network's work on this batch, and memory stays bounded."""
    running = deque()
    for item in items:
        running.append(pool.submit(function, item))
        if len(running) > lookahead:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


class Output:
    """Records written as they come, so that a long run shows its answers at once and an interrupted one keeps
    them; ``close()`` ends the output (the JSON list's bracket), also after Ctrl-C."""

    def __init__(self, fmt: str, classes: list[str], stream, paths: list[Path]):
        self.fmt, self.classes, self.stream, self.count = fmt, classes, stream, 0
        # The table's first column fits every path given, known before any answer.
        self.width = max([len("image")] + [len(str(path)) for path in paths])
        if fmt == "csv":
            self.csv = csv.writer(stream)
            self.csv.writerow(["image", "prediction", *classes])
        elif fmt == "table":
            stream.write(f"{'image':<{self.width}}  {'prediction':<10}  " + "  ".join(f"{c:>6}" for c in classes)
                         + "\n")
        else:
            stream.write("[")

    def write(self, records: list[dict]) -> None:
        for r in records:
            if self.fmt == "json":  # the layout of json.dump(all_records, indent=2), one record at a time
                item = "\n".join("  " + line for line in json.dumps(r, indent=2).splitlines())
                self.stream.write(("," if self.count else "") + "\n" + item)
            elif self.fmt == "csv":
                scores = (f"{r['probabilities'][c]:.6f}" for c in self.classes)
                self.csv.writerow([r["image"], r["prediction"], *scores])
            else:
                self.stream.write(f"{r['image']:<{self.width}}  {r['prediction']:<10}  "
                                  + "  ".join(f"{r['probabilities'][c]:6.3f}" for c in self.classes) + "\n")
            self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint written by `lesionkit train`")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average 8 flips and 90-degree rotations (8x slower; with "
                             "--backend onnx, the file of `lesionkit export --tta`)")
    parser.add_argument("--backend", choices=("torch", "onnx"),
                        help="onnx: onnxruntime on the file `lesionkit export` wrote (the .onnx beside X.ckpt): "
                             "starts without loading PyTorch and runs about twice as fast per image on a CPU "
                             "(default: onnx for --checkpoint X.onnx, else torch)")


def run(args: argparse.Namespace) -> int:
    backend = args.backend or ("onnx" if args.checkpoint.suffix == ".onnx" else "torch")
    if backend == "onnx":
        classifier = OnnxClassifier(onnx_path_for(args.checkpoint))
        height, width = classifier.preprocessing.height, classifier.preprocessing.width
        if args.tta and height != width and not classifier.meta.get("turned"):
            raise LesionkitError(f"--tta turns images by 90 degrees, from {height}x{width} to {width}x{height}, and "
                                 f"this export serves {height}x{width} only: export it with `lesionkit export --tta`, "
                                 f"or predict with PyTorch (--backend torch and the .ckpt)")
    else:
        from lesionkit.inference import Classifier
        classifier = Classifier.load(args.checkpoint, args.device)
    paths = collect_images(args.images)
    output = Output(args.format, classifier.classes, sys.stdout, paths)
    try:
        _, errors = predict_paths(classifier, paths, args.batch_size, args.tta, emit=output.write)
    finally:
        output.close()
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0
