"""``lesionkit train``: data check, lesion-grouped split, the phases, a validation report.

Each explicit flag is a shorthand for one setting: its ``dest`` is the setting's dotted key, so the flags and
``--set`` reach the config the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lesionkit import LesionkitError, some


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings (see configs/); default: the built-in B1 recipe")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write (must not hold another run)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="cross-validation: K runs on lesion-grouped folds of the non-test part (--out/fold-N), "
                             "their out-of-fold estimate (cv.json) and their ensemble (ensemble.json); the same "
                             "command again, or with --resume, skips finished folds")
    group = parser.add_argument_group("settings (shorthands for --set KEY=VALUE)")

    def setting(flag: str, key: str, help: str, **options) -> None:
        if options.get("action") is None:  # the metavar a flag named like the setting would have
            options["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        group.add_argument(flag, dest=key, help=help, **options)
    setting("--data-dir", "data.data_dir", "folder with HAM10000_metadata.csv and the images (data.data_dir)")
    setting("--split-file", "split.split_file", "reuse a saved split.csv (split.split_file)")
    setting("--allow-missing", "data.allow_missing", "skip missing or unreadable images, listing them in the run "
            "folder", action="store_const", const="true")
    setting("--model", "model.name", "timm model name (model.name)")
    setting("--weights", "model.weights", "hub, lite0, lite1, lite2, none or a weights file (model.weights)")
    setting("--seed", "train.seed", "train.seed", type=int)
    setting("--accelerator", "train.accelerator", "cpu, gpu or auto (train.accelerator)")
    setting("--devices", "train.devices", "device count or list, e.g. 2 or 0,1 (train.devices)")
    setting("--num-nodes", "train.num_nodes", "machines taking part, each with --devices (train.num_nodes)", type=int)
    setting("--strategy", "train.strategy", "Lightning strategy, e.g. ddp (train.strategy; auto picks ddp for several "
            "devices)")
    setting("--precision", "train.precision", "e.g. 32-true, bf16-mixed (train.precision)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override any setting, e.g. --set train.phases.1.epochs=3 --set data.batch_size=64")


def overrides(args: argparse.Namespace) -> list[str]:
    """The settings the command line gives: the flags' (their ``dest`` is the key), then ``--set``'s."""
    given = [f"{key}={value}" for key, value in vars(args).items() if "." in key and value is not None]
    return given + args.set


def run(args: argparse.Namespace) -> int:
    from lesionkit.config import load_config
    from lesionkit.train.loop import train

    config = resumed_config(args) if args.resume else load_config(args.config, overrides(args))
    if config.data.data_dir is None:
        raise LesionkitError("no data folder: pass --data-dir (or set data.data_dir in the config)")
    if args.folds is not None:
        return cross_validate(config, args)
    try:
        report = train(config, args.out, resume=args.resume)
    except KeyboardInterrupt:
        last = args.out / "checkpoints" / "last.ckpt"
        where = f"{last} holds the last finished epoch" if last.is_file() else "no epoch had finished"
        print(f"\ninterrupted: {where}. Continue with: lesionkit train --out {args.out} --resume", file=sys.stderr)
        return 130
    if report:
        print(f"\nValidation (best checkpoint): {report.headline()}\nRun folder: {args.out}")
    return 0


def resumed_config(args: argparse.Namespace):
    """The settings the run in ``--out`` started with, on the hardware and data folder the command line gives now
    (``WHERE``). Any other setting given, the --config file's included, must be the run's own: the same command
    again with --resume continues it, and a run does not change its recipe halfway."""
    from lesionkit.config import WHERE, differences, load_config

    saved, given = args.out / "config.yaml", overrides(args)
    if not saved.is_file():
        raise LesionkitError(f"--resume: {saved} does not exist; nothing to resume in {args.out}")
    config = load_config(saved, [item for item in given if item.partition("=")[0] in WHERE])
    if args.config or given:
        changed = [key for key in differences(config, load_config(args.config or saved, given)) if key not in WHERE]
        if changed:
            raise LesionkitError(f"--resume continues {args.out} with the settings it started with ({saved}), and "
                                 f"the command line changes {some(changed)}: drop those, or train anew "
                                 f"with another --out (only {', '.join(WHERE)} may change on resuming)")
    return config


def cross_validate(config, args: argparse.Namespace) -> int:
    """``--folds K``: every fold, then the out-of-fold estimate in one line."""
    from lesionkit.evaluate.crossval import cv_line
    from lesionkit.train.folds import train_folds

    try:
        cv = train_folds(config, args.out, args.folds, resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished folds are kept, and the fold under way keeps its last finished epoch. Continue "
              f"with: lesionkit train --folds {args.folds} --out {args.out} --resume", file=sys.stderr)
        return 130
    if cv:
        print(f"\n{cv_line(cv)}\nRun folder: {args.out} (ensemble: {args.out / 'ensemble.json'})")
    return 0
