"""The training losses: cross-entropy (torch's), and the softmax focal loss, written here because torchvision's
``sigmoid_focal_loss`` is the one-class-per-output (sigmoid) form and timm has none for a softmax over classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FocalLoss(torch.nn.Module):
    """Focal loss over a softmax (Lin et al. 2017): ``-sum_c q_c w_c (1 - p_c)^gamma log p_c`` per image, ``q``
    the (label-smoothed) target, ``w`` the class weights, averaged with the weights of the true classes as
    :class:`torch.nn.CrossEntropyLoss` averages; ``gamma = 0`` is that cross-entropy exactly. ``target`` is
    class indices, or ``(n, classes)`` probabilities (MixUp's), which torch's loss averages over images."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        classes = logits.shape[1]
        soft = target.is_floating_point()
        q = target.float() if soft else F.one_hot(target, classes).float()
        q = q * (1 - self.label_smoothing) + self.label_smoothing / classes
        terms = -q * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.weight is None:
            return terms.sum() / len(target)
        return (terms * self.weight).sum() / (len(target) if soft else self.weight[target].sum())


def make_criterion(loss: str, class_weights: list[float] | None, label_smoothing: float,
                   focal_gamma: float) -> torch.nn.Module:
    """The loss ``train.loss`` names, with its class weights and label smoothing."""
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if loss == "focal":
        return FocalLoss(focal_gamma, weight, label_smoothing)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
