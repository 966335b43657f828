"""The report's pictures, as PNG files: confusion matrices, ROC and precision-recall curves, reliability
diagram, training curves.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never ``pyplot``: no global state,
no display needed, and safe in a server or a test. scikit-learn's ``*Display`` classes draw the curves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

DPI = 110


def _save(figure: Figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path.name


def confusion_matrices(labels: np.ndarray, predictions: np.ndarray, classes: list[str], path: Path) -> str:
    """Counts and row-normalised (each true class sums to 1: its recall is on the diagonal), side by side."""
    figure = Figure(figsize=(13, 5.5))
    panels = zip(figure.subplots(1, 2), (None, "true"), ("counts", "row-normalised (recall)"), strict=True)
    for ax, normalize, title in panels:
        ConfusionMatrixDisplay.from_predictions(
            labels, predictions, labels=range(len(classes)), display_labels=classes, normalize=normalize, ax=ax,
            colorbar=False, cmap="Blues", values_format="d" if normalize is None else ".2f")
        ax.set_title(f"Confusion matrix, {title}")
    return _save(figure, path)


def curves(labels: np.ndarray, probabilities: np.ndarray, classes: list[str], path: Path, kind: str) -> str:
    """One-vs-rest ROC (``kind="roc"``) or precision-recall (``"pr"``) curve per class present."""
    figure = Figure(figsize=(7, 6))
    ax = figure.subplots()
    display = RocCurveDisplay if kind == "roc" else PrecisionRecallDisplay
    for i, name in enumerate(classes):
        positives = labels == i
        if 0 < positives.sum() < len(labels):
            display.from_predictions(positives, probabilities[:, i], name=name, ax=ax)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision")
    ax.set_title("ROC curves, one class against the rest" if kind == "roc" else "Precision-recall curves")
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _save(figure, path)


def reliability(bins: dict[str, dict], path: Path) -> str:
    """Accuracy against confidence per bin, for each probability set (e.g. before and after temperature)."""
    figure = Figure(figsize=(6.5, 6))
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    for (label, b), marker in zip(bins.items(), "os^"):
        confidence = np.array([np.nan if v is None else v for v in b["confidence"]], dtype=float)
        accuracy = np.array([np.nan if v is None else v for v in b["accuracy"]], dtype=float)
        ax.plot(confidence, accuracy, marker=marker, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy",
           title="Reliability diagram")
    ax.legend(loc="upper left")
    return _save(figure, path)


def training_curves(metrics_csv: Path, path: Path) -> str:
    """Losses and validation balanced accuracy per epoch from a run's ``metrics.csv``; phase starts marked."""
    table = pd.read_csv(metrics_csv)
    epoch = np.arange(1, len(table) + 1)  # epochs counted over all phases, as the run lived them
    figure = Figure(figsize=(11, 4.5))
    loss_ax, score_ax = figure.subplots(1, 2)
    for column, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        loss_ax.plot(epoch, table[column], marker="o", label=label)
    score_ax.plot(epoch, table["val_balanced_accuracy"], marker="o", c="C2", label="validation balanced accuracy")
    starts = np.flatnonzero(table["phase"].ne(table["phase"].shift()))
    for ax in (loss_ax, score_ax):
        for start in starts[1:]:
            ax.axvline(start + 0.5, ls="--", c="grey")
        for start in starts:
            ax.annotate(table["phase"].iloc[start], (start + 1, 1), xycoords=("data", "axes fraction"),
                        va="top", fontsize=8, c="grey")
        ax.set_xlabel("epoch")
        ax.legend(loc="lower left" if ax is loss_ax else "lower right", fontsize=8)
    loss_ax.set_title("Loss")
    score_ax.set_title("Validation balanced accuracy")
    return _save(figure, path)


def report_figures(out_dir: Path, labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                   reliability_bins: dict[str, dict], metrics_csv: Path | None = None) -> dict[str, str]:
    """Draw every picture of a report into ``out_dir``; return ``{file name: caption}`` in reading order."""
    figures = {
        confusion_matrices(labels, probabilities.argmax(axis=1), classes, out_dir / "confusion_matrix.png"):
            "Confusion matrix: counts and row-normalised",
        curves(labels, probabilities, classes, out_dir / "roc_curves.png", "roc"): "ROC curves per class",
        curves(labels, probabilities, classes, out_dir / "pr_curves.png", "pr"): "Precision-recall curves per class",
        reliability(reliability_bins, out_dir / "reliability.png"): "Reliability diagram",
    }
    if metrics_csv is not None and metrics_csv.is_file():
        figures[training_curves(metrics_csv, out_dir / "training_curves.png")] = "Training curves"
    return figures
