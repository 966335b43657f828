"""The model that ships with lesionkit, under ``models/`` in the source tree: what ``predict``, ``explain`` and
``serve`` use when given no ``--checkpoint``, so that they answer right after ``make install``.

``models/`` holds the checkpoint (float16 weights), its ONNX export beside it, the calibration record fitted for
it (``temperature.json``) and its model card; ``docs/shipped-model.md`` says how they were made and measured.
``LESIONKIT_MODEL`` names another checkpoint to use by default. Standard library only: ``predict --backend
onnx`` imports this.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lesionkit import LesionkitError

MODELS = Path(__file__).resolve().parents[3] / "models"
CHECKPOINT = MODELS / "lesionkit-lite1.ckpt"


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint written by `lesionkit train` (or its RUN folder, for its best.ckpt), or "
                             "a `train --folds` run's RUN/ensemble.json (or RUN) where the command takes an ensemble "
                             "(default: the model shipped with lesionkit, models/lesionkit-lite1.ckpt, or "
                             "$LESIONKIT_MODEL)")


def checkpoint_or_default(checkpoint: Path | None, onnx: bool = False) -> Path:
    """``checkpoint`` (for a run's folder, its ``RUN/checkpoints/best.ckpt``, or for an ensemble's, its manifest
    ``RUN/ensemble.json``), or the default model (its ONNX export beside it with ``onnx``), announced on standard
    error so that every output names the file that answered."""
    if checkpoint is not None:
        from lesionkit.serve.ensemble import MANIFEST_NAME, manifest_for  # no torch: predict --backend onnx

        best = checkpoint / "checkpoints" / "best.ckpt"
        if checkpoint.is_dir() and not (checkpoint / MANIFEST_NAME).is_file() and best.is_file():
            return best
        return manifest_for(checkpoint) or checkpoint
    variable = os.environ.get("LESIONKIT_MODEL")
    chosen = Path(variable) if variable else CHECKPOINT
    if onnx:
        chosen = chosen.with_suffix(".onnx")
    if not chosen.is_file():
        if variable:
            raise LesionkitError(f"no --checkpoint given and $LESIONKIT_MODEL, {chosen}, is not there: point "
                                 f"LESIONKIT_MODEL at a checkpoint (RUN/checkpoints/best.ckpt"
                                 f"{', exported with `lesionkit export`' if onnx else ''}), or give --checkpoint")
        raise LesionkitError(f"no --checkpoint given and the shipped model, {chosen}, is not there (an installed "
                             f"wheel does not carry models/: install from a clone with `make install`); give "
                             f"--checkpoint RUN/checkpoints/best.ckpt")
    print(f"model: {chosen} (no --checkpoint given{', from $LESIONKIT_MODEL' if variable else ''})", file=sys.stderr)
    return chosen
