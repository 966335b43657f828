"""Class probabilities for a user's own images, of any size or mode, from any classifier, with when not to take
them at their word (:mod:`lesionkit.serve.answer`): images decoded in threads ahead of the network, answers
written batch by batch as they are known.

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
from lesionkit.data.clinical import known
from lesionkit.data.images import IMAGE_SUFFIXES, load_image
from lesionkit.serve.answer import assess_batch
from lesionkit.serve.classifier import Classifier

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


def predict_paths(classifier: Classifier, paths: list[Path], batch_size: int = 16, tta: bool = False,
                  emit: Callable[[list[dict]], None] | None = None, coverage: float | None = None,
                  metadata: Callable[[Path], dict] | None = None) -> tuple[list[dict], list[str]]:
    """One record per readable image, ``{"image"}`` and the fields of :func:`lesionkit.serve.answer.assess_batch`
    (``prediction_set`` with ``coverage``), and one error per other.

    ``tta`` averages the probabilities of eight flipped and rotated views (:mod:`lesionkit.serve.classifier`);
    ``emit``, when given, receives each batch's records as soon as they are known. For a model that reads
    clinical metadata, ``metadata`` gives an image's values (``{"age": 55, "sex": "female", ...}``, any subset),
    and each record says which it used (``"metadata"``, None where it had none).
    """
    results, errors, pending = [], [], []

    def prepare(path: Path):
        try:
            return path, classifier.transform(load_image(path)), None
        except LesionkitError as err:
            return path, None, str(err)

    encoding = classifier.encoding

    def flush():
        given = [used_metadata(metadata(path) if metadata else {}) for path, _ in pending] if encoding else []
        rows = encoding.encode({f: [g.get(f) for g in given] for f in encoding.fields}, len(given)) if given else None
        answers = assess_batch(classifier, np.stack([image for _, image in pending]), tta, coverage, rows)
        batch = [{"image": str(path), **answer} for (path, _), answer in zip(pending, answers, strict=True)]
        for record, values in zip(batch, given):
            record["metadata"] = values or None
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


def used_metadata(values: dict) -> dict:
    """The values of ``values`` that say something (blank and ``unknown`` are left out), a level as the model reads
    it: ``--sex Female`` answers with ``female``."""
    return {k: v.strip().lower() if isinstance(v, str) and k != "age" else v for k, v in values.items() if known(v)}


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


# The answer's fields after the probabilities, in table and CSV order.
DECISIONS = ("out_of_distribution", "ood_score", "refer", "refer_threshold", "refer_sensitivity")


def _cell(value, digits: int = 4) -> str:
    """A decision in a table or CSV cell: true/false as in JSON, blank where the record has none."""
    return "" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:.{digits}g}"


def described(metadata: dict | None) -> str:
    """The clinical values an answer used, for the table: ``age 55, sex female``, or ``-`` for none."""
    return ", ".join(f"{k} {v}" for k, v in metadata.items()) if metadata else "-"


class Output:
    """Records written as they come, so that a long run shows its answers at once and an interrupted one keeps
    them; ``close()`` ends the output (the JSON list's bracket), also after Ctrl-C.

    After the class probabilities, table and CSV show the out-of-distribution flag and score, the referral (the
    table's column names its threshold and sensitivity, the CSV has them as columns), with ``coverage`` the
    prediction set (classes joined by ``;`` in CSV) and, for a model that reads the clinical ``fields``, the values
    it was given (a column per field in CSV, blank where unknown; one column in the table)."""

    def __init__(self, fmt: str, classes: list[str], stream, paths: list[Path], coverage: float | None = None,
                 melanoma: dict | None = None, fields: tuple[str, ...] = ()):
        self.fmt, self.classes, self.stream, self.count, self.coverage = fmt, classes, stream, 0, coverage
        self.fields = tuple(fields)
        # The set's column is padded only where a column follows it.
        self.set_width = max(len(f"set@{coverage:g}"), len(",".join(classes))) if coverage and fields else 0
        # The table's first column fits every path given, known before any answer.
        self.width = max([len("image")] + [len(str(path)) for path in paths])
        self.refer = f"refer(mel>={melanoma['threshold']:.3g}@sens{melanoma['sensitivity']:g})" if melanoma else "refer"
        if fmt == "csv":
            self.csv = csv.writer(stream)
            self.csv.writerow(["image", "prediction", *classes, *DECISIONS] + (["prediction_set"] if coverage else [])
                              + list(self.fields))
        elif fmt == "table":
            stream.write(f"{'image':<{self.width}}  {'prediction':<10}  " + "  ".join(f"{c:>6}" for c in classes)
                         + f"  {'ood':>5}  {'ood_score':>9}  {self.refer:>5}"
                         + (f"  {f'set@{coverage:g}':<{self.set_width}}" if coverage else "")
                         + ("  metadata" if self.fields else "")
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
                decisions = (_cell(r[k], 8) for k in DECISIONS)
                given = r.get("metadata") or {}
                self.csv.writerow([r["image"], r["prediction"], *scores, *decisions]
                                  + ([";".join(r["prediction_set"])] if self.coverage else [])
                                  + [given.get(f, "") for f in self.fields])
            else:
                self.stream.write(f"{r['image']:<{self.width}}  {r['prediction']:<10}  "
                                  + "  ".join(f"{r['probabilities'][c]:6.3f}" for c in self.classes)
                                  + f"  {_cell(r['out_of_distribution']) or '-':>5}  {_cell(r['ood_score']) or '-':>9}"
                                  + f"  {_cell(r['refer']) or '-':>{len(self.refer)}}"
                                  + (f"  {','.join(r['prediction_set']):<{self.set_width}}" if self.coverage else "")
                                  + (f"  {described(r.get('metadata'))}" if self.fields else "") + "\n")
            self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()
