"""The Lightning module: the loss (with class weights), validation metrics, and one optimizer per phase."""

from __future__ import annotations

import lightning as L
import torch
from timm.data import Mixup
from timm.optim import param_groups_layer_decay
from torchmetrics.classification import MulticlassAccuracy

from lesionkit import LesionkitError, __version__
from lesionkit.config import PhaseConfig
from lesionkit.model.features import head_logits
from lesionkit.model.losses import make_criterion
from lesionkit.model.network import freeze_batchnorm_stats, logits_with_metadata, set_trainable

MONITOR = "val/balanced_accuracy"


class Mixing(Mixup):
    """timm's MixUp/CutMix, one share per batch, that also mixes a batch's clinical metadata in the share its
    labels get, so that image, metadata and label of a mixed sample tell one story."""

    def __init__(self, **settings):
        super().__init__(**settings)
        if self.mode != "batch":
            raise ValueError(f"Mixing mixes metadata with one share per batch (mode='batch'), not mode={self.mode!r}")
        self.share = 1.0

    def _mix_batch(self, x: torch.Tensor) -> float:
        self.share = super()._mix_batch(x)
        return self.share

    def mix_metadata(self, metadata: torch.Tensor) -> torch.Tensor:
        """``metadata`` mixed with the batch reversed, as the images and labels of the last call were."""
        return metadata * self.share + metadata.flip(0) * (1 - self.share)


class LesionClassifier(L.LightningModule):
    """Wraps a timm classifier; ``phase`` decides which of its layers train and how.

    Args:
        model: the network (see ``lesionkit.model.network.create_model``).
        phases: the training phases, in order.
        class_weights: per-class loss weights, or None.
        meta: what inference needs to rebuild the model (model name, classes, preprocessing); saved as
            hyper-parameters so that every checkpoint carries it.
    """

    def __init__(self, model: torch.nn.Module, phases: list[PhaseConfig], class_weights: list[float] | None,
                 meta: dict, label_smoothing: float = 0.0, loss: str = "cross_entropy", focal_gamma: float = 2.0,
                 mixing: Mixing | None = None):
        super().__init__()
        self.save_hyperparameters({**meta, "lesionkit_version": __version__})
        # Channels-last runs EfficientNet's depthwise convolutions about twice as fast on CPU (and feeds GPU
        # tensor cores without transposes).
        self.model = model.to(memory_format=torch.channels_last)
        self.phases = phases
        num_classes = len(meta["classes"])
        self.criterion = make_criterion(loss, class_weights, label_smoothing, focal_gamma)
        # MixUp/CutMix of training batches (labels become class probabilities, which both losses take).
        self.mixing = mixing
        # Balanced accuracy is the mean per-class recall: torchmetrics' macro-averaged accuracy.
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_balanced_accuracy = MulticlassAccuracy(num_classes, average="macro")
        self.phase_index = 0

    @property
    def phase(self) -> PhaseConfig:
        return self.phases[self.phase_index]

    def set_phase(self, index: int) -> None:
        self.phase_index = index
        set_trainable(self.model, self.phase.unfreeze)
        self.train(self.training)

    def train(self, mode: bool = True):
        # Lightning switches to train mode around every validation; re-freeze BatchNorm each time.
        super().train(mode)
        if mode:
            freeze_batchnorm_stats(self.model, everywhere=self.phase.freeze_bn)
        return self

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Logits of images, or of ``(images, metadata)`` for a model with a metadata head."""
        images, metadata = inputs if isinstance(inputs, (tuple, list)) else (inputs, None)
        if images.ndim == 2:  # stored backbone features, in a phase with cache_features (lesionkit.model.features)
            return head_logits(self.model, images)
        return logits_with_metadata(self.model, images.contiguous(memory_format=torch.channels_last), metadata)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        if self.mixing is not None:
            if isinstance(inputs, (tuple, list)):
                images, labels = self.mixing(inputs[0], labels)
                inputs = (images, self.mixing.mix_metadata(inputs[1]))
            else:
                inputs, labels = self.mixing(inputs, labels)
        loss = self.criterion(self(inputs), labels)
        # One bad batch (or a diverging rate) would otherwise train every later step on NaN weights. The check
        # costs no extra sync: the progress bar reads the loss every step anyway.
        if not torch.isfinite(loss):
            raise LesionkitError(
                f"training loss is {loss.item()} at step {self.global_step} (phase {self.phase.name!r}, epoch "
                f"{self.current_epoch}, batch {batch_idx}): stopped rather than train on garbage. Check the data "
                f"or lower train.phases.{self.phase_index}.lr; checkpoints/last.ckpt holds the last good epoch")
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        logits = self(inputs)
        self.log("val/loss", self.criterion(logits, labels), sync_dist=True, batch_size=len(labels))
        self.val_accuracy(logits, labels)
        self.val_balanced_accuracy(logits, labels)
        self.log("val/accuracy", self.val_accuracy)
        self.log(MONITOR, self.val_balanced_accuracy, prog_bar=True)

    def configure_optimizers(self):
        phase = self.phase
        optimizer = adamw(self.param_groups(), lr=phase.lr, weight_decay=phase.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if phase.schedule == "constant":
            return optimizer
        if phase.schedule == "onecycle":
            peaks = [group["lr"] for group in optimizer.param_groups]  # one per layer under lr_decay
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total,
                                                            pct_start=0.3)
        else:
            warmup = min(total - 1, round(total * phase.warmup_epochs / phase.epochs))
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
            if warmup > 0:
                ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
                cosine = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
            scheduler = cosine
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def param_groups(self) -> list[dict]:
        """The parameters that train: one group at the phase's rate, or with ``lr_decay`` below 1 timm's layer
        groups, each at its decayed rate (the schedules scale every group alike)."""
        phase = self.phase
        if phase.lr_decay == 1:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        groups = param_groups_layer_decay(self.model, weight_decay=phase.weight_decay, layer_decay=phase.lr_decay)
        for group in groups:
            group["lr"] = phase.lr * group.pop("lr_scale", 1.0)  # torch's schedulers read lr, not timm's scale
        return groups

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # "stopped": early stopping ended the phase at this epoch, so a resumed run moves on to the next one
        # instead of training an epoch the uninterrupted run never trained.
        checkpoint["lesionkit"] = {"phase": self.phase.name, "phase_index": self.phase_index,
                                   "stopped": bool(self._trainer and self.trainer.should_stop)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._stopped_early = checkpoint.get("lesionkit", {}).get("stopped", False)

    def on_train_start(self) -> None:
        if getattr(self, "_stopped_early", False):
            self.trainer.should_stop, self._stopped_early = True, False


def adamw(params, **options) -> torch.optim.AdamW:
    """AdamW in its fused form: one kernel updates every parameter, on the CPU as on a GPU. On a CPU that
    updates B1's 7.8M parameters several times faster than the default form (docs/speed.md has the figures);
    the arithmetic is AdamW's."""
    return torch.optim.AdamW(params, fused=True, **options)
