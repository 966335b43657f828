"""``lesionkit compare``: the headline metrics of several runs or reports side by side, with intervals."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", type=Path, metavar="RUN_OR_REPORT",
                        help="run folders, evaluate folders or report.json files")
    parser.add_argument("--out", type=Path, help="also write the table: .csv as CSV, anything else as markdown")


def run(args: argparse.Namespace) -> int:
    from lesionkit.evaluate.compare import comparison_markdown, comparison_table, hardware_note
    from lesionkit.files import atomic_write_csv, atomic_write_text

    table = comparison_table(args.reports)
    markdown = comparison_markdown(table)
    print("Values with 95% bootstrap intervals in brackets; ECE after temperature scaling where fitted.\n")
    print(markdown)
    note = hardware_note(table)
    if note:
        print(f"\n{note}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix.lower() == ".csv":
            atomic_write_csv(table, args.out, "comparison", index=False)
        else:
            atomic_write_text(args.out, markdown + "\n", "comparison")
        print(f"\nWritten to {args.out}")
    return 0
