"""``lesionkit download``: HAM10000 from Harvard Dataverse, resumable and checksummed."""

from __future__ import annotations

import argparse
from pathlib import Path

from lesionkit.data.download import DEFAULT_SERVER, download_ham10000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lesionkit download`` options to ``parser``."""
    parser.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder to put the dataset in")
    parser.add_argument("--test", action="store_true",
                        help="also fetch the ISIC 2018 Task 3 test images and ground-truth labels")
    parser.add_argument("--server", default=DEFAULT_SERVER,
                        help=f"Dataverse server holding the record; change it only to use a mirror "
                        f"(default: {DEFAULT_SERVER})")


def run(args: argparse.Namespace) -> int:
    """Run ``lesionkit download``; a DownloadError propagates for the CLI to print."""
    dest = download_ham10000(args.to, include_test=args.test, server=args.server)
    print(f"HAM10000 is ready in {dest}" + (" (with the ISIC 2018 Task 3 test set)" if args.test else ""))
    print(f"Next: lesionkit data check --data-dir {dest}")
    return 0
