"""``lesionkit benchmark``: how fast this machine loads, trains, evaluates and serves, each saving measured
against its baseline in the same run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="HAM10000-style folder to load from, e.g. the 600x450 "
                                                      "originals (default: generated 600x450 JPEGs)")
    parser.add_argument("--model", default="tf_efficientnet_lite1", help="timm model (default: tf_efficientnet_lite1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default: 10)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks that it runs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from lesionkit.bench.measure import benchmark
    from lesionkit.bench.table import table
    from lesionkit.files import atomic_write_text

    result = benchmark(args.data_dir, quick=args.quick, model_name=args.model, batch_size=args.batch_size,
                       steps=args.steps)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n", "benchmark figures")
    print(text if args.json else table(result), file=sys.stdout)
    return 0
