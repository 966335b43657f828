"""``lesionkit card``: the model card of a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder written by `lesionkit train`")
    parser.add_argument("--out", type=Path, help="file to write (default: RUN/MODEL_CARD.md)")
    parser.add_argument("--name", help="the model's name in the title (default: the run folder's name)")


def run(args: argparse.Namespace) -> int:
    from lesionkit.evaluate.card import write_card

    print(f"Wrote {write_card(args.run_dir, args.out, args.name)}")
    return 0
