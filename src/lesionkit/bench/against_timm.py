"""Training the whole network on real images, lesionkit's way against the training loop of timm's reference
``train.py``: what ``lesionkit benchmark`` and ``scripts/against_timm_train.py`` compare."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import timm
import torch
from lightning.pytorch.callbacks import Callback

from lesionkit import CLASSES
from lesionkit.data.cache import build_cache
from lesionkit.config import AugmentConfig, ModelConfig, PhaseConfig, TrainConfig
from lesionkit.data.datasets import ImageDataset, make_loader
from lesionkit.model.network import create_model
from lesionkit.model.checkpoint import checkpoint_meta
from lesionkit.model.module import LesionClassifier
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.bench.timing import synchronize
from lesionkit.train.loop import resolve_precision
from lesionkit.data.transforms import train_transform


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's start-up notes (devices found, tips) say nothing about speed: keep them out of the output."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class StepTimer(Callback):
    """Images and wall time from the end of the first training step (start-up, first batch) to the end of the
    last: the steady pace of ``trainer.fit``, data waits included."""

    def __init__(self):
        self.start = self.end = None
        self.images = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize(module.device)
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        else:
            self.images, self.end = self.images + len(batch[1]), now

    @property
    def images_per_s(self) -> float:
        return self.images / (self.end - self.start)


def lesionkit_full_network(model_name: str, dataset: ImageDataset, pre: Preprocessing, batch_size: int, steps: int,
                           device: torch.device) -> float:
    """Images/s of ``trainer.fit`` of the Lightning module ``lesionkit train`` runs, training everything with
    BatchNorm statistics updating."""
    model = create_model(ModelConfig(name=model_name, weights="none"), len(CLASSES))
    meta = checkpoint_meta(model_name, pre)
    module = LesionClassifier(model, [PhaseConfig("full", 1, 1e-4, unfreeze=-1, freeze_bn=False)], None, meta)
    module.set_phase(0)
    timer = StepTimer()
    with warnings.catch_warnings(), quiet_lightning():
        warnings.simplefilter("ignore")  # Lightning's notes on the missing validation and few workers
        trainer = L.Trainer(max_steps=steps + 1, accelerator=device.type, devices=1,
                            precision=resolve_precision(TrainConfig()), callbacks=[timer], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, make_loader(dataset, batch_size, train=True))
    return timer.images_per_s


def timm_full_network(model_name: str, dataset: ImageDataset, batch_size: int, steps: int,
                      device: torch.device) -> float:
    """Images/s of the training loop of timm's reference ``train.py`` with its defaults: SGD with Nesterov
    momentum, label smoothing 0.1, channels-last (``--channels-last``), bf16 autocast on a GPU (``--amp``)."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2

    model = timm.create_model(model_name, num_classes=len(CLASSES)).to(device, memory_format=torch.channels_last)
    model.train()
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1 * batch_size / 256, weight_decay=2e-5, momentum=0.9)
    criterion = LabelSmoothingCrossEntropy(0.1)
    batches = itertools.chain.from_iterable(itertools.repeat(make_loader(dataset, batch_size, train=True)))
    images, start = 0, None
    for _, (inputs, labels) in zip(range(steps + 1), batches):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = criterion(model(inputs.to(device).contiguous(memory_format=torch.channels_last)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if start is None:  # from the end of the first step, as StepTimer
            start = time.perf_counter()
        else:
            images += len(labels)
    return images / (time.perf_counter() - start)


def training_data(frame: pd.DataFrame, model_name: str, size: int, cache_dir: Path
                  ) -> tuple[Preprocessing, ImageDataset]:
    """``frame``'s images as ``lesionkit train`` feeds ``model_name`` at ``size`` x ``size``: from the image cache
    (built in ``cache_dir``), through the training augmentation."""
    data_config = timm.data.resolve_model_data_config(timm.create_model(model_name, pretrained=False))
    pre = Preprocessing.from_model_config(data_config, [size, size])
    cache = build_cache(frame, pre, cache_dir, progress=False)
    return pre, ImageDataset.from_frame(frame, train_transform(pre, AugmentConfig()), cache)


def bench_full_network(frame: pd.DataFrame, model_name: str, size: int, batch_size: int, steps: int,
                       cache_dir: Path, device: torch.device) -> dict:
    """Training the whole network on the same real images at ``size`` x ``size``, BatchNorm statistics updating,
    with the same loader settings: lesionkit (images from the cache through its augmentation) against the way
    timm's reference ``train.py`` does it (every JPEG decoded at each step through timm's training transform:
    random resized crop, flip, colour jitter). Three rounds in alternating order, the best of each side kept:
    the two differ by less than this machine's swings from one round to the next."""
    batch_size = min(batch_size, len(frame))
    pre, ours = training_data(frame, model_name, size, cache_dir)
    theirs = ImageDataset.from_frame(frame, timm.data.create_transform(
        size, is_training=True, interpolation="random", mean=pre.mean, std=pre.std))
    sides = {"lesionkit": lambda: lesionkit_full_network(model_name, ours, pre, batch_size, steps, device),
             "timm": lambda: timm_full_network(model_name, theirs, batch_size, steps, device)}
    best = dict.fromkeys(sides, 0.0)
    for order in (("lesionkit", "timm"), ("timm", "lesionkit"), ("lesionkit", "timm")):  # neither always first
        for side in order:
            best[side] = max(best[side], sides[side]())
    lesionkit, timm_way = best["lesionkit"], best["timm"]
    return {"images_per_s": lesionkit, "timm_train_py_images_per_s": timm_way, "ratio": lesionkit / timm_way,
            "batch_size": batch_size, "size": [size, size]}
