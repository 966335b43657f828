"""Class probabilities for a user's own images, of any size or mode, from any classifier: images decoded in
threads ahead of the network, answers written batch by batch as they are known.

An unreadable file gets a message of its own; every other image still gets its answer.
"""

from __future__ import annotations

import csv
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from lesionkit import LesionkitError
from lesionkit.data.images import IMAGE_SUFFIXES, load_image
from lesionkit.serve.classifier import Classifier, probabilities

# Threads that decode and frame images while the network works: Pillow and NumPy release the GIL.
DECODERS = min(8, os.cpu_count() or 1)


def progress(total: int, tta: bool) -> tqdm:
    """A progress bar in images for runs long enough to want one (shown after a second, gone when done)."""
    return tqdm(total=total, desc="Predicting" + (", 8 views each" if tta else ""), unit="img", delay=1,
                leave=False)


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


def predict_paths(classifier: Classifier, paths: list[Path], batch_size: int = 16,
                  tta: bool = False, emit: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], list[str]]:
    """One ``{"image", "prediction", "probabilities"}`` record per readable image, and one error per other.

    ``tta`` averages the probabilities of eight flipped and rotated views (:mod:`lesionkit.serve.classifier`);
    ``emit``, when given, receives each batch's records as soon as they are known.
    """
    results, errors, pending = [], [], []

    def prepare(path: Path):
        try:
            return path, classifier.transform(load_image(path)), None
        except LesionkitError as err:
            return path, None, str(err)

    def flush():
        scored = probabilities(classifier, np.stack([image for _, image in pending]), tta)
        batch = []
        for (path, _), row in zip(pending, scored.tolist(), strict=True):
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
