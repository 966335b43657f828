"""The classifier: a timm backbone with a head of global average (or attention) pooling, dropout and a linear
layer, and which of its layer groups train in each phase."""

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
    set_pool(model, cfg.pool)
    return model


class AttentionPool(torch.nn.Module):
    """Attention pooling of a feature map: a 1x1 convolution scores every position, a softmax over the
    positions weighs them, and the features' weighted sum is the pooled vector (attention-based pooling in
    the manner of Ilse et al. 2018, one head, ungated). Zero-initialised, it starts as global average pooling.
    Written here because timm's ``AttentionPool2d`` wants a fixed feature-map size, which test-time turns and
    other input sizes change."""

    def __init__(self, channels: int):
        super().__init__()
        self.score = torch.nn.Conv2d(channels, 1, kernel_size=1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.score(x).flatten(2), dim=-1)  # (n, 1, positions)
        return (x.flatten(2) * weights).sum(dim=-1)


def set_pool(model: torch.nn.Module, pool: str) -> torch.nn.Module:
    """Give ``model`` the head pooling ``model.pool`` names (timm's average pooling is already there)."""
    if pool == "attention":
        if not isinstance(getattr(model, "global_pool", None), torch.nn.Module):
            raise LesionkitError(f"model.pool=attention replaces a timm model's global_pool, which "
                                 f"{type(model).__name__} does not have; use model.pool=avg")
        model.global_pool = AttentionPool(model.num_features)
    return model


class MetadataHead(torch.nn.Module):
    """The classifier of a model that reads clinical metadata (``model.metadata``): a small MLP embeds the
    metadata vector (:class:`lesionkit.data.clinical.ClinicalEncoding`), and one linear layer classifies the pooled
    image features and that embedding side by side, as the ISIC 2019 and 2020 winners fused them.

    Called with the features alone (timm's ``model(images)``, the ONNX export's image-only path) it reads every
    field as unknown. In training each field of each image is replaced by its unknown value with
    probability ``field_dropout``, so that the model learns to answer without metadata too."""

    def __init__(self, features: int, classes: int, unknown: torch.Tensor, slices: list[tuple[int, int]],
                 hidden: int = 64, field_dropout: float = 0.3):
        super().__init__()
        self.embed = torch.nn.Sequential(torch.nn.Linear(unknown.numel(), hidden), torch.nn.SiLU(),
                                         torch.nn.Linear(hidden, hidden), torch.nn.SiLU())
        self.fc = torch.nn.Linear(features + hidden, classes)
        torch.nn.init.normal_(self.fc.weight, std=0.01)  # as create_model starts the plain classifier
        torch.nn.init.zeros_(self.fc.bias)
        self.register_buffer("unknown", unknown.reshape(1, -1).float())
        self.slices, self.field_dropout = slices, field_dropout

    def forward(self, features: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        if metadata is None:
            metadata = self.unknown.expand(len(features), -1)
        elif self.training and self.field_dropout:
            metadata = metadata.clone()
            for start, stop in self.slices:
                dropped = torch.rand(len(metadata), 1, device=metadata.device) < self.field_dropout
                metadata[:, start:stop] = torch.where(dropped, self.unknown[:, start:stop], metadata[:, start:stop])
        return self.fc(torch.cat([features, self.embed(metadata.to(features.dtype))], dim=1))

    @torch.no_grad()
    def read_age_as(self, column: int, scale: float, shift: float) -> None:
        """Give, from now on, the logits it gave before for vectors whose known ages are written ``(ours - shift) /
        scale`` (:meth:`lesionkit.data.clinical.ClinicalEncoding.age_from`): the change of scale goes into the
        first layer's weights (the missing flag in ``column + 1`` keeps a missing age at 0), so the torch path
        and an ONNX export read the other vectors alike."""
        first = self.embed[0]
        age = first.weight[:, column].clone()
        first.weight[:, column] = age * scale
        first.weight[:, column + 1] -= age * shift
        first.bias += age * shift


def attach_metadata(model: torch.nn.Module, encoding, field_dropout: float = 0.0) -> torch.nn.Module:
    """Give ``model`` a :class:`MetadataHead` for ``encoding`` (a :class:`lesionkit.data.clinical.ClinicalEncoding`)
    in place of its linear classifier."""
    head = model.pretrained_cfg.get("classifier", "classifier")
    classes = model.get_classifier().out_features
    unknown = torch.from_numpy(encoding.unknown(1)[0])
    model.set_submodule(head, MetadataHead(model.num_features, classes, unknown, encoding.slices,
                                           field_dropout=field_dropout))
    return model


def logits_with_metadata(model: torch.nn.Module, images: torch.Tensor, metadata: torch.Tensor | None
                         ) -> torch.Tensor:
    """``model(images)``, with ``metadata`` reaching a :class:`MetadataHead` when given."""
    if metadata is None:
        return model(images)
    return model.get_classifier()(model.forward_head(model.forward_features(images), pre_logits=True), metadata)


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
