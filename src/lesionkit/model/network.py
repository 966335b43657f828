"""The classifier: a timm backbone with a head of global average pooling, dropout and a linear layer, and which
of its layer groups train in each phase."""

from __future__ import annotations

import timm
import torch
from timm.models import group_modules

from lesionkit import LesionkitError
from lesionkit.config import ModelConfig
from lesionkit.model.weights import load_pretrained


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
    if cfg.weights not in ("hub", "none"):
        load_pretrained(model, cfg.weights)
    return model


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
