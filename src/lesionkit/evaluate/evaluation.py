"""The report a reviewer can check, for any checkpoint on any labelled images.

The report holds the headline with bootstrap intervals, per-class and melanoma operating-point metrics,
calibration before and after temperature scaling, how the prediction sets, out-of-distribution flags and
melanoma referral of the checkpoint's record fare (:mod:`lesionkit.evaluate.decisions`), subgroups, pictures,
the data used and every setting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from lesionkit import LesionkitError
from lesionkit.data.cache import ImageCache, find_cache
from lesionkit.data.datasets import ImageDataset, make_loader
from lesionkit.data.split import PARTS
from lesionkit.evaluate.bootstrap import BootstrapSettings, intervals
from lesionkit.evaluate.gallery import write_gallery
from lesionkit.evaluate.calibration import reliability_bins
from lesionkit.evaluate.decisions import REFERRAL_SENSITIVITY, decision_sections, fit_and_save_calibration
from lesionkit.evaluate.metrics import ECE_BINS, brier_score, expected_calibration_error
from lesionkit.evaluate.plots import report_figures
from lesionkit.evaluate.render import write_report
from lesionkit.evaluate.report import Report, build_report, headline, lesion_level, write_predictions
from lesionkit.evaluate.subgroups import subgroup_metrics
from lesionkit.serve.classifier import VIEW_NAMES, Classifier, average_probabilities, view_outputs
from lesionkit.serve.ensemble import load_torch_classifier, manifest_for, run_folder
from lesionkit.serve.torch_classifier import TorchClassifier


@dataclass
class Images:
    """The labelled images to evaluate and where they came from.

    ``frame`` has ``image_id``, ``path`` and ``dx``, optionally ``lesion_id`` and metadata (``age``, ``sex``,
    ``localization``). ``cache``: training's image cache; or ``trained_on``, the run's whole split, whose cache is
    read if training left one. Without either, each image is read once, uncached.
    """

    frame: pd.DataFrame
    title: str
    data: dict = field(default_factory=dict)
    """Where the images came from (folder, labels file and its MD5, ...), for the report."""
    skipped: list[str] = field(default_factory=list)
    """Ids of listed images that are missing or unreadable."""
    unlabelled: list[str] = field(default_factory=list)
    """Ids of images in the folder that no label names."""
    cache: ImageCache | None = None
    trained_on: pd.DataFrame | None = None


@dataclass(frozen=True)
class EvalSettings:
    """How the images are scored."""

    batch_size: int = 32
    workers: int | None = None
    """Data loading processes; None: one per CPU core, at most 8."""
    device: str = "cpu"
    tta: bool = False
    bootstrap: BootstrapSettings | None = BootstrapSettings()
    """None skips the intervals."""
    gallery: bool = True
    """Per class, the most confident right and wrong image with its Grad-CAM map (at most 14 maps)."""


def evaluate_frame(checkpoint: Path, images: Images, out_dir: Path, settings: EvalSettings = EvalSettings(),
                   fit_temperature_here: bool = False, melanoma_sensitivity: float | None = None) -> Report:
    """Score ``checkpoint`` on ``images``; write the report into ``out_dir`` and return it.

    ``fit_temperature_here`` fits the whole calibration record (T, conformal scores, out-of-distribution detector,
    melanoma threshold for ``melanoma_sensitivity``, by default the record's own or 0.90) on these images and
    saves it beside the checkpoint: pass it for a validation part only, never for data that the report is meant
    to judge.
    """
    checkpoint, frame, tta = Path(checkpoint), images.frame, settings.tta
    classifier = load_classifier(checkpoint, settings.device, fit_temperature_here)
    unknown = sorted(set(frame["dx"]) - set(classifier.classes))
    if unknown:
        raise LesionkitError(f"labels {', '.join(unknown)} are not classes of {checkpoint} ({classifier.classes})")
    cache = images.cache
    if cache is None and images.trained_on is not None:
        cache_dir = classifier.meta.get("config", {}).get("data", {}).get("cache_dir")
        cache = find_cache(images.trained_on, classifier.preprocessing, cache_dir)
    encoding = classifier.encoding

    dataset = ImageDataset.from_frame(frame, tensor_transform(classifier), cache, encoding)
    # (images, views, classes), the plain view's (images, width), and the logits without metadata for a model that
    # reads it.
    logits, features, unknown_logits = loader_outputs(
        classifier, make_loader(dataset, settings.batch_size, train=False, workers=settings.workers), tta,
        unknown_too=encoding is not None)
    labels = np.array([classifier.classes.index(d) for d in frame["dx"]])
    lesions_known = "lesion_id" in frame and frame["lesion_id"].notna().all()
    groups = (frame["lesion_id"] if lesions_known else frame["image_id"]).to_numpy()
    calibration = classifier.calibration
    if fit_temperature_here:
        sensitivity = melanoma_sensitivity or (calibration.melanoma or {}).get("sensitivity") or REFERRAL_SENSITIVITY
        calibration = fit_and_save_calibration(checkpoint, logits[:, 0], features, labels, groups,
                                               classifier.classes, images.title, sensitivity)
    temperature, source = calibration.temperature, calibration.source
    raw = average_probabilities(logits)
    calibrated = average_probabilities(logits, temperature) if temperature else None
    probabilities = raw if calibrated is None else calibrated

    report = build_report(labels, probabilities, classifier.classes)
    report.ece, report.brier, report.calibration = calibration_section(
        labels, {"before": raw, "after": calibrated}, temperature, source, fit_temperature_here)
    report.conformal, report.out_of_distribution, report.referral = decision_sections(
        labels, logits[:, 0], features, calibration, classifier.classes, fit_temperature_here)
    if settings.bootstrap:
        drawn = intervals(labels, probabilities, classifier.classes, groups, settings.bootstrap)
        report.intervals, report.bootstrap = drawn["intervals"], drawn["bootstrap"]
        report.bootstrap["unit"] = "lesion" if lesions_known else "image"
    if encoding is not None:
        without = average_probabilities(unknown_logits, temperature)
        report.metadata = {"fields": list(encoding.fields), "given": encoding.describe(frame),
                           "with": headline(labels, probabilities, classifier.classes),
                           "without": headline(labels, without, classifier.classes)}
    report.subgroups = subgroup_metrics(frame, labels, probabilities, classifier.classes)
    if lesions_known:
        report.lesion_level = lesion_level(labels, probabilities, groups, classifier.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = run_folder(checkpoint)
    bins = report.calibration["reliability"]
    report.figures = report_figures(
        out_dir, labels, probabilities, classifier.classes,
        {f"{k} temperature scaling (ECE {100 * report.ece[k]:.1f}%)": b for k, b in bins.items()},
        run_dir / "metrics.csv")
    # Grad-CAM needs the PyTorch network: an export's report has no gallery.
    explainable = settings.gallery and isinstance(classifier, TorchClassifier)
    report.gallery = write_gallery(classifier, frame, probabilities, out_dir) if explainable else {}
    report.context = {"checkpoint": str(checkpoint), "model": classifier.meta["model_name"],
                      "configuration": "TTA, 8 flips and rotations averaged" if tta else "plain (no TTA)",
                      "images": len(frame), "lesions": int(pd.unique(groups).size) if lesions_known else "unknown"}
    report.data = {**images.data, **describe_images(frame, classifier.classes, run_dir)}
    report.settings = {
        "checkpoint": str(checkpoint.resolve()), "model": classifier.meta["model_name"],
        "preprocessing": classifier.preprocessing.to_dict(), "tta": tta, "tta_views": list(VIEW_NAMES) if tta else
        ["identity"], "temperature": temperature, "bootstrap": report.bootstrap, "batch_size": settings.batch_size,
        "device": settings.device, "training_config": classifier.meta.get("config")}
    report.skipped_images = list(images.skipped)
    report.unlabelled_images = list(images.unlabelled)
    write_report(report, out_dir, images.title)
    write_predictions(frame, probabilities, classifier.classes, out_dir / "predictions.csv")
    return report


def load_classifier(checkpoint: Path, device: str, fitting: bool) -> Classifier:
    """PyTorch's classifier of a checkpoint or of an ensemble manifest (``RUN/ensemble.json``), or onnxruntime's
    of an export (``X.onnx``: to measure a quantised file), whose record is fitted on its checkpoint, never on
    itself; an ensemble's is fitted on its folds' out-of-fold predictions, when ``train --folds`` ends."""
    if fitting and manifest_for(checkpoint) is not None:
        raise LesionkitError(f"{checkpoint} is an ensemble: its record is fitted on its folds' out-of-fold "
                             f"predictions by `lesionkit train --folds K --out RUN --resume`, not on one part")
    if checkpoint.suffix != ".onnx":
        return load_torch_classifier(checkpoint, device)
    if fitting:
        raise LesionkitError(f"{checkpoint} is an export: fit the record on the checkpoint it was exported from "
                             f"({checkpoint.with_suffix('.ckpt')}), then export again")
    from lesionkit.serve.onnx_classifier import load_export
    return load_export(checkpoint)


class _FromArray:
    """A classifier's NumPy framing as a transform that gives tensors (picklable, for loader processes)."""

    def __init__(self, classifier: Classifier):
        self.transform = classifier.transform

    def __call__(self, image) -> torch.Tensor:
        return torch.from_numpy(self.transform(image))


def tensor_transform(classifier: Classifier):
    """The image-to-tensor transform of ``classifier``: torchvision's for PyTorch, the NumPy framing otherwise."""
    return getattr(classifier, "eval_transform", None) or _FromArray(classifier)


def loader_outputs(classifier: Classifier, loader, tta: bool, unknown_too: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(n, views, classes)`` logits and the plain view's ``(n, width)`` pooled features for every image a loader
    yields (with the metadata it yields), in order, from the same forward passes; with ``unknown_too``, the logits
    with every metadata field unknown too (:func:`lesionkit.serve.classifier.view_outputs`), else None."""
    logits, features, unknown = [], [], []
    with tqdm(total=len(loader.dataset), desc="Evaluating" + (", 8 views each" if tta else ""), unit="img",
              delay=1, leave=False) as bar:
        for inputs, _ in loader:  # images, or (images, metadata) for a model that reads metadata
            batch, metadata = inputs if isinstance(inputs, (tuple, list)) else (inputs, None)
            outputs = view_outputs(classifier, batch.numpy(), tta, None if metadata is None else metadata.numpy(),
                                   unknown_too)
            logits.append(outputs.logits)
            features.append(outputs.ood_inputs)
            unknown.append(outputs.unknown_logits)
            bar.update(len(batch))
    return np.concatenate(logits), np.concatenate(features), np.concatenate(unknown) if unknown_too else None


def calibration_section(labels: np.ndarray, probabilities: dict[str, np.ndarray | None], temperature: float | None,
                        source: str | None, fitted_here: bool) -> tuple[dict, dict, dict]:
    """ECE and Brier score ``before`` and ``after`` temperature scaling (None without T), and the calibration
    record: the temperature, where it came from, and the reliability bins."""
    ece = {k: None if p is None else expected_calibration_error(labels, p) for k, p in probabilities.items()}
    brier = {k: None if p is None else brier_score(labels, p) for k, p in probabilities.items()}
    record = {"temperature": temperature, "source": source, "fitted_here": fitted_here, "n_bins": ECE_BINS,
              "reliability": {k: reliability_bins(labels, p, ECE_BINS) for k, p in probabilities.items()
                              if p is not None}}
    return ece, brier, record


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
