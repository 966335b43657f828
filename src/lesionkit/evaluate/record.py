"""What was fitted on validation for one checkpoint, kept as one record beside it: the temperature, the conformal
scores, the out-of-distribution detector and the melanoma referral threshold.

The records live in ``temperature.json`` beside the checkpoints, one entry per checkpoint file, keyed by its name
and tied to its SHA-256 so that a retrained or resumed ``best.ckpt`` inherits nothing stale. The file keeps its
name and each entry its ``temperature`` and ``sha256``, so that runs fitted before the other parts existed
still load their temperature (and their other parts are simply absent), and an older lesionkit still reads the
temperature of a newer file. ``lesionkit export`` carries the record into the ONNX metadata. NumPy and the
standard library only: ``predict --backend onnx`` reads it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lesionkit.evaluate.ood import OodDetector
from lesionkit.files import atomic_write_text, file_hash

FILE_NAME = "temperature.json"


@dataclass(frozen=True)
class Calibration:
    """One checkpoint's fitted record; a part that was never fitted is None."""

    temperature: float | None = None
    """Divides the logits before the softmax."""
    conformal_scores: np.ndarray | None = None
    """APS scores of the validation images (:mod:`lesionkit.evaluate.conformal`), for any coverage."""
    ood: OodDetector | None = None
    melanoma: dict | None = None
    """``sensitivity`` asked, ``threshold`` on p(mel), and the ``validation_sensitivity`` and
    ``validation_specificity`` it reached."""
    details: dict = field(default_factory=dict)
    """Where and how it was fitted: ``fitted_on``, ``images``, NLL before and after the temperature."""
    source: str | None = None
    """The file and data it came from, for messages and reports; None when nothing was fitted."""

    def to_entry(self) -> dict:
        entry = {"temperature": self.temperature, **self.details}
        if self.conformal_scores is not None:
            entry["conformal"] = {"method": "aps", "scores": [float(s) for s in self.conformal_scores]}
        if self.ood is not None:
            entry["ood"] = self.ood.to_entry()
        if self.melanoma is not None:
            entry["melanoma"] = self.melanoma
        return entry

    @classmethod
    def from_entry(cls, entry: dict | None, source: str | None = None) -> Calibration:
        """A record from its entry (a ``temperature.json`` entry or an export's); an empty one from None."""
        if not entry:
            return cls()
        scores = entry.get("conformal", {}).get("scores")
        details = {k: v for k, v in entry.items() if k not in ("temperature", "sha256", "conformal", "ood",
                                                               "melanoma")}
        return cls(float(entry["temperature"]) if entry.get("temperature") else None,
                   None if scores is None else np.asarray(scores, dtype=np.float64),
                   OodDetector.from_entry(entry["ood"]) if entry.get("ood") else None, entry.get("melanoma"),
                   details, source)


def save_calibration(checkpoint: Path, calibration: Calibration) -> Path:
    """Record ``calibration`` for ``checkpoint`` beside it (other checkpoints' entries are kept)."""
    path = checkpoint.parent / FILE_NAME
    entries = json.loads(path.read_text()) if path.is_file() else {}
    entries[checkpoint.name] = {"sha256": file_hash(checkpoint, "sha256"), **calibration.to_entry()}
    # Atomic: the file holds every checkpoint's record, and a write cut short would lose them all.
    atomic_write_text(path, json.dumps(entries, indent=2), "calibration records")
    return path


def load_calibration(checkpoint: Path, digest: str | None = None) -> Calibration:
    """The record fitted for exactly this checkpoint file (whose SHA-256 is ``digest``, where the caller has it);
    an empty one (and a warning when stale) otherwise."""
    path = checkpoint.parent / FILE_NAME
    if not path.is_file():
        return Calibration()
    try:
        entry = json.loads(path.read_text()).get(checkpoint.name)
    except (json.JSONDecodeError, AttributeError):
        print(f"warning: {path} is not a temperature file; probabilities are left uncalibrated", file=sys.stderr)
        return Calibration()
    if entry is None:
        return Calibration()
    if entry.get("sha256") != (digest or file_hash(checkpoint, "sha256")):
        print(f"warning: {path} was fitted for an earlier {checkpoint.name}; probabilities are left uncalibrated. "
              f"Refit with {refit_command(checkpoint)}", file=sys.stderr)
        return Calibration()
    return Calibration.from_entry(entry, f"{path} ({entry.get('fitted_on', 'unknown data')})")


def refit_command(checkpoint: Path | str) -> str:
    """The command that fits every part of the record for ``checkpoint`` on its run's validation part."""
    return (f"`lesionkit evaluate --checkpoint {checkpoint} --data-dir DATA --split-file RUN/split.csv --split val "
            f"--fit-temperature`")
