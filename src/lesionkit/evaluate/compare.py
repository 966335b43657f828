"""The headline metrics of several reports side by side, with their intervals.

The table says which configuration (TTA or not, temperature), how many images each number comes from and the
hardware that trained each model (from its run's ``provenance.json``), so that two numbers are only compared
when they were measured alike.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd

from lesionkit.evaluate.render import markdown_table
from lesionkit.evaluate.report import HEADLINE, Report, load_report
from lesionkit.serve.ensemble import run_folder
from lesionkit.train.runfolder import PROVENANCE_NAME, UNKNOWN_HARDWARE, describe


def _cell(report: Report, key: str) -> str:
    value = getattr(report, key)
    if value is None:
        return "n/a"
    bounds = report.interval(key)
    return f"{100 * value:.1f}%" + (f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]" if bounds else "")


def _training_runs(path: Path, report: Report) -> list[Path]:
    """The run folders whose provenance tells where the reported model trained: its checkpoint's run, else the
    report's own folder or the one above it (an evaluation folder inside a run); an ensemble's folds."""
    folder = path if path.is_dir() else path.parent
    checkpoint = report.settings.get("checkpoint")
    for run in [*([run_folder(Path(checkpoint))] if checkpoint else []), folder, folder.parent]:
        if (run / PROVENANCE_NAME).is_file():
            return [run]
        folds = sorted(p.parent for p in run.glob(f"fold-*/{PROVENANCE_NAME}"))
        if folds:
            return folds
    return []


def trained_on(path: Path, report: Report) -> str:
    """The hardware of every session that trained the reported model (a resumed run may have moved), or
    ``unknown`` where no run folder records it."""
    machines = []
    for run in _training_runs(path, report):
        with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
            record = json.loads((run / PROVENANCE_NAME).read_text())
            machines += [describe(session.get("hardware")) for session in [record, *record.get("resumed", [])]]
    return " / ".join(dict.fromkeys(m for m in machines if m != UNKNOWN_HARDWARE)) or UNKNOWN_HARDWARE


def hardware_note(table: pd.DataFrame) -> str | None:
    """A warning when the table's models were trained on different hardware, else None."""
    machines = set(table["trained on"]) - {UNKNOWN_HARDWARE}
    if len(machines) < 2:
        return None
    return (f"Note: these models were trained on {len(machines)} different machines ({'; '.join(sorted(machines))}). "
            f"The same recipe and seed can give other figures on another processor (PyTorch picks other vector "
            f"kernels), by as much as a reseed does: compare runs trained on one machine.")


def comparison_table(paths: list[Path]) -> pd.DataFrame:
    """One row per report (a ``report.json`` or a folder holding one): its name, the headline metrics as
    'value [low, high]', ECE, the setup and the hardware that trained it."""
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
                     "images": report.n_images, "trained on": trained_on(Path(path), report)})
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    return "\n".join(markdown_table(list(table.columns), table.itertuples(index=False)))
