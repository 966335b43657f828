"""Backbone features computed once, for a phase that trains only the head (``cache_features: true``).

With the backbone frozen and no augmentation, every epoch would push the same images through the same
frozen layers: one pass stores each image's pooled features (1,280 floats for EfficientNet-B1/Lite1, 5 KB),
and the epochs then train dropout + linear on them, which costs next to nothing beside a backbone pass.
The head sees exactly what it would have seen: the features are timm's ``forward_head(pre_logits=True)``
in eval mode (frozen BatchNorm), and ``head_logits`` applies the model's dropout and classifier to them.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler
from tqdm import tqdm

from lesionkit.data.datasets import make_loader


def _device() -> torch.device:
    # Under DDP each process computes its own copy on its own GPU (LOCAL_RANK), before fit() starts.
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    return torch.device("cpu")


@torch.inference_mode()
def backbone_features(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features and labels of every image ``loader`` yields, in order, as float32 on the CPU."""
    device, was_training = _device(), model.training
    model.eval().to(device)
    features, labels = [], []
    try:
        for images, targets in tqdm(loader, desc="Computing backbone features", unit="batch", leave=False):
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                pooled = model.forward_head(model.forward_features(images), pre_logits=True)
            features.append(pooled.float().cpu())
            labels.append(torch.as_tensor(targets))
    finally:
        model.train(was_training).to("cpu")
    return torch.cat(features), torch.cat(labels)


def head_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The model's dropout and classifier on stored features: what ``model(images)`` does after pooling."""
    dropped = torch.nn.functional.dropout(features, getattr(model, "drop_rate", 0.0), model.training)
    return model.get_classifier()(dropped)


def feature_loaders(model: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader
                    ) -> tuple[DataLoader, DataLoader]:
    """Loaders of stored features in place of the image loaders, with the same batch size and shuffling (or the
    same sampler: its weights follow the dataset's order, which the stored features keep)."""
    # The training images once each, in order: a loader that neither shuffles nor drops the last batch.
    ordered = make_loader(train_loader.dataset, train_loader.batch_size, train=False,
                          workers=train_loader.num_workers)
    train = TensorDataset(*backbone_features(model, ordered))
    val = TensorDataset(*backbone_features(model, val_loader))
    sampler = train_loader.sampler if isinstance(train_loader.sampler, WeightedRandomSampler) else None
    return (make_loader(train, train_loader.batch_size, train=True, workers=0, sampler=sampler),
            make_loader(val, val_loader.batch_size, train=False, workers=0))
