"""The metrics the field reads, from scikit-learn, and the ``report.json`` / ``report.md`` pair.

Balanced accuracy (mean per-class recall, the ISIC challenge's metric) leads: on HAM10000 always answering
"nv" scores 67% plain accuracy but 14% balanced accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics


def build_report(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Headline and per-class metrics for integer ``labels`` and an ``(n, classes)`` probability array."""
    predictions = probabilities.argmax(axis=1)
    ids = list(range(len(classes)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0)
    per_class = {}
    for i, name in enumerate(classes):
        positives = labels == i
        # AUC needs both positives and negatives; a class absent from the data has none.
        auc = metrics.roc_auc_score(positives, probabilities[:, i]) if 0 < positives.sum() < len(labels) else None
        per_class[name] = {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                           "auc": auc if auc is None else float(auc), "support": int(support[i])}
    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    present = [i for i in ids if support[i] > 0]
    return {
        "n_images": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predictions)),
        # Over the classes present, as scikit-learn's balanced_accuracy_score: a class with no images has no recall.
        "balanced_accuracy": float(np.mean(recall[present])),
        "macro_f1": float(metrics.f1_score(labels, predictions, labels=present, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "melanoma_sensitivity": per_class["mel"]["recall"] if "mel" in per_class else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": list(classes),
                             "matrix": metrics.confusion_matrix(labels, predictions, labels=ids).tolist()},
    }


def write_predictions(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    """Per image: its id, true class, predicted class and every class probability."""
    table = frame[["image_id", "dx"]].reset_index(drop=True).copy()
    table["prediction"] = [classes[i] for i in probabilities.argmax(axis=1)]
    table[[f"p_{c}" for c in classes]] = probabilities
    table.to_csv(path, index=False, float_format="%.6f")


def write_report(report: dict, out_dir: Path, title: str) -> None:
    """Write ``report.json`` and a readable ``report.md`` beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(render_markdown(report, title))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def render_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for key, value in report.get("context", {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "| metric | value |", "| --- | --- |",
        f"| balanced accuracy (mean per-class recall) | {_pct(report['balanced_accuracy'])} |",
        f"| melanoma sensitivity | {_pct(report['melanoma_sensitivity'])} |",
        f"| macro AUC (one-vs-rest) | {_pct(report['macro_auc'])} |",
        f"| macro F1 | {_pct(report['macro_f1'])} |",
        f"| accuracy | {_pct(report['accuracy'])} |",
        f"| images | {report['n_images']} |",
        "", "## Per class", "",
        "| class | recall | precision | F1 | AUC | images |", "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in report["per_class"].items():
        lines.append(f"| {name} | {_pct(c['recall'])} | {_pct(c['precision'])} | {_pct(c['f1'])} | "
                     f"{_pct(c['auc'])} | {c['support']} |")
    classes = report["confusion_matrix"]["classes"]
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, report["confusion_matrix"]["matrix"]):
        lines.append(f"| **{name}** | " + " | ".join(map(str, row)) + " |")
    skipped = report.get("skipped_images")
    if skipped:
        lines += ["", f"## Skipped images ({len(skipped)})", "", ", ".join(skipped)]
    return "\n".join(lines) + "\n"
