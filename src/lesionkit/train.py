"""``lesionkit train``: data check, lesion-grouped split, the phases in order, then a report on validation.

Each phase is one Lightning ``fit`` on the same model: the phase list in the config is the recipe, so
a third phase is a YAML entry, not code. The ``best`` checkpoint is the best validation balanced accuracy
over all phases; ``last`` is where ``--resume`` picks up.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from sklearn.utils.class_weight import compute_class_weight

from lesionkit import CLASSES, LesionkitError
from lesionkit.config import Config, TrainConfig, save_config
from lesionkit.data import limit_per_class, load_dataset, refuse_problems, summary
from lesionkit.evaluate import evaluate_frame
from lesionkit.loader import ImageDataset, make_loader
from lesionkit.model import create_model
from lesionkit.module import MONITOR, LesionClassifier
from lesionkit.split import make_split, read_split, save_split
from lesionkit.transforms import Preprocessing, eval_transform, train_transform


class EpochTable(Callback):
    """Append one row per epoch to ``metrics.csv``: phase, losses, validation accuracy and balanced accuracy."""

    FIELDS = ["phase", "epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"]

    def __init__(self, path: Path):
        self.path = path

    def on_train_epoch_end(self, trainer: L.Trainer, module: LesionClassifier) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = [module.phase.name, trainer.current_epoch, trainer.global_step,
               trainer.optimizers[0].param_groups[0]["lr"], m.get("train/loss_epoch"), m.get("val/loss"),
               m.get("val/accuracy"), m.get(MONITOR)]
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.FIELDS)
            writer.writerow(row)


def class_weights(labels: np.ndarray, mode: str) -> list[float] | None:
    """scikit-learn's balanced weights n / (k * count_c): every class contributes equally to the loss."""
    if mode == "none":
        return None
    present = np.unique(labels)
    if len(present) < len(CLASSES):
        missing = sorted(set(CLASSES) - {CLASSES[i] for i in present})
        raise LesionkitError(f"the train part has no images of {', '.join(missing)}; balanced class weights "
                             f"need every class (use more data or train.class_weights=none)")
    return compute_class_weight("balanced", classes=np.arange(len(CLASSES)), y=labels).tolist()


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def prepare_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "checkpoints" / "last.ckpt").is_file():
            raise LesionkitError(f"--resume: {out}/checkpoints/last.ckpt does not exist; nothing to resume")
        return
    if (out / "config.yaml").exists():
        raise LesionkitError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def prepare_data(config: Config, out: Path, resume: bool) -> tuple[pd.DataFrame, list[str]]:
    """Check the data, make or reuse the split; return the split frame (with paths) and the skipped ids."""
    dataset = load_dataset(config.data.data_dir, config.data.metadata)
    refuse_problems(dataset, config.data.allow_missing)
    skipped = sorted(dataset.problems)
    if skipped:
        pd.DataFrame({"image_id": skipped, "problem": [dataset.problems[i] for i in skipped]}).to_csv(
            out / "skipped.csv", index=False)
        print(f"Skipping {len(skipped)} missing or unreadable image(s), listed in {out / 'skipped.csv'}")
    frame = limit_per_class(dataset.usable, config.data.per_class_limit, config.split.seed)
    split_file = out / "split.csv" if resume else config.split.split_file
    if split_file:
        split = read_split(Path(split_file), dataset.frame)
        split = split[split["image_id"].isin(frame["image_id"])]
    else:
        split = make_split(frame, config.split.val_fraction, config.split.test_fraction, config.split.seed)
    save_split(split, out / "split.csv")
    split = split.merge(frame[["image_id", "path"]], on="image_id")
    table = summary(split).join(split.pivot_table(index="dx", columns="split", values="image_id", aggfunc="size"))
    print(f"Data: {len(split)} images of {split['lesion_id'].nunique()} lesions\n{table.fillna(0).to_string()}")
    return split, skipped


def train(config: Config, out: Path, resume: bool = False) -> dict:
    """Run every phase, then write the validation report of the best checkpoint. Returns that report."""
    # Both are expected here: frozen BatchNorms sit in eval mode on purpose, and phases share one folder.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    prepare_out_dir(out, resume)
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    split, skipped = prepare_data(config, out, resume)
    if not resume:
        save_config(config, out / "config.yaml")

    # A resumed run overwrites every weight from its checkpoint: no need to fetch the pretrained ones again.
    model = create_model(replace(config.model, weights="none") if resume else config.model, len(CLASSES))
    pre = Preprocessing.from_model_config(timm.data.resolve_model_data_config(model), config.data.image_size)
    parts = {name: split[split["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}
    weights = class_weights(np.array([CLASSES.index(d) for d in parts["train"]["dx"]]), config.train.class_weights)
    meta = {"model_name": config.model.name, "classes": list(CLASSES), "preprocessing": pre.to_dict(),
            "config": config.to_dict()}
    module = LesionClassifier(model, config.train.phases, weights, meta, config.train.label_smoothing)

    workers, batch = config.data.num_workers, config.data.batch_size
    train_loader = make_loader(ImageDataset.from_frame(parts["train"], train_transform(pre, config.augment)),
                               batch, train=True, workers=workers)
    val_loader = make_loader(ImageDataset.from_frame(parts["val"], eval_transform(pre)), batch, train=False,
                             workers=workers)

    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    start = torch.load(last, map_location="cpu", weights_only=True)["lesionkit"]["phase_index"] if resume else 0
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="max", save_last=True,
                           enable_version_counter=False)
    for index, phase in enumerate(config.train.phases):
        if index < start:
            continue
        print(f"Phase {index + 1}/{len(config.train.phases)} '{phase.name}': {phase.epochs} epoch(s) at lr "
              f"{phase.lr:g}, training {'everything' if phase.unfreeze == -1 else f'the top {phase.unfreeze} layer group(s) and the head'}")
        module.set_phase(index)
        # A fresh checkpoint callback per phase, carrying the best score so far so that 'best' spans phases.
        previous, best = best, ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=MONITOR, mode="max",
                                               save_last=True, enable_version_counter=False)
        best.load_state_dict(previous.state_dict())
        callbacks = [best, EpochTable(out / "metrics.csv"), LearningRateMonitor("epoch")]
        if phase.patience:
            callbacks.append(EarlyStopping(MONITOR, mode="max", patience=phase.patience))
        resumed = resume and index == start
        version = f"{phase.name}-resumed" if resumed else phase.name  # keep the interrupted phase's logs
        trainer = L.Trainer(
            max_epochs=phase.epochs, accelerator=config.train.accelerator, devices=config.train.devices,
            num_nodes=config.train.num_nodes, strategy=config.train.strategy,
            precision=resolve_precision(config.train), callbacks=callbacks, default_root_dir=out,
            logger=[CSVLogger(out / "logs", name="csv", version=version),
                    TensorBoardLogger(out / "logs", name="tensorboard", version=version)],
            log_every_n_steps=min(10, len(train_loader)), num_sanity_val_steps=0)
        trainer.fit(module, train_loader, val_loader, ckpt_path=last if resumed else None)

    if not trainer.is_global_zero:  # with several GPUs, one process writes the report
        return {}
    return report_runs(out, parts, skipped, batch, workers)


def report_runs(out: Path, parts: dict[str, pd.DataFrame], skipped: list[str], batch: int,
                workers: int | None) -> dict:
    """Evaluate the best checkpoint on validation (the run's report) and on test when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reports = {}
    for name in ("val", "test"):
        if len(parts[name]):
            target = out if name == "val" else out / "test"
            reports[name] = evaluate_frame(out / "checkpoints" / "best.ckpt", parts[name], target,
                                           title=f"{name} part of {out.name}", skipped=skipped,
                                           batch_size=batch, workers=workers, device=device)
    return reports["val"]
