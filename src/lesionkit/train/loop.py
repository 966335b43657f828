"""``lesionkit train``: data check, lesion-grouped split, the phases in order, then a report on validation.

Each phase is one Lightning ``fit`` on the same model: the phase list in the config is the recipe, so
a third phase is a YAML entry, not code. The ``best`` checkpoint is the best validation balanced accuracy
over all phases; ``last`` is where ``--resume`` picks up.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import signal
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
from lightning.pytorch.utilities import rank_zero_only
from sklearn.utils.class_weight import compute_class_weight

from lesionkit import CLASSES, LesionkitError
from lesionkit.cache import build_cache
from lesionkit.checkpoints import check_compatible, load_checkpoint
from lesionkit.config import Config, PhaseConfig, TrainConfig, save_config
from lesionkit.data import Dataset, find_metadata, limit_per_class, load_dataset, refuse_problems, summary
from lesionkit.evaluate import evaluate_frame
from lesionkit.features import feature_loaders
from lesionkit.loader import ImageDataset, make_loader
from lesionkit.model import create_model
from lesionkit.module import MONITOR, LesionClassifier
from lesionkit.preprocessing import Preprocessing
from lesionkit.resume import AtomicCheckpointIO, EpochSeed
from lesionkit.runfolder import atomic_write, atomic_write_csv, data_fingerprint, run_lock, write_provenance
from lesionkit.split import make_split, read_split, save_split
from lesionkit.transforms import eval_transform, train_transform


class EpochTable(Callback):
    """One row per epoch in ``metrics.csv``: phase, losses, validation accuracy and balanced accuracy.

    The rows also travel in every checkpoint (this callback's state, saved after the row is added), and the
    file is rewritten whole from them: a resumed run's table holds each epoch once, however the run stopped.
    """

    FIELDS = ["phase", "epoch", "step", "lr", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"]

    def __init__(self, path: Path, rows: list[list] | None = None):
        self.path, self.rows = path, list(rows or [])
        self.write()

    def write(self) -> None:
        if rank_zero_only.rank > 0:  # DDP: the folder is rank 0's
            return

        def dump(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                csv.writer(f).writerows([self.FIELDS, *self.rows])
        atomic_write(self.path, dump)

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.write()

    def on_train_epoch_end(self, trainer: L.Trainer, module: LesionClassifier) -> None:
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = [module.phase.name, trainer.current_epoch, trainer.global_step,
               trainer.optimizers[0].param_groups[0]["lr"], m.get("train/loss_epoch"), m.get("val/loss"),
               m.get("val/accuracy"), m.get(MONITOR)]
        self.rows.append(row)
        self.write()


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


def prepare_out_dir(out: Path, resume: bool) -> bool:
    """Check that ``out`` may be written; return True when there is a checkpoint to resume from.

    A run stopped before its first epoch ended has a config but no checkpoint: ``--resume`` starts it over.
    """
    if rank_zero_only.rank > 0:  # DDP: Lightning starts ranks 1.. by re-running the command, into rank 0's folder
        return resume and (out / "checkpoints" / "last.ckpt").is_file()
    if resume:
        if (out / "checkpoints" / "last.ckpt").is_file():
            return True
        if not (out / "config.yaml").is_file():
            raise LesionkitError(f"--resume: {out}/checkpoints/last.ckpt does not exist; nothing to resume")
        print(f"{out} has no checkpoint yet (stopped during its first epoch): starting the run over")
        return False
    if any((out / name).exists() for name in ("config.yaml", "metrics.csv", "checkpoints")):
        raise LesionkitError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return False


def check_data(config: Config) -> Dataset:
    """The data folder read and every image decoded; missing or unreadable ones refused unless allowed."""
    dataset = load_dataset(config.data.data_dir, config.data.metadata)
    refuse_problems(dataset, config.data.allow_missing)
    return dataset


def prepare_data(config: Config, dataset: Dataset, out: Path, resume: bool) -> tuple[pd.DataFrame, list[str]]:
    """Make or reuse the split of the checked ``dataset``; return the split frame (with paths) and the skipped
    ids."""
    skipped = sorted(dataset.problems)
    if skipped:
        atomic_write_csv(pd.DataFrame({"image_id": skipped, "problem": [dataset.problems[i] for i in skipped]}),
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
    # Paths, and the metadata the report's subgroups read (sex, age band, body site) where the CSV has it.
    extra = [c for c in ("age", "sex", "localization") if c in frame.columns]
    split = split.merge(frame[["image_id", "path", *extra]], on="image_id")
    table = summary(split).join(split.pivot_table(index="dx", columns="split", values="image_id", aggfunc="size"))
    print(f"Data: {len(split)} images of {split['lesion_id'].nunique()} lesions\n{table.fillna(0).to_string()}")
    return split, skipped


def train(config: Config, out: Path, resume: bool = False) -> dict:
    """Run every phase, then write the validation report of the best checkpoint. Returns that report.

    The run holds ``out/.lock`` throughout, so a second run into the same folder is refused.
    """
    if resume and not out.is_dir():
        raise LesionkitError(f"--resume: {out} does not exist; nothing to resume")
    # Under DDP every rank runs this function; only rank 0 owns the folder.
    with run_lock(out) if rank_zero_only.rank == 0 else contextlib.nullcontext():
        return _train(config, out, resume)


def _train(config: Config, out: Path, resume: bool) -> dict:
    # Both are expected here: frozen BatchNorms sit in eval mode on purpose, and phases share one folder.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    quiet_lightning_notices()
    last = out / "checkpoints" / "last.ckpt"
    resume_from = load_checkpoint(last) if prepare_out_dir(out, resume) else None
    if resume_from is not None:
        check_compatible(resume_from, last, config.model.name, list(CLASSES))
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    # Bad data, then pretrained weights that cannot be fetched (the local checks before the network), then an
    # image cache without room: each stops the run before it writes its config, so the folder stays free for the
    # next attempt. A resumed run takes every weight from its checkpoint.
    dataset = check_data(config)
    model = create_model(replace(config.model, weights="none") if resume_from is not None else config.model,
                         len(CLASSES))
    split, skipped = prepare_data(config, dataset, out, resume)
    parts = {name: split[split["split"] == name].reset_index(drop=True) for name in ("train", "val", "test")}
    module, pre = build_module(config, model, parts["train"])
    cache = build_cache(split, pre, config.data.cache_dir) if config.data.cache else None
    record_run(config, out, split, resume)
    workers, batch = config.data.num_workers, config.data.batch_size
    train_loader = make_loader(ImageDataset.from_frame(parts["train"], train_transform(pre, config.augment), cache),
                               batch, train=True, workers=workers)
    val_loader = make_loader(ImageDataset.from_frame(parts["val"], eval_transform(pre), cache), batch, train=False,
                             workers=workers)

    start = resume_from.get("lesionkit", {}).get("phase_index", 0) if resume_from else 0
    # metrics.csv is rewritten from the rows the checkpoint carries: epochs after it are dropped, to be re-run.
    table = EpochTable(out / "metrics.csv",
                       resume_from.get("callbacks", {}).get("EpochTable", {}).get("rows") if resume_from else [])
    best = None
    for index, phase in enumerate(config.train.phases[start:], start):
        trains = "everything" if phase.unfreeze == -1 else f"the top {phase.unfreeze} layer group(s) and the head"
        print(f"Phase {index + 1}/{len(config.train.phases)} '{phase.name}': {phase.epochs} epoch(s) at lr "
              f"{phase.lr:g}, training {trains}")
        module.set_phase(index)
        loaders = feature_loaders(module.model, train_loader, val_loader) if phase.cache_features else (
            train_loader, val_loader)
        best = best_checkpoint(out, best)
        trainer = phase_trainer(config, out, phase, [best, table], log_every=min(10, len(train_loader)))
        resumed_here = resume_from is not None and index == start
        fit(trainer, module, loaders, last if resumed_here else None)

    if not trainer.is_global_zero:  # with several GPUs, one process writes the report
        return {}
    return report_runs(out, parts, skipped, batch, workers, cache)


def record_run(config: Config, out: Path, split: pd.DataFrame, resume: bool) -> None:
    """``config.yaml`` (a new run's only: a resumed one keeps its own) and ``provenance.json``."""
    if not resume:
        save_config(config, out / "config.yaml")
    if rank_zero_only.rank == 0:
        metadata = Path(config.data.metadata) if config.data.metadata else find_metadata(Path(config.data.data_dir))
        write_provenance(out, seed=config.train.seed, split_seed=config.split.seed,
                         data=data_fingerprint(metadata, split), resume=resume)


def build_module(config: Config, model: torch.nn.Module, train_part: pd.DataFrame
                 ) -> tuple[LesionClassifier, Preprocessing]:
    """The Lightning module around ``model``, with class weights from ``train_part``, and the network's
    preprocessing."""
    pre = Preprocessing.from_model_config(timm.data.resolve_model_data_config(model), config.data.image_size)
    weights = class_weights(np.array([CLASSES.index(d) for d in train_part["dx"]]), config.train.class_weights)
    meta = {"model_name": config.model.name, "classes": list(CLASSES), "preprocessing": pre.to_dict(),
            "config": config.to_dict()}
    module = LesionClassifier(model, config.train.phases, weights, meta, config.train.label_smoothing)
    if config.train.compile:
        module.model.compile()  # in place: the state_dict keeps its names, so checkpoints load as ever
    else:  # Lightning's summary table then shows each layer's output size and FLOPs per image, not zeros
        module.example_input_array = torch.zeros(1, 3, pre.height, pre.width)
    return module, pre


def best_checkpoint(out: Path, previous: ModelCheckpoint | None) -> ModelCheckpoint:
    """A fresh 'best' callback for the next phase, carrying the best score so far so that 'best' spans phases."""
    best = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=MONITOR, mode="max",
                           enable_version_counter=False, save_on_train_epoch_end=True)
    if previous is not None:
        best.load_state_dict(previous.state_dict())
    return best


class _DropAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning_notices() -> None:
    """Keep Lightning's output to what concerns the run: not its advertisement for a cloud logger (printed at
    every phase), nor its own deprecation notice about torch's pytree API, which no user setting changes, nor,
    under bf16-mixed (a GPU's default), its doubt about the summary's model size: mixed precision keeps the
    parameters in 32 bits, which is the size it then prints."""
    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvert) for f in notices.filters):
        notices.addFilter(_DropAdvert())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model summary")


def phase_trainer(config: Config, out: Path, phase: PhaseConfig, callbacks: list[Callback], log_every: int
                  ) -> L.Trainer:
    """The Lightning trainer of one phase, logging under ``out/logs/*/<phase>`` (``<phase>-resumed``, ... after
    an interruption, so that every attempt's logs stay).

    ``callbacks`` come first ('best' and the epoch table); 'last' follows them, so that it is written at every
    epoch's end after the table's row and after 'best' has scored the epoch, and carries both. (ModelCheckpoint's
    own save_last writes only when a top-k file was written: a run stopped after epochs without progress would
    redo them all.)
    """
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", enable_version_counter=False,
                           save_on_train_epoch_end=True)
    callbacks = [*callbacks, last, EpochSeed(config.train.seed), LearningRateMonitor("epoch")]
    if phase.patience:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=phase.patience))
    version, attempt = phase.name, 1
    while (out / "logs" / "csv" / version).exists():
        version, attempt = f"{phase.name}-resumed{attempt if attempt > 1 else ''}", attempt + 1
    return L.Trainer(
        max_epochs=phase.epochs, accelerator=config.train.accelerator, devices=config.train.devices,
        num_nodes=config.train.num_nodes, strategy=config.train.strategy,
        precision=resolve_precision(config.train), callbacks=callbacks, default_root_dir=out,
        plugins=[AtomicCheckpointIO()],
        logger=[CSVLogger(out / "logs", name="csv", version=version),
                TensorBoardLogger(out / "logs", name="tensorboard", version=version)],
        log_every_n_steps=log_every, num_sanity_val_steps=0)


def fit(trainer: L.Trainer, module: LesionClassifier, loaders: tuple, checkpoint: Path | None) -> None:
    """``trainer.fit``, from ``checkpoint`` when given; Ctrl-C comes back as KeyboardInterrupt."""
    try:
        trainer.fit(module, *loaders, ckpt_path=checkpoint, weights_only=True)
    except SystemExit:
        # Lightning answers Ctrl-C by stopping cleanly and calling sys.exit(1), after setting SIGINT to be
        # ignored; give the interrupt back to the caller, which says how to resume.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


def report_runs(out: Path, parts: dict[str, pd.DataFrame], skipped: list[str], batch: int,
                workers: int | None, cache=None) -> dict:
    """Evaluate the best checkpoint on validation (the run's report) and on test when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reports = {}
    for name in ("val", "test"):
        if len(parts[name]):
            target = out if name == "val" else out / "test"
            reports[name] = evaluate_frame(out / "checkpoints" / "best.ckpt", parts[name], target,
                                           title=f"{name} part of {out.name}", skipped=skipped,
                                           batch_size=batch, workers=workers, device=device, cache=cache,
                                           # T is fitted on validation (val comes first) and reused for test.
                                           fit_temperature_here=name == "val")
    return reports["val"]
