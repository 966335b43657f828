"""The ``lesionkit`` command: every subcommand is a module with ``add_arguments(parser)`` and ``run(args)``,
registered once in ``COMMANDS``. User errors print one clear message and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from lesionkit import LesionkitError, __version__
from lesionkit.allocator import hold_freed_memory


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings (see configs/); default: the built-in B1 recipe")
    parser.add_argument("--data-dir", help="folder with HAM10000_metadata.csv and the images (data.data_dir)")
    parser.add_argument("--out", required=True, type=Path, help="run folder to write (must not hold another run)")
    parser.add_argument("--split-file", help="reuse a saved split.csv (split.split_file)")
    parser.add_argument("--allow-missing", action="store_true", default=None,
                        help="skip missing or unreadable images, listing them in the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--model", help="timm model name (model.name)")
    parser.add_argument("--weights", help="hub, lite1, none or a weights file (model.weights)")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--accelerator", help="cpu, gpu or auto (train.accelerator)")
    parser.add_argument("--devices", help="device count or list, e.g. 2 or 0,1 (train.devices)")
    parser.add_argument("--num-nodes", type=int, help="machines taking part, each with --devices (train.num_nodes)")
    parser.add_argument("--strategy", help="Lightning strategy, e.g. ddp (train.strategy; auto picks ddp for "
                                           "several devices)")
    parser.add_argument("--precision", help="e.g. 32-true, bf16-mixed (train.precision)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set train.phases.1.epochs=3 --set data.batch_size=64")


# Explicit flags are shorthands for config keys; --set reaches every other one.
_FLAG_KEYS = {"data_dir": "data.data_dir", "split_file": "split.split_file", "allow_missing": "data.allow_missing",
              "model": "model.name", "weights": "model.weights", "seed": "train.seed",
              "accelerator": "train.accelerator", "devices": "train.devices", "precision": "train.precision",
              "num_nodes": "train.num_nodes", "strategy": "train.strategy"}


def _train(args: argparse.Namespace) -> int:
    from lesionkit.config import load_config
    from lesionkit.train import train

    if args.resume:
        config_path, overrides = args.out / "config.yaml", []
        if not config_path.is_file():
            raise LesionkitError(f"--resume: {config_path} does not exist; nothing to resume in {args.out}")
    else:
        config_path = args.config
        overrides = [f"{key}={getattr(args, flag)}" for flag, key in _FLAG_KEYS.items()
                     if getattr(args, flag) is not None] + args.set
    config = load_config(config_path, overrides)
    if config.data.data_dir is None:
        raise LesionkitError("no data folder: pass --data-dir (or set data.data_dir in the config)")
    try:
        report = train(config, args.out, resume=args.resume)
    except KeyboardInterrupt:
        last = args.out / "checkpoints" / "last.ckpt"
        where = f"{last} holds the last finished epoch" if last.is_file() else "no epoch had finished"
        print(f"\ninterrupted: {where}. Continue with: lesionkit train --out {args.out} --resume", file=sys.stderr)
        return 130
    if report:
        print(f"\nValidation (best checkpoint): balanced accuracy {report['balanced_accuracy']:.4f}, accuracy "
              f"{report['accuracy']:.4f}, macro AUC {report['macro_auc'] or float('nan'):.4f}, melanoma sensitivity "
              f"{report['melanoma_sensitivity']:.4f}\nRun folder: {args.out}")
    return 0


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="folder with HAM10000_metadata.csv and images")
    parser.add_argument("--metadata", type=Path, help="metadata CSV (default: HAM10000_metadata.csv in --data-dir)")


def _check(args: argparse.Namespace) -> int:
    from lesionkit.data import load_dataset, summary

    dataset = load_dataset(args.data_dir, args.metadata)
    table = summary(dataset.frame)
    print(table.to_string())
    print(f"total: {len(dataset.frame)} images of {dataset.frame['lesion_id'].nunique()} lesions")
    if not dataset.problems:
        print("OK: every listed image is present and decodes.")
        return 0
    print(f"\n{len(dataset.problems)} problem(s):")
    for image_id, problem in sorted(dataset.problems.items()):
        print(f"  {image_id}: {problem}")
    print("Train on the rest with `lesionkit train --allow-missing`, or fix the data folder.")
    return 1


def _lazy(module: str, name: str):
    """Import a command's module only when it runs: `lesionkit --help` should not wait for torch."""
    def call(args):
        import importlib
        return getattr(importlib.import_module(f"lesionkit.{module}"), name)(args)
    return call


def _module_arguments(module: str):
    def add(parser):
        import importlib
        importlib.import_module(f"lesionkit.{module}").add_arguments(parser)
    return add


# name: (help, add_arguments, run)
COMMANDS = {
    "train": ("train a classifier: data check, lesion-grouped split, the phases, a validation report",
              _train_arguments, _train),
    "evaluate": ("score a checkpoint on labelled images: report.json / .md / .html with intervals and pictures",
                 _module_arguments("evaluate"), _lazy("evaluate", "run")),
    "compare": ("headline metrics of several runs or reports side by side, with their intervals",
                _module_arguments("compare"), _lazy("compare", "run")),
    "predict": ("class probabilities for your own images", _module_arguments("predict"), _lazy("predict", "run")),
    "download": ("fetch HAM10000 from Harvard Dataverse (resumable, checksummed)",
                 _module_arguments("download"), _lazy("download", "run")),
    "export": ("write a checkpoint as an ONNX file for onnxruntime, checked against PyTorch",
               _module_arguments("export"), _lazy("export", "run")),
    "benchmark": ("measure data loading, training, evaluation and inference speed on this machine",
                  _module_arguments("benchmark"), _lazy("benchmark", "run")),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``command`` given, only that subcommand's arguments: each one's module
    imports what it runs on (torch, timm, Lightning: seconds), and ``predict`` should not wait for ``train``'s."""
    parser = argparse.ArgumentParser(
        prog="lesionkit", description="Train, evaluate and serve skin-lesion classifiers (HAM10000).")
    parser.add_argument("--version", action="version", version=f"lesionkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            add_arguments(sub)
        sub.set_defaults(run=run)
    data = commands.add_parser("data", help="inspect a data folder", description="inspect a data folder")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    check = data_commands.add_parser(
        "check", help="images per class, lesions, and every problem by id (exit 1 when unusable)",
        description="Check a HAM10000 folder: columns, labels, unique ids, every image present and decodable.")
    _check_arguments(check)
    check.set_defaults(run=_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The first word that is not an option names the command (the top level has only --help and --version).
    command = next((word for word in argv if not word.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    hold_freed_memory()  # CPU tensors reuse freed memory instead of page-faulting in fresh memory
    try:
        return args.run(args)
    except LesionkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped early (`lesionkit predict ... | head`): nobody to tell
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit raises again
        return 1
    except OSError as err:  # a full disk or a read-only folder is the user's to fix, not a bug
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) or not err.filename:
            raise
        reason = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
        print(f"error: {reason}: {err.filename}. Free some space or fix the folder and run again (a training run "
              f"continues with --resume; finished files are intact)", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script. After Ctrl-C, leave at once: everything the run keeps is already written
    atomically, and once in four CI runs the interpreter hung at exit after an interrupted fit (a helper
    thread or exit hook of the training stack; not reproduced since), so a user's Ctrl-C could hang."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
