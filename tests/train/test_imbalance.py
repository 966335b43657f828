"""The imbalance settings change what they claim: the focal loss's value (against a hand-computed case and
cross-entropy at gamma 0), label smoothing beside class weights, the class weights, the sampler's class mix; and
a run that oversamples with the focal loss is repeatable under its seed and resumes mid-phase to the same
result."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import interrupt_at_epoch, make_ham_folder

from lesionkit import CLASSES, LesionkitError
from lesionkit.cli import main
from lesionkit.config import Config, load_config
from lesionkit.model.losses import FocalLoss, make_criterion
from lesionkit.train.prepare import class_weights, sample_weights

COUNTS = [60, 20, 5, 5, 5, 3, 2]
LABELS = np.repeat(np.arange(7), COUNTS)


def test_focal_loss_against_a_hand_computed_case():
    logits, target = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    p = [math.exp(2) / (math.exp(2) + 2), 1 / (2 + math.e)]  # each image's probability of its true class
    expected = sum((1 - q) ** 2 * -math.log(q) for q in p) / 2
    assert FocalLoss(2.0)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Class weights: each image's term times its class's weight, over the sum of those weights.
    weight = torch.tensor([1.0, 1.0, 3.0])
    weighted = ((1 - p[0]) ** 2 * -math.log(p[0]) + 3 * (1 - p[1]) ** 2 * -math.log(p[1])) / 4
    assert FocalLoss(2.0, weight)(logits, target).item() == pytest.approx(weighted, rel=1e-6)
    # An image already learnt counts far less than under cross-entropy; a hard one about the same.
    easy, hard = torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[-3.0, 0.0, 0.0]])
    cross_entropy = torch.nn.CrossEntropyLoss()
    zero = torch.tensor([0])
    assert FocalLoss(2.0)(easy, zero) < 1e-3 * cross_entropy(easy, zero)
    assert FocalLoss(2.0)(hard, zero) > 0.9 * cross_entropy(hard, zero)


def test_focal_loss_at_gamma_0_is_torchs_cross_entropy_with_weights_or_label_smoothing():
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(32, 7, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    weights = class_weights(LABELS, "balanced")
    for weight, smoothing in ((weights, 0.0), (None, 0.1)):
        focal = make_criterion("focal", weight, smoothing, focal_gamma=0.0)(logits, target)
        reference = make_criterion("cross_entropy", weight, smoothing, focal_gamma=2.0)(logits, target)
        assert isinstance(make_criterion("cross_entropy", weight, smoothing, 2.0), torch.nn.CrossEntropyLoss)
        assert focal.item() == pytest.approx(reference.item(), rel=1e-5)


def test_label_smoothing_with_class_weights_weighs_each_image_by_its_own_class():
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(32, 7, generator=generator), torch.randint(0, 7, (32,), generator=generator)
    weights = class_weights(LABELS, "balanced")
    per_image = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    image_weight = torch.tensor(weights)[target]
    expected = (image_weight * per_image).sum() / image_weight.sum()
    for loss in ("cross_entropy", "focal"):
        gamma = 0.0 if loss == "focal" else 2.0
        assert make_criterion(loss, weights, 0.1, gamma)(logits, target).item() == pytest.approx(
            expected.item(), rel=1e-5)
    # One image of the commonest class is pulled towards its own smoothed target, whatever the other classes'
    # weights: the gradient vanishes there (torch's weighted loss would pull it towards the rare classes).
    smoothed = torch.full((1, 7), 0.1 / 7)
    smoothed[0, 0] += 0.9
    at_target = smoothed.log().requires_grad_()
    make_criterion("cross_entropy", weights, 0.1, 2.0)(at_target, torch.tensor([0])).backward()
    assert at_target.grad.abs().max() < 1e-6
    torch_style = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), label_smoothing=0.1)
    at_target.grad = None
    torch_style(at_target, torch.tensor([0])).backward()
    assert at_target.grad.abs().max() > 0.1


def test_class_weights_balanced_sqrt_and_none():
    balanced, sqrt = class_weights(LABELS, "balanced"), class_weights(LABELS, "sqrt")
    assert balanced[0] == pytest.approx(100 / (7 * 60)) and balanced[6] == pytest.approx(100 / (7 * 2))
    assert sqrt[6] / sqrt[0] == pytest.approx(math.sqrt(60 / 2))  # rarer classes count more, less steeply
    counts = np.array(COUNTS)
    assert (counts * np.array(sqrt)).sum() == pytest.approx(len(LABELS))  # every image's weight sums to n
    assert class_weights(LABELS, "none") is None
    with pytest.raises(LesionkitError, match="no images of vasc; sqrt class weights"):
        class_weights(LABELS[LABELS != 6], "sqrt")


def draws(mode: str, seed: int, n: int = 20_000) -> Counter:
    weights = sample_weights(LABELS, mode)
    sampler = torch.utils.data.WeightedRandomSampler(weights.tolist(), n, generator=torch.Generator().manual_seed(seed))
    return Counter(LABELS[list(sampler)].tolist())


def test_the_sampler_draws_the_class_mix_it_names():
    assert sample_weights(LABELS, "shuffle") is None
    balanced = draws("balanced", seed=0)
    assert all(abs(balanced[c] / 20_000 - 1 / 7) < 0.01 for c in range(7))
    sqrt = draws("sqrt", seed=0)
    share = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
    assert all(abs(sqrt[c] / 20_000 - share[c]) < 0.01 for c in range(7))
    assert draws("balanced", seed=1) == draws("balanced", seed=1) != draws("balanced", seed=2)


def test_training_draws_one_pass_of_the_training_part_through_the_sampler():
    import pandas as pd

    from lesionkit.config import DataConfig
    from lesionkit.train.loop import train_sampler

    part = pd.DataFrame({"dx": [CLASSES[c] for c in LABELS]})
    assert train_sampler(Config(), part) is None
    sampler = train_sampler(Config(data=DataConfig(sampler="balanced")), part)
    assert sampler.num_samples == len(part) and sampler.replacement
    drawn = Counter(LABELS[list(sampler)].tolist())
    assert drawn[6] > 5 * COUNTS[6] and drawn[0] < COUNTS[0] / 2  # vasc drawn often, nv seldom


def test_the_settings_are_checked_by_name(tmp_path):
    for key, value, message in (("data.sampler", "oversample", "data.sampler must be one of shuffle, balanced, sqrt"),
                                ("train.loss", "dice", "train.loss must be one of cross_entropy, focal"),
                                ("train.class_weights", "inverse", "train.class_weights must be one of"),
                                ("train.focal_gamma", "-1", "train.focal_gamma must be 0 or more")):
        with pytest.raises(LesionkitError, match=message):
            load_config(None, [f"{key}={value}"])
    assert Config().data.sampler == "shuffle" and Config().train.loss == "cross_entropy"


TINY = """\
data: {image_size: [48, 64], batch_size: 8, num_workers: 0, sampler: balanced}
split: {val_fraction: 0.25}
model: {name: test_efficientnet, weights: none}
train:
  accelerator: cpu
  loss: focal
  class_weights: sqrt
  phases:
    - {name: head, epochs: 1, lr: 1.0e-3, unfreeze: 0}
    - {name: finetune, epochs: 3, lr: 1.0e-3, unfreeze: 1}
"""


def test_an_oversampled_focal_run_repeats_under_its_seed_and_resumes_mid_phase_exactly(tmp_path, monkeypatch):
    data = make_ham_folder(tmp_path / "ham", lesions_per_class=4)
    (tmp_path / "tiny.yaml").write_text(TINY)

    def train(out):
        return main(["train", "--config", str(tmp_path / "tiny.yaml"), "--data-dir", str(data), "--out", str(out)])

    assert train(tmp_path / "a") == 0
    assert train(tmp_path / "b") == 0
    metrics = (tmp_path / "a" / "metrics.csv").read_text()
    assert metrics == (tmp_path / "b" / "metrics.csv").read_text()

    seen = interrupt_at_epoch(monkeypatch, phase=1, epoch=2)
    assert train(tmp_path / "c") == 130
    assert seen[-1] == (1, 2), "stopped in the middle of the second phase, after a checkpoint of it"
    monkeypatch.undo()
    assert main(["train", "--out", str(tmp_path / "c"), "--resume"]) == 0
    assert (tmp_path / "c" / "metrics.csv").read_text() == metrics
