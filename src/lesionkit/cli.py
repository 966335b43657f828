"""The ``lesionkit`` command line: every command is a module of :mod:`lesionkit.commands` with
``add_arguments(parser)`` and ``run(args)``, named once in :data:`COMMANDS`. Only the module of the command that
runs is imported, so ``lesionkit --help`` and ``predict --backend onnx`` do not wait for PyTorch.

User errors print one clear message and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from lesionkit import LesionkitError, __version__
from lesionkit.allocator import hold_freed_memory

# The command's words: (module under lesionkit.commands, one line of help).
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("train",): ("train", "train a classifier: data check, lesion-grouped split, the phases, a validation report"),
    ("evaluate",): ("evaluate", "score a checkpoint on labelled images: report.json / .md / .html with intervals "
                                "and pictures"),
    ("ensemble",): ("ensemble", "several cross-validations of the same folds as one ensemble, with its "
                                "out-of-fold estimate"),
    ("compare",): ("compare", "headline metrics of several runs or reports side by side, with their intervals"),
    ("predict",): ("predict", "class probabilities for your own images"),
    ("explain",): ("explain", "Grad-CAM heat maps: where the network looked for its answer"),
    ("download",): ("download", "fetch HAM10000 from Harvard Dataverse (resumable, checksummed)"),
    ("export",): ("export", "write a checkpoint as an ONNX file for onnxruntime, checked against PyTorch"),
    ("benchmark",): ("benchmark", "measure data loading, training, evaluation and inference speed on this machine"),
    ("serve",): ("serve", "the web demo: upload an image, see probabilities, Grad-CAM, prediction set and warnings"),
    ("card",): ("card", "the model card of a trained run: intended use, data, results with intervals, caveats"),
    ("data", "check"): ("check", "images per class, lesions, and every problem by id (exit 1 when unusable)"),
}
# Commands of more than one word are grouped under their first word.
GROUPS = {"data": "inspect a data folder"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line with the arguments of the command that ``argv`` names, or of every command when ``argv``
    is None. Adding a command's arguments imports its module: the others are only listed."""
    words = [word for word in argv or [] if not word.startswith("-")]
    chosen = next((name for name in COMMANDS if tuple(words[:len(name)]) == name), None)
    parser = argparse.ArgumentParser(
        prog="lesionkit", description="Train, evaluate and serve skin-lesion classifiers (HAM10000).")
    parser.add_argument("--version", action="version", version=f"lesionkit {__version__}")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, (module_name, help_text) in COMMANDS.items():
        subparsers = top
        if len(name) > 1:
            if name[0] not in groups:
                group = top.add_parser(name[0], help=GROUPS[name[0]], description=GROUPS[name[0]])
                groups[name[0]] = group.add_subparsers(dest=f"{name[0]}_command", required=True, metavar="COMMAND")
            subparsers = groups[name[0]]
        sub = subparsers.add_parser(name[-1], help=help_text, description=help_text)
        if name == chosen or argv is None:
            module = importlib.import_module(f"lesionkit.commands.{module_name}")
            if getattr(module, "DESCRIPTION", None):
                sub.description = module.DESCRIPTION
            module.add_arguments(sub)
            sub.set_defaults(run=module.run, command_parser=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, unknown = build_parser(argv).parse_known_args(argv)
    if unknown:  # said with the usage of the command they were given to, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
        from lesionkit.files import disk_reason
        print(f"error: {disk_reason(err)}: {err.filename}. Free some space or fix the folder and run again (a "
              f"training run continues with --resume; finished files are intact)", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script. After Ctrl-C, leave at once: everything the run keeps is already written atomically,
    and a helper thread or exit hook of the training stack can hold the interpreter at exit after an interrupted
    fit."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
