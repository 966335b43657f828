"""The training loop: data check, lesion-grouped split, the phases in order, then a report on validation.

Each phase is one Lightning ``fit`` on the same model: the phase list in the config is the recipe, so
a third phase is a YAML entry, not code. The ``best`` checkpoint is the best validation balanced accuracy
over all phases; ``last`` is where ``--resume`` picks up.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.data import WeightedRandomSampler

from lesionkit import CLASSES, LesionkitError
from lesionkit.config import Config, PhaseConfig, TrainConfig, save_config
from lesionkit.data.cache import build_cache
from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.data.datasets import ImageDataset, make_loader
from lesionkit.data.metadata import find_metadata
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.data.transforms import eval_transform, train_transform
from lesionkit.evaluate.evaluation import EvalSettings, Images, evaluate_frame
from lesionkit.model.checkpoint import check_compatible, checkpoint_meta, load_checkpoint
from lesionkit.model.features import feature_loaders
from lesionkit.model.module import MONITOR, LesionClassifier, Mixing
from lesionkit.model.network import attach_metadata, create_model
from lesionkit.train.callbacks import EpochTable
from lesionkit.train.ema import WeightAverage
from lesionkit.train.prepare import check_data, class_weights, prepare_split, sample_weights, split_parts
from lesionkit.train.resume import AtomicCheckpointIO, EpochSeed
from lesionkit.train.runfolder import data_fingerprint, prepare_out_dir, run_lock, write_provenance


def train(config: Config, out: Path, resume: bool = False) -> dict:
    """Run every phase, then write the validation report of the best checkpoint. Returns that report.

    The run holds ``out/.lock`` throughout, so a second run into the same folder is refused.
    """
    if resume and not out.is_dir():
        raise LesionkitError(f"--resume: {out} does not exist; nothing to resume")
    # Under DDP every rank runs this function; only rank 0 owns the folder.
    with run_lock(out) if rank_zero_only.rank == 0 else contextlib.nullcontext(), quiet_lightning():
        return _train(config, out, resume)


def _train(config: Config, out: Path, resume: bool) -> dict:
    last = out / "checkpoints" / "last.ckpt"
    resume_from = load_checkpoint(last) if prepare_out_dir(out, resume, rank_zero_only.rank) else None
    if resume_from is not None:
        check_compatible(resume_from, last, config.model.name, list(CLASSES))
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    # Hardware this machine cannot run, bad data, then pretrained weights that cannot be fetched (the local checks
    # before the network), then an image cache without room: each stops the run before it writes its config, so
    # the folder stays free for the next attempt. A resumed run takes every weight from its checkpoint.
    check_hardware(config.train)
    dataset = check_data(config)
    model = create_model(replace(config.model, weights="none") if resume_from is not None else config.model,
                         len(CLASSES))
    split, skipped = prepare_split(config, dataset, out, resume)
    parts = split_parts(split)
    encoding = None
    if config.model.metadata:
        encoding = ClinicalEncoding.fit(config.model.metadata, parts["train"], split)
        attach_metadata(model, encoding, config.model.metadata_dropout)
    module, pre = build_module(config, model, parts["train"], encoding)
    cache = build_cache(split, pre, config.data.cache_dir) if config.data.cache else None
    record_run(config, out, split, resume)
    workers, batch = config.data.num_workers, config.data.batch_size
    train_set = ImageDataset.from_frame(parts["train"], train_transform(pre, config.augment), cache, encoding)
    train_loader = make_loader(train_set, batch, train=True, workers=workers,
                               sampler=train_sampler(config, parts["train"]))
    val_loader = make_loader(ImageDataset.from_frame(parts["val"], eval_transform(pre), cache, encoding), batch,
                             train=False, workers=workers)

    start = resume_from.get("lesionkit", {}).get("phase_index", 0) if resume_from else 0
    # metrics.csv is rewritten from the rows the checkpoint carries: epochs after it are dropped, to be re-run.
    table = EpochTable(out / "metrics.csv",
                       resume_from.get("callbacks", {}).get("EpochTable", {}).get("rows") if resume_from else [])
    best = None
    average = [WeightAverage(config.train.ema)] if config.train.ema else []  # one average over every phase
    for index, phase in enumerate(config.train.phases[start:], start):
        trains = "everything" if phase.unfreeze == -1 else f"the top {phase.unfreeze} layer group(s) and the head"
        print(f"Phase {index + 1}/{len(config.train.phases)} '{phase.name}': {phase.epochs} epoch(s) at lr "
              f"{phase.lr:g}, training {trains}")
        module.set_phase(index)
        loaders = feature_loaders(module.model, train_loader, val_loader) if phase.cache_features else (
            train_loader, val_loader)
        best = best_checkpoint(out, best)
        trainer = phase_trainer(config, out, phase, [*average, best, table], log_every=min(10, len(train_loader)))
        resumed_here = resume_from is not None and index == start
        fit(trainer, module, loaders, last if resumed_here else None)

    if not trainer.is_global_zero:  # with several GPUs, one process writes the report
        return {}
    if not config.split.evaluate_test:
        parts = {**parts, "test": parts["test"].iloc[:0]}
    return report_parts(out, parts, skipped, EvalSettings(batch_size=batch, workers=workers,
                                                          device="cuda" if torch.cuda.is_available() else "cpu"),
                        cache)


def check_hardware(cfg: TrainConfig) -> None:
    """Let Lightning refuse what this machine cannot run (a GPU where there is none, more devices than it has,
    an unknown strategy) before the run writes anything, so that its folder stays free for the next attempt."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    notices = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # each phase's trainer says the same
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        L.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                  precision=resolve_precision(cfg), logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError, ImportError) as err:
        raise LesionkitError(f"train.accelerator={cfg.accelerator}, train.devices={cfg.devices}, train.strategy="
                             f"{cfg.strategy}, train.precision={cfg.precision}: {str(err).splitlines()[0]} (change "
                             f"the setting it names; --accelerator auto takes a GPU where there is one, else the "
                             f"CPU)") from None
    finally:
        notices.setLevel(level)


def mixing(config: Config) -> Mixing | None:
    """timm's MixUp/CutMix for ``augment.mixup``/``augment.cutmix`` (None when both are 0 or augmentation is
    off); its draws come from NumPy's generator, which :class:`lesionkit.train.resume.EpochSeed` reseeds."""
    augment = config.augment
    if not augment.enabled or not (augment.mixup or augment.cutmix):
        return None
    if config.data.batch_size % 2:
        raise LesionkitError(f"augment.mixup/cutmix mix each batch with itself reversed and need an even "
                             f"data.batch_size, got {config.data.batch_size}")
    return Mixing(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
                  label_smoothing=0.0, num_classes=len(CLASSES))


def train_sampler(config: Config, train_part: pd.DataFrame) -> WeightedRandomSampler | None:
    """``data.sampler``'s draws with replacement, as many per epoch as there are training images (None:
    shuffle). Seeded here, and again at every epoch by :class:`lesionkit.train.resume.EpochSeed`."""
    weights = sample_weights(np.array([CLASSES.index(d) for d in train_part["dx"]]), config.data.sampler)
    if weights is None:
        return None
    return WeightedRandomSampler(weights.tolist(), len(weights), replacement=True,
                                 generator=torch.Generator().manual_seed(config.train.seed))


def record_run(config: Config, out: Path, split: pd.DataFrame, resume: bool) -> None:
    """``config.yaml`` (a new run's only: a resumed one keeps its own) and ``provenance.json``."""
    if not resume:
        save_config(config, out / "config.yaml")
    if rank_zero_only.rank == 0:
        metadata = Path(config.data.metadata) if config.data.metadata else find_metadata(Path(config.data.data_dir))
        write_provenance(out, seed=config.train.seed, split_seed=config.split.seed,
                         data=data_fingerprint(metadata, split), resume=resume)


def build_module(config: Config, model: torch.nn.Module, train_part: pd.DataFrame,
                 encoding: ClinicalEncoding | None = None) -> tuple[LesionClassifier, Preprocessing]:
    """The Lightning module around ``model``, with class weights from ``train_part``, and the network's
    preprocessing. The checkpoint's metadata carries the ``encoding`` of a model that reads clinical metadata."""
    pre = Preprocessing.from_model_config(timm.data.resolve_model_data_config(model), config.data.image_size)
    weights = class_weights(np.array([CLASSES.index(d) for d in train_part["dx"]]), config.train.class_weights)
    meta = checkpoint_meta(config.model.name, pre, config=config.to_dict(), pool=config.model.pool,
                           metadata=encoding.to_dict() if encoding else None)
    module = LesionClassifier(model, config.train.phases, weights, meta, config.train.label_smoothing,
                              config.train.loss, config.train.focal_gamma, mixing(config))
    if config.train.compile:
        module.model.compile()  # in place: the state_dict keeps its names, so checkpoints load as ever
    else:  # Lightning's summary table then shows each layer's output size and FLOPs per image, not zeros
        module.example_input_array = torch.zeros(1, 3, pre.height, pre.width)
    return module, pre


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


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


@contextlib.contextmanager
def quiet_lightning():
    """While a run trains, keep Lightning's output to what concerns it: not its advertisement for a cloud logger
    (printed at every phase), nor its own deprecation notice about torch's pytree API, which no user setting
    changes, nor, under bf16-mixed (a GPU's default), its doubt about the summary's model size: mixed precision
    keeps the parameters in 32 bits, which is the size it then prints. Two notices are expected here: frozen
    BatchNorms sit in eval mode on purpose, and the phases share one checkpoint folder."""
    notices, advert = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _DropAdvert()
    notices.addFilter(advert)
    try:
        with warnings.catch_warnings():
            for message in (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            r"Precision .*-mixed is not supported by the model summary",
                            r"Found \d+ module\(s\) in eval mode", r"Checkpoint directory .* exists and is not empty"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        notices.removeFilter(advert)


def phase_trainer(config: Config, out: Path, phase: PhaseConfig, callbacks: list[Callback], log_every: int
                  ) -> L.Trainer:
    """The Lightning trainer of one phase, logging under ``out/logs/*/<phase>`` (``<phase>-resumed``, ... after
    an interruption, so that every attempt's logs stay).

    ``callbacks`` come first (the weight average, 'best' and the epoch table); 'last' follows them, so that it is
    written at every epoch's end after the table's row and after 'best' has scored the epoch, and carries both.
    (ModelCheckpoint's own save_last writes only when a top-k file was written: a run stopped after epochs without
    progress would redo them all.)
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


def report_parts(out: Path, parts: dict[str, pd.DataFrame], skipped: list[str], settings: EvalSettings,
                 cache=None) -> dict:
    """Evaluate the best checkpoint on validation (the run's report) and on test when there is one."""
    reports = {}
    for name in ("val", "test"):
        if len(parts[name]):
            images = Images(parts[name], title=f"{name} part of {out.name}", skipped=skipped, cache=cache)
            # T is fitted on validation (val comes first) and reused for test.
            reports[name] = evaluate_frame(out / "checkpoints" / "best.ckpt", images, out if name == "val" else
                                           out / "test", settings, fit_temperature_here=name == "val")
    return reports["val"]
