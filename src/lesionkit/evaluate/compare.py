"""The headline metrics of several reports side by side, with their intervals.

The table says which configuration (TTA or not, temperature) and how many images each number comes from, so
that two numbers are only compared when they were measured alike.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesionkit.evaluate.render import markdown_table
from lesionkit.evaluate.report import HEADLINE, Report, load_report


def _cell(report: Report, key: str) -> str:
    value = getattr(report, key)
    if value is None:
        return "n/a"
    bounds = report.interval(key)
    return f"{100 * value:.1f}%" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")


def comparison_table(paths: list[Path]) -> pd.DataFrame:
    """One row per report (a ``report.json`` or a folder holding one): its name, the headline metrics as
    'value [low, high]', ECE and the setup."""
    rows = []
    for path in paths:
        report = load_report(path)
        after = report.ece.get("after")
        rows.append({"report": str(path), **{name: _cell(report, key) for key, name in HEADLINE.items()},
                     "ECE": "n/a" if not report.ece else
                     f"{100 * (report.ece['before'] if after is None else after):.1f}%",
                     "TTA": "yes" if report.settings.get("tta") else "no",
                     "temperature": "none" if not report.settings.get("temperature") else
                     f"{report.settings['temperature']:.3f}",
                     "images": report.n_images})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    return "\n".join(markdown_table(list(table.columns), table.itertuples(index=False)))
