"""A report's three files: ``report.json`` (every number), ``report.md`` laid out for people, and the same
rendered by Python-Markdown into one self-contained ``report.html`` with its PNG pictures embedded as base64: no
external image, script, font or style sheet, so it can be mailed or attached to a review."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import markdown

from lesionkit.evaluate.report import HEADLINE, Report
from lesionkit.files import atomic_write_text

LONG_NAMES = {**HEADLINE, "balanced_accuracy": "balanced accuracy (mean per-class recall)",
              "macro_auc": "macro AUC (one-vs-rest)"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #e8eef6; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f4f4f4; padding: 0.8em; overflow-x: auto; font-size: 85%; }
h1 { border-bottom: 2px solid #2a5599; }
"""


def embed_images(body: str, folder: Path) -> str:
    """Replace ``src="name.png"`` by a ``data:`` URI of the file in ``folder`` (absent files stay links)."""
    def inline(match: re.Match) -> str:
        path = folder / html.unescape(match.group(1))
        if not path.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode("ascii")}"'
    return re.sub(r'src="([^":/]+\.png)"', inline, body)


def html_page(markdown_text: str, title: str, folder: Path) -> str:
    """``markdown_text`` as a self-contained page; pictures are read from ``folder``."""
    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"], output_format="html")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n{embed_images(body, folder)}\n</body></html>\n")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _interval(bounds: list[float] | None) -> str:
    return "n/a" if not bounds else f"{100 * bounds[0]:.1f}% to {100 * bounds[1]:.1f}%"


def markdown_table(header: list[str], rows) -> list[str]:
    """A markdown table's lines (pandas' ``to_markdown`` would need the tabulate package)."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def write_report(report: Report, out_dir: Path, title: str) -> None:
    """Write ``report.json``, ``report.md`` and a self-contained ``report.html`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2), "report")
    markdown = render_markdown(report, title)
    atomic_write_text(out_dir / "report.md", markdown, "report")
    atomic_write_text(out_dir / "report.html", html_page(markdown, title, out_dir), "report")


def render_markdown(report: Report, title: str) -> str:
    """The report as markdown: headline with intervals, melanoma operating points, calibration, per class,
    confusion matrix, pictures, subgroups, data, skipped images and settings."""
    lines = [f"# {title}", ""]
    for key, value in report.context.items():
        lines.append(f"- {key}: {value}")
    boot = report.bootstrap
    lines += ["", "## Headline", ""]
    if boot:
        lines += [f"{100 * boot['confidence']:.0f}% intervals: percentile bootstrap, {boot['resamples']} resamples of "
                  f"{boot['units']} {boot.get('unit', 'lesion')}s (seed {boot['seed']}).", ""]
    lines += markdown_table(["metric", "value", "interval"],
                    [[name, _pct(getattr(report, key)), _interval(report.interval(key))]
                     for key, name in LONG_NAMES.items()]
                    + [["weighted F1", _pct(report.weighted_f1), ""], ["images", report.n_images, ""]])
    lesions = report.lesion_level
    if lesions:
        lines += ["", "## Lesion level", "",
                  f"One answer per lesion: the probabilities of its images averaged ({lesions['lesions']} lesions, "
                  f"{report.n_images} images).", ""]
        lines += markdown_table(["metric", "image level", "lesion level"],
                                [[name, _pct(getattr(report, key)), _pct(lesions[key])]
                                 for key, name in LONG_NAMES.items()]
                                + [[f"{name} recall", _pct(report.per_class[name]["recall"]), _pct(recall)]
                                   for name, recall in lesions["recall"].items()])
    if report.metadata:
        used = report.metadata
        lines += ["", "## Clinical metadata", "",
                  f"The model reads {', '.join(used['fields'])} beside the image; these images gave: "
                  f"{used['given']}. Without it, every field is unknown, as for a user who has none.", ""]
        lines += markdown_table(["metric", "with metadata", "without metadata"],
                                [[name, _pct(used["with"][key]), _pct(used["without"][key])]
                                 for key, name in LONG_NAMES.items()])
    points = report.melanoma_operating_points
    if points:
        lines += ["", "## Melanoma operating points (one melanoma-vs-rest threshold)", ""]
        rows = [[f"sensitivity at specificity >= {k}", _pct(v["value"]), f"{v['threshold']:.4f}"]
                for k, v in points["sensitivity_at_specificity"].items()]
        rows += [[f"specificity at sensitivity >= {k}", _pct(v["value"]), f"{v['threshold']:.4f}"]
                 for k, v in points["specificity_at_sensitivity"].items()]
        lines += markdown_table(["operating point", "value", "threshold on p(mel)"], rows)
    if report.ece:
        cal = report.calibration
        temperature = f"{cal['temperature']:.3f}" if cal["temperature"] else "none fitted"
        lines += ["", "## Calibration", "",
                  f"Temperature: {temperature}"
                  + (f", from {cal['source']}" if cal.get("source") else "")
                  + (" (fitted on these images, so 'after' is optimistic)" if cal.get("fitted_here") else "")
                  + f". ECE: top-label, {cal['n_bins']} equal-width bins.", ""]
        lines += markdown_table(["", "ECE", "Brier score"],
                        [[when, _pct(report.ece[when]) if report.ece[when] is not None else "n/a",
                          "n/a" if report.brier[when] is None else f"{report.brier[when]:.4f}"]
                         for when in ("before", "after")])
    lines += _decisions(report)
    lines += ["", "## Per class", ""]
    lines += markdown_table(["class", "images", "sensitivity (recall)", "specificity", "precision", "F1", "AUC", "AP"],
                    [[name, c["support"], _pct(c["recall"]), _pct(c.get("specificity")), _pct(c["precision"]),
                      _pct(c["f1"]), _pct(c["auc"]), _pct(c.get("average_precision"))]
                     for name, c in report.per_class.items()])
    classes = report.confusion_matrix["classes"]
    lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", ""]
    matrix = report.confusion_matrix["matrix"]
    lines += markdown_table(["", *classes], [[f"**{n}**", *row] for n, row in zip(classes, matrix, strict=True)])
    for name, caption in report.figures.items():
        lines += ["", f"![{caption}]({name})"]
    lines += _gallery(report.gallery)
    lines += _subgroups(report.subgroups)
    lines += _data(report.data)
    for ids, heading in ((report.skipped_images, "Skipped images (missing or unreadable)"),
                         (report.unlabelled_images, "Images without a label (not evaluated)")):
        if ids:
            lines += ["", f"## {heading}: {len(ids)}", "", ", ".join(ids)]
    if report.settings:
        lines += ["", "## Settings", "", "```json", json.dumps(report.settings, indent=2), "```"]
    return "\n".join(lines) + "\n"


def _decisions(report: Report) -> list[str]:
    """When not to take the probabilities at their word: prediction sets, out-of-distribution flags, referral."""
    sets, ood, referral = report.conformal, report.out_of_distribution, report.referral
    if not (sets or ood or referral):
        return []
    lines = ["", "## When not to answer", ""]
    if sets:
        lines += [f"Prediction sets (APS, {sets['calibration_scores']} validation scores) for "
                  f"{100 * sets['target_coverage']:.0f}% coverage hold the true class of {_pct(sets['coverage'])} of "
                  f"these images, with {sets['mean_set_size']:.2f} classes on average"
                  + (" (fitted on these images: coverage holds by construction)." if sets["fitted_here"] else "."),
                  ""]
        lines += markdown_table(["class", "images", "coverage", "mean set size"],
                                [[name, c["images"], _pct(c["coverage"]),
                                  "n/a" if c["mean_set_size"] is None else f"{c['mean_set_size']:.2f}"]
                                 for name, c in sets["per_class"].items()])
    if ood:
        lines += ["", f"Out of distribution ({ood['method']}, either above its threshold): "
                  f"{ood['flagged_images']} of these images flagged ({_pct(ood['flagged'])}; "
                  f"{_pct(ood['validation_flagged'])} of validation images when held out)."]
    if referral:
        lines += ["", f"Melanoma referral at p(mel) >= {referral['threshold']:.4f} (chosen for sensitivity "
                  f"{referral['sensitivity']:.2f} on validation): sensitivity {_pct(referral['sensitivity_here'])}, "
                  f"specificity {_pct(referral['specificity_here'])}, {_pct(referral['referred'])} of images "
                  f"referred."]
    return lines


def _subgroups(subgroups: dict) -> list[str]:
    lines = []
    for column, groups in subgroups.items():
        lines += ["", f"## By {column.replace('_', ' ')}", ""]
        header = ["group", "images", "lesions", "balanced accuracy", "melanoma sensitivity", "accuracy", "status"]
        lines += markdown_table(header,
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
            lines += markdown_table(["class", *parts], [[c, *(table[p].get(c, 0) for p in parts)] for c in classes])
    return lines


def _gallery(gallery: dict) -> list[str]:
    """Per predicted class, its most confident right and wrong call, each with its map and caption."""
    if not gallery.get("images"):
        return []
    lines = ["", "## Where the network looked: the most confident right and wrong call of each class", "",
             f"{gallery['method']} maps of the predicted class at layer `{gallery['layer']}`; red is where the "
             f"network found most evidence for it.", ""]

    def cell(entry: dict | None, name: str, kind: str) -> str:
        if not entry:
            return "none"
        if "error" in entry:
            return f"{entry['image_id']}: {entry['error']}"
        caption = f"{entry['image_id']}: true {entry['true']}, predicted {name}, p {entry['probability']:.3f}"
        return f"![{name} {kind}: {caption}]({entry['file']})<br>{caption}"

    lines += markdown_table(["predicted", "right", "wrong"],
                            [[name, cell(kinds.get("right"), name, "right"), cell(kinds.get("wrong"), name, "wrong")]
                             for name, kinds in gallery["images"].items()])
    return lines
