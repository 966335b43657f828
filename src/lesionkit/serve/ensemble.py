"""Several trained networks served as one classifier: the members of ``lesionkit train --folds K`` (or of several
such runs, ``lesionkit ensemble``) named in an ensemble manifest, ``RUN/ensemble.json``.

The manifest lists each member's checkpoint (relative to the manifest) with its SHA-256, the classes and the
preprocessing they share, and the ensemble's own calibration record (fitted on the out-of-fold predictions,
:func:`lesionkit.evaluate.decisions.fit_ensemble_calibration`). A member that is missing or whose file changed
is refused, naming the file. :class:`EnsembleClassifier` averages the members' probabilities, each at its own
fitted temperature, and gives the log of that mean as its logits at temperature 1, so that everything written
for one classifier (predict, evaluate, the report, test-time views, export) serves an ensemble unchanged. A
manifest may also weigh the classes (``class_weights``, written by ``lesionkit ensemble --favour-melanoma``): the
mean is then multiplied by the weights and renormalised, the probabilities under a class prior shifted by them.

NumPy and the standard library at import: ``predict --backend onnx`` imports this module to find a manifest.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from lesionkit import LesionkitError
from lesionkit.data.clinical import same_columns
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.evaluate.record import Calibration, refit_command
from lesionkit.files import atomic_write_text, file_hash

MANIFEST_NAME = "ensemble.json"
KIND = "lesionkit-ensemble"
COMBINATION = "mean of the members' probabilities, each at its own fitted temperature; logits = log(mean), T = 1"


def manifest_for(path: Path) -> Path | None:
    """The manifest that ``--checkpoint path`` names: ``path`` itself when it is a ``.json`` file, ``path /
    ensemble.json`` for a folder; None for anything else (a checkpoint, an export)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise LesionkitError(f"{path} is a folder without {MANIFEST_NAME}: give a checkpoint "
                                 f"(RUN/checkpoints/best.ckpt) or the folder of a `lesionkit train --folds` run")
        return path / MANIFEST_NAME
    return path if path.suffix == ".json" else None


def run_folder(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/best.ckpt`` and for ``RUN/ensemble.json``."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent if checkpoint.suffix == ".json" else checkpoint.parent.parent


def write_manifest(path: Path, checkpoints: list[Path], classes: list[str], preprocessing: Preprocessing,
                   calibration: Calibration, **extra) -> Path:
    """Write the manifest of the members ``checkpoints`` (named relative to ``path``'s folder) with their hashes."""
    members = [{"checkpoint": Path(os.path.relpath(Path(c).resolve(), path.parent.resolve())).as_posix(),
                "sha256": file_hash(c, "sha256")} for c in checkpoints]
    manifest = {"kind": KIND, "members": members, "classes": list(classes),
                "preprocessing": preprocessing.to_dict(), "combination": COMBINATION,
                "calibration": calibration.to_entry(), **extra}
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n", "ensemble manifest")
    return path


def read_manifest(path: Path) -> tuple[dict, list[Path]]:
    """The manifest at ``path`` and its members' paths, each checked to exist with the hash it was written with."""
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LesionkitError(f"ensemble manifest {path} does not exist: check --checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LesionkitError(f"{path} is not an ensemble manifest (not JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not manifest.get("members"):
        raise LesionkitError(f"{path} is not a lesionkit ensemble manifest (kind {KIND!r} with members): write "
                             f"one with `lesionkit train --folds K`")
    folder = Path(path).parent
    # What writes this manifest again: a combination of runs, or one cross-validation.
    favour = f" --favour-melanoma {manifest['favour_melanoma']}" if manifest.get("favour_melanoma") else ""
    again = (f"lesionkit ensemble {' '.join(os.path.normpath(folder / run) for run in manifest['runs'])} --out "
             f"{folder}{favour}" if manifest.get("runs") else f"lesionkit train --folds K --out {folder} --resume")
    members = []
    for member in manifest["members"]:
        checkpoint = Path(os.path.normpath(folder / member["checkpoint"]))  # ../ where runs were combined
        if not checkpoint.is_file():
            raise LesionkitError(f"{path}: member {checkpoint} does not exist; the ensemble needs every member "
                                 f"(rerun `{again}`)")
        if file_hash(checkpoint, "sha256") != member["sha256"]:
            raise LesionkitError(f"{path}: member {checkpoint} is not the file the manifest was written for (its "
                                 f"SHA-256 differs): it was retrained or replaced; write the manifest again with "
                                 f"`{again}`")
        members.append(checkpoint)
    return manifest, members


class EnsembleClassifier:
    """Members that share classes and preprocessing, behind the :class:`lesionkit.serve.classifier.Classifier`
    interface: the mean of their calibrated probabilities, as ``logits = log(mean)`` with ``temperature = 1``.

    Every member reads the metadata vector that member 1's encoding writes; a member whose training part scaled
    age otherwise is adapted to it on loading
    (:meth:`lesionkit.serve.torch_classifier.TorchClassifier.read_metadata_as`).
    ``features_and_logits`` gives the first member's pooled features, which the record's out-of-distribution
    detector was fitted on (that member's own, from its validation fold).
    """

    temperature = 1.0

    def __init__(self, members: list, calibration: Calibration = Calibration(), meta: dict | None = None,
                 weights: np.ndarray | None = None):
        first = members[0]
        for n, member in enumerate(members[1:], 2):
            if list(member.classes) != list(first.classes):
                raise LesionkitError(f"ensemble member {n} predicts {member.classes}, member 1 {first.classes}: "
                                     f"members must share their classes")
            if member.preprocessing.to_dict() != first.preprocessing.to_dict():
                raise LesionkitError(f"ensemble member {n} sees images as {member.preprocessing.to_dict()}, member "
                                     f"1 as {first.preprocessing.to_dict()}: members must share their preprocessing")
            if not same_columns(member.encoding, first.encoding):
                raise LesionkitError(f"ensemble member {n} reads clinical metadata as {reads(member.encoding)}, "
                                     f"member 1 as {reads(first.encoding)}: members must read the same fields and "
                                     f"levels")
            if member.encoding is not None:
                member.read_metadata_as(first.encoding)  # folds scale age by their own training parts
        self.members, self.calibration = members, calibration
        self.classes, self.preprocessing, self.encoding = list(first.classes), first.preprocessing, first.encoding
        names = sorted({member.meta["model_name"] for member in members})
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights is not None and len(self.weights) != len(self.classes):
            raise LesionkitError(f"class weights for {len(self.weights)} classes, and the members predict "
                                 f"{len(self.classes)}: write the manifest again with `lesionkit ensemble`")
        shifted = [] if self.weights is None else [f"{name} x{weight:.2f}" for name, weight in zip(
            self.classes, self.weights, strict=True) if weight != 1]
        weighted = f", weighted {', '.join(shifted)}" if shifted else ""
        self.meta = {"kind": KIND, "model_name": f"ensemble of {len(members)} {', '.join(names)}{weighted}",
                     "classes": self.classes, "preprocessing": first.preprocessing.to_dict(),
                     "config": first.meta.get("config"), "metadata": first.meta.get("metadata"), **(meta or {})}
        self.temperature_source = calibration.source
        # The loader's picklable torchvision transform, where the members have one (lesionkit.evaluate.evaluation).
        self.eval_transform = getattr(first, "eval_transform", None)

    @classmethod
    def from_checkpoints(cls, checkpoints: list[Path], device: str = "cpu", calibration: Calibration = Calibration(),
                         meta: dict | None = None, weights: np.ndarray | None = None) -> EnsembleClassifier:
        """The ``checkpoints`` under PyTorch, each with its own fitted temperature (refused without one)."""
        from lesionkit.serve.torch_classifier import TorchClassifier

        members = [TorchClassifier.load(checkpoint, device) for checkpoint in checkpoints]
        for checkpoint, member in zip(checkpoints, members, strict=True):
            if member.calibration.temperature is None:
                raise LesionkitError(f"ensemble member {checkpoint} has no fitted temperature, and the ensemble "
                                     f"averages calibrated probabilities; fit it with {refit_command(checkpoint)}")
        return cls(members, calibration, meta, weights)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> EnsembleClassifier:
        """The members of the manifest ``path``, with the ensemble's record that the manifest carries."""
        manifest, checkpoints = read_manifest(path)
        weights = manifest.get("class_weights")
        ensemble = cls.from_checkpoints(checkpoints, device, Calibration.from_entry(manifest.get("calibration"),
                                                                                    str(path)),
                                        {"members": manifest["members"], "manifest": str(path),
                                         **({"class_weights": weights} if weights is not None else {})},
                                        None if weights is None else parse_class_weights(weights, manifest["classes"],
                                                                                         path))
        if list(manifest["classes"]) != ensemble.classes:
            raise LesionkitError(f"{path} names classes {manifest['classes']}, its members predict "
                                 f"{ensemble.classes}")
        return ensemble

    def transform(self, image: Image.Image) -> np.ndarray:
        return self.members[0].transform(image)

    def combine(self, member_logits: list[np.ndarray]) -> np.ndarray:
        """``log(mean_k softmax(logits_k / T_k))``, through log-softmax and log-sum-exp so that no probability
        underflows to a logit of minus infinity; float32 like every backend's logits."""
        logs = []
        for logits, member in zip(member_logits, self.members, strict=True):
            scaled = np.asarray(logits, dtype=np.float64) / member.temperature
            logs.append(scaled - np.logaddexp.reduce(scaled, axis=-1, keepdims=True))
        mean = np.logaddexp.reduce(np.stack(logs), axis=0) - np.log(len(logs))
        if self.weights is not None:
            mean = mean + np.log(self.weights)
            mean = mean - np.logaddexp.reduce(mean, axis=-1, keepdims=True)
        return mean.astype(np.float32)

    def logits(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        return self.combine([member.logits(batch, metadata) for member in self.members])

    def features_and_logits(self, batch: np.ndarray, metadata: np.ndarray | None = None
                            ) -> tuple[np.ndarray | None, np.ndarray]:
        """The first member's pooled features (what the out-of-distribution detector reads) and the ensemble's
        logits; the first member's logits come from the same pass as its features."""
        features, first = self.members[0].features_and_logits(batch, metadata)
        return features, self.combine([first, *(member.logits(batch, metadata) for member in self.members[1:])])

    def head_logits(self, features: np.ndarray, metadata: np.ndarray | None = None) -> None:
        return None  # the features are the first member's; the others' heads need their own


def parse_class_weights(weights, classes: list[str], path: Path) -> np.ndarray:
    """The manifest ``path``'s ``class_weights`` (class name: weight) as one positive weight per class, in
    ``classes``' order; a class left out has weight 1."""
    def positive(weight) -> bool:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return False
        try:
            return math.isfinite(float(weight)) and weight > 0
        except OverflowError:  # an integer too large for a float
            return False

    if not isinstance(weights, dict) or set(weights) - set(classes) or not all(map(positive, weights.values())):
        raise LesionkitError(f"{path}: class_weights {weights!r} must give positive numbers for classes among "
                             f"{', '.join(classes)}, as `lesionkit ensemble --favour-melanoma` writes them")
    return np.array([float(weights.get(name, 1.0)) for name in classes])


def reads(encoding) -> str:
    """What a member's clinical encoding reads, in words, for the error that refuses unlike members."""
    if encoding is None:
        return "nothing (an image-only model)"
    return "; ".join(f"{name} ({', '.join(encoding.levels[name])})" if name in encoding.levels else name
                     for name in encoding.fields)


def load_torch_classifier(checkpoint: Path, device: str = "cpu"):
    """What ``--checkpoint`` names under PyTorch: a checkpoint's :class:`TorchClassifier`, or the
    :class:`EnsembleClassifier` of a manifest (or of a folder holding ``ensemble.json``)."""
    manifest = manifest_for(checkpoint)
    if manifest is not None:
        return EnsembleClassifier.load(manifest, device)
    from lesionkit.serve.torch_classifier import TorchClassifier
    return TorchClassifier.load(checkpoint, device)
