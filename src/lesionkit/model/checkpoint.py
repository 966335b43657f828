"""Checkpoints read without running anyone's code and checked before use.

- Reading: :func:`load_checkpoint` always uses ``torch.load(weights_only=True)`` (tensors and plain values,
  never pickled code), for ``predict``/``evaluate`` and for ``train --resume`` alike.
- Checking: :func:`check_compatible` explains a checkpoint from another model, class list or a newer lesionkit.

Writing them whole, and resuming to the same result, is training's part (:mod:`lesionkit.train.resume`); this module
stays free of Lightning, whose import alone takes a second that ``predict`` need not wait.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from lesionkit import CLASSES, LesionkitError, __version__
from lesionkit.data.preprocessing import Preprocessing

REQUIRED_META = ("model_name", "classes", "preprocessing")


def checkpoint_meta(model_name: str, preprocessing: Preprocessing, classes: list[str] | tuple[str, ...] = CLASSES,
                    **extra) -> dict[str, Any]:
    """What every consumer of a trained network needs to rebuild it and see images as it did in training: the
    timm model name, the class names in output order and the preprocessing; ``extra`` adds more (the training
    config, the temperature)."""
    return {"model_name": model_name, "classes": list(classes), "preprocessing": preprocessing.to_dict(), **extra}


def saved_by_torch(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's files do: a zip archive, or a pickle in the legacy format. Any other
    file would reach torch.load's unpickler and be misread as pickled code, or fail with a bare byte value."""
    with path.open("rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; refuse pickled objects and damaged files with a message."""
    path = Path(path)
    if not path.is_file():
        raise LesionkitError(f"checkpoint {path} does not exist: check --checkpoint")
    if path.suffix == ".onnx":
        raise LesionkitError(f"{path} is an ONNX export, not a checkpoint: serve it with `lesionkit predict "
                             f"--backend onnx`, or pass the .ckpt it was exported from")
    if not saved_by_torch(path):
        raise LesionkitError(f"cannot load checkpoint {path}: it is not a file torch.save writes (a zip archive or "
                             f"a pickle); use a checkpoint written by `lesionkit train`")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise LesionkitError(
                f"cannot load checkpoint {path} safely: it holds pickled Python objects besides tensors and plain "
                f"values, and loading those could run arbitrary code. Refused; use a checkpoint written by "
                f"`lesionkit train`") from None
        raise LesionkitError(f"cannot load checkpoint {path} safely: not a PyTorch checkpoint ({err})") from None
    except Exception as err:  # truncated zip, wrong format, ...: torch raises several types
        raise LesionkitError(f"cannot load checkpoint {path} safely: {str(err).splitlines()[0]}; the file is "
                             f"damaged or not a checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise LesionkitError(f"{path} is not a lesionkit checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


def _major(version: str) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def check_compatible(checkpoint: dict, path: str | Path, model_name: str | None = None,
                     classes: list[str] | None = None) -> dict:
    """Return the checkpoint's metadata after checking it is a lesionkit checkpoint this lesionkit can use.

    Args:
        checkpoint: as returned by :func:`load_checkpoint`.
        path: for messages.
        model_name, classes: what the caller will build; a checkpoint of another model or class list is refused.
    """
    meta = checkpoint.get("hyper_parameters")
    if not isinstance(meta, dict) or any(k not in meta for k in REQUIRED_META) or "state_dict" not in checkpoint:
        raise LesionkitError(f"{path} is not a lesionkit checkpoint (no model name, classes, preprocessing or "
                             f"weights); use one written by `lesionkit train`")
    written_by = meta.get("lesionkit_version", "unknown")
    theirs, ours = _major(written_by), _major(__version__)
    if theirs is not None and ours is not None and theirs > ours:
        raise LesionkitError(f"{path} was written by lesionkit {written_by}, a newer major version than this "
                             f"lesionkit {__version__}: upgrade lesionkit to read it")
    if model_name is not None and meta["model_name"] != model_name:
        raise LesionkitError(f"{path} holds a {meta['model_name']} model, but the run is configured for "
                             f"{model_name}: resume with the config the checkpoint was trained with")
    if classes is not None and list(meta["classes"]) != list(classes):
        raise LesionkitError(f"{path} predicts {len(meta['classes'])} classes ({', '.join(meta['classes'])}), "
                             f"not the {len(classes)} expected ({', '.join(classes)})")
    return meta


def slim_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write the part of ``source`` that serving reads: its metadata and the network's weights, the matrices
    (convolution and linear weights) in float16 and every vector (biases, batch-norm statistics) as it was. No
    optimizer state, no training loop state: a third of the float32 file's size, and no longer resumable."""
    from lesionkit.files import atomic_write

    source = Path(source)
    checkpoint = load_checkpoint(source)
    meta = check_compatible(checkpoint, source)
    weights = {name: tensor.half() if tensor.is_floating_point() and tensor.dim() > 1 else tensor
               for name, tensor in checkpoint["state_dict"].items() if name.startswith("model.")}
    slim = {"hyper_parameters": {**meta, "slimmed_from": source.name}, "state_dict": weights,
            "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version")}
    atomic_write(Path(out), lambda tmp: torch.save(slim, tmp), "checkpoint")
    return Path(out)
