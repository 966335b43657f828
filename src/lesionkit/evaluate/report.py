"""An evaluation's three files: ``report.json`` (every number), ``report.md`` and ``report.html``.

The metrics come from :mod:`lesionkit.metrics`; this module only lays them out. The markdown is the
single layout: the HTML is rendered from it, with its PNG pictures embedded (see :mod:`lesionkit.report_html`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit.metrics import classification_metrics, operating_points
from lesionkit.report_html import write_html

HEADLINE_NAMES = {"balanced_accuracy": "balanced accuracy (mean per-class recall)",
                  "melanoma_sensitivity": "melanoma sensitivity", "macro_auc": "macro AUC (one-vs-rest)",
                  "macro_f1": "macro F1", "accuracy": "accuracy"}


def build_report(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Headline, per-class and melanoma operating-point metrics (see :mod:`lesionkit.metrics`)."""
    report = classification_metrics(labels, probabilities, classes)
    report["melanoma_operating_points"] = operating_points(labels, probabilities, classes)
    return report


def write_predictions(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str], path: Path) -> None:
    """Per image: its id, true class, predicted class and every class probability."""
    table = frame[["image_id", "dx"]].reset_index(drop=True).copy()
    table["prediction"] = [classes[i] for i in probabilities.argmax(axis=1)]
    table[[f"p_{c}" for c in classes]] = probabilities
    table.to_csv(path, index=False, float_format="%.6f")


def write_report(report: dict, out_dir: Path, title: str) -> None:
    """Write ``report.json``, ``report.md`` and a self-contained ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    markdown = render_markdown(report, title)
    (out_dir / "report.md").write_text(markdown)
    write_html(markdown, title, out_dir, out_dir / "report.html")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _interval(bounds: list[float] | None) -> str:
    return "n/a" if not bounds else f"{100 * bounds[0]:.1f}% to {100 * bounds[1]:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def render_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for key, value in report.get("context", {}).items():
        lines.append(f"- {key}: {value}")
    intervals, boot = report.get("intervals", {}), report.get("bootstrap")
    lines += ["", "## Headline", ""]
    if boot:
        lines += [f"{100 * boot['confidence']:.0f}% intervals: percentile bootstrap, {boot['resamples']} resamples of "
                  f"{boot['units']} {boot.get('unit', 'lesion')}s (seed {boot['seed']}).", ""]
    lines += _table(["metric", "value", "interval"],
                    [[name, _pct(report.get(key)), _interval(intervals.get(key))]
                     for key, name in HEADLINE_NAMES.items()]
                    + [["weighted F1", _pct(report.get("weighted_f1")), ""], ["images", report["n_images"], ""]])
    points = report.get("melanoma_operating_points")
    if points:
        lines += ["", "## Melanoma operating points (one melanoma-vs-rest threshold)", ""]
        rows = [[f"sensitivity at specificity >= {k}", _pct(v["value"]), f"{v['threshold']:.4f}"]
                for k, v in points["sensitivity_at_specificity"].items()]
        rows += [[f"specificity at sensitivity >= {k}", _pct(v["value"]), f"{v['threshold']:.4f}"]
                 for k, v in points["specificity_at_sensitivity"].items()]
        lines += _table(["operating point", "value", "threshold on p(mel)"], rows)
    if "ece" in report:
        cal = report["calibration"]
        temperature = f"{cal['temperature']:.3f}" if cal["temperature"] else "none fitted"
        lines += ["", "## Calibration", "",
                  f"Temperature: {temperature}"
                  + (f", from {cal['source']}" if cal.get("source") else "")
                  + (" (fitted on these images, so 'after' is optimistic)" if cal.get("fitted_here") else "")
                  + f". ECE: top-label, {cal['n_bins']} equal-width bins.", ""]
        lines += _table(["", "ECE", "Brier score"],
                        [[when, _pct(report["ece"][when]) if report["ece"][when] is not None else "n/a",
                          "n/a" if report["brier"][when] is None else f"{report['brier'][when]:.4f}"]
                         for when in ("before", "after")])
    lines += ["", "## Per class", ""]
    lines += _table(["class", "images", "sensitivity (recall)", "specificity", "precision", "F1", "AUC", "AP"],
                    [[name, c["support"], _pct(c["recall"]), _pct(c.get("specificity")), _pct(c["precision"]),
                      _pct(c["f1"]), _pct(c["auc"]), _pct(c.get("average_precision"))]
                     for name, c in report["per_class"].items()])
    classes = report["confusion_matrix"]["classes"]
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", ""]
    matrix = report["confusion_matrix"]["matrix"]
    lines += _table(["", *classes], [[f"**{n}**", *row] for n, row in zip(classes, matrix, strict=True)])
    for name, caption in report.get("figures", {}).items():
        lines += ["", f"![{caption}]({name})"]
    lines += _subgroups(report.get("subgroups", {}))
    lines += _data(report.get("data"))
    for key, heading in (("skipped_images", "Skipped images (missing or unreadable)"),
                         ("unlabelled_images", "Images without a label (not evaluated)")):
        if report.get(key):
            lines += ["", f"## {heading}: {len(report[key])}", "", ", ".join(report[key])]
    if "settings" in report:
        lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def _subgroups(subgroups: dict) -> list[str]:
    lines = []
    for column, groups in subgroups.items():
        lines += ["", f"## By {column.replace('_', ' ')}", ""]
        header = ["group", "images", "lesions", "balanced accuracy", "melanoma sensitivity", "accuracy", "status"]
        lines += _table(header,
                        [[g, m["images"], m["lesions"], _pct(m["balanced_accuracy"]), _pct(m["melanoma_sensitivity"]),
                          _pct(m["accuracy"]), m["status"]] for g, m in groups.items()])
    return lines


def _data(data: dict | None) -> list[str]:
    if not data:
        return []
    lines = ["", "## Data", ""]
    lines += [f"- {key}: {value}" for key, value in data.items() if not isinstance(value, dict)]
    for key, table in data.items():
        if isinstance(table, dict):  # {part: {class: count}}
            parts = list(table)
            classes = list(next(iter(table.values())))
            lines += ["", f"{key.replace('_', ' ')}:", ""]
            lines += _table(["class", *parts], [[c, *(table[p].get(c, 0) for p in parts)] for c in classes])
    return lines
