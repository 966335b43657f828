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
                        help="a checkpoint written by `lesionkit train`, or a `train --folds` run's RUN/ensemble.json "
                             "(or RUN) where the command takes an ensemble (default: the model shipped with "
                             "lesionkit, models/lesionkit-lite1.ckpt, or $LESIONKIT_MODEL)")


def checkpoint_or_default(checkpoint: Path | None, onnx: bool = False) -> Path:
    """``checkpoint`` (for an ensemble's run folder, its manifest ``RUN/ensemble.json``), or the default model (its
    ONNX export beside it with ``onnx``), announced on standard error so that every output names the file that
    answered."""
    if checkpoint is not None:
        from lesionkit.serve.ensemble import manifest_for  # no torch: predict --backend onnx stays without it

        return manifest_for(checkpoint) or checkpoint
    chosen = Path(os.environ["LESIONKIT_MODEL"]) if os.environ.get("LESIONKIT_MODEL") else CHECKPOINT
    if onnx:
        chosen = chosen.with_suffix(".onnx")
    if not chosen.is_file():
        where = "$LESIONKIT_MODEL" if os.environ.get("LESIONKIT_MODEL") else "the shipped model"
        raise LesionkitError(f"no --checkpoint given and {where}, {chosen}, is not there (an installed wheel "
                             f"does not carry models/: install from a clone with `make install`); give "
                             f"--checkpoint RUN/checkpoints/best.ckpt")
    print(f"model: {chosen} (no --checkpoint given)", file=sys.stderr)
    return chosen
