"""``lesionkit compare``: the headline metrics of several runs or reports side by side, with intervals.

Each argument is a ``report.json``, or a folder holding one (a run folder or an evaluate folder). The table
says which configuration (TTA or not, temperature) and how many images each number comes from, so that
two numbers are only compared when they were measured alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from lesionkit import LesionkitError

COLUMNS = {"balanced_accuracy": "balanced accuracy", "melanoma_sensitivity": "melanoma sensitivity",
           "macro_auc": "macro AUC", "macro_f1": "macro F1", "accuracy": "accuracy"}


def load_report(path: Path) -> dict:
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise LesionkitError(f"{path} is neither a report.json nor a folder holding one")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LesionkitError(f"{file} is not valid JSON: {err}") from None


def _cell(report: dict, key: str) -> str:
    value = report.get(key)
    if value is None:
        return "n/a"
    bounds = report.get("intervals", {}).get(key)
    return f"{100 * value:.1f}%" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")


def comparison_table(paths: list[Path]) -> pd.DataFrame:
    """One row per report: its name, the headline metrics as 'value [low, high]', ECE and the setup."""
    rows = []
    for path in paths:
        report = load_report(path)
        settings, ece = report.get("settings", {}), report.get("ece", {})
        after = ece.get("after")
        rows.append({"report": str(path), **{name: _cell(report, key) for key, name in COLUMNS.items()},
                     "ECE": "n/a" if not ece else f"{100 * (ece['before'] if after is None else after):.1f}%",
                     "TTA": "yes" if settings.get("tta") else "no",
                     "temperature": "none" if not settings.get("temperature") else f"{settings['temperature']:.3f}",
                     "images": report.get("n_images")})
    return pd.DataFrame(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", type=Path, metavar="RUN_OR_REPORT",
                        help="run folders, evaluate folders or report.json files")
    parser.add_argument("--out", type=Path, help="also write the table: .csv as CSV, anything else as markdown")


def run(args: argparse.Namespace) -> int:
    table = comparison_table(args.reports)
    markdown = _markdown(table)
    print("Values with 95% bootstrap intervals in brackets; ECE after temperature scaling where fitted.\n")
    print(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix.lower() == ".csv":
            table.to_csv(args.out, index=False)
        else:
            args.out.write_text(markdown + "\n")
        print(f"\nWritten to {args.out}")
    return 0


def _markdown(table: pd.DataFrame) -> str:
    # pandas' to_markdown would need the tabulate package for this one table.
    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
