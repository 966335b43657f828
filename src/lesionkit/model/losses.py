"""The training losses: cross-entropy (torch's), and the softmax focal loss, written here because torchvision's
``sigmoid_focal_loss`` is the one-class-per-output (sigmoid) form and timm has none for a softmax over classes.
The focal loss at ``gamma = 0`` also serves as the cross-entropy where class weights and label smoothing meet."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FocalLoss(torch.nn.Module):
    """Focal loss over a softmax (Lin et al. 2017): ``-sum_c q_c (1 - p_c)^gamma log p_c`` per image, ``q``
    the label-smoothed target, ``gamma = 0`` the cross-entropy. Class weights weigh each image by its target's
    class (``t . w`` for a mixed target ``t``), smoothing mass included, and the images are averaged with those
    weights (over the image count for mixed targets, as :class:`torch.nn.CrossEntropyLoss` averages them).

    Without label smoothing this is torch's weighted cross-entropy at ``gamma = 0``. With it, torch's weighs the
    smoothing mass spread over every class by that class's weight, so that under balanced weights most of an
    nv image's target lies on the rare classes; here it keeps the image's own weight."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        classes = logits.shape[1]
        soft = target.is_floating_point()
        t = target.float() if soft else F.one_hot(target, classes).float()
        weight = torch.ones(classes, device=logits.device) if self.weight is None else self.weight
        image_weight = t @ weight
        q = (1 - self.label_smoothing) * t * weight + self.label_smoothing / classes * image_weight[:, None]
        terms = -q * (1 - log_p.exp()).pow(self.gamma) * log_p
        return terms.sum() / (len(target) if soft else image_weight.sum())


def make_criterion(loss: str, class_weights: list[float] | None, label_smoothing: float,
                   focal_gamma: float) -> torch.nn.Module:
    """The loss ``train.loss`` names, with its class weights and label smoothing."""
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if loss == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    if weight is not None and label_smoothing:
        return FocalLoss(0.0, weight, label_smoothing)  # torch's would weigh the smoothing mass by class
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
