"""The training levers beyond the loss and the sampler change what they claim: MixUp/CutMix mixes images,
labels and clinical metadata (and the losses take the mixed labels), off by default; the EMA of the weights is
what checkpoints keep, and a resumed run continues it exactly (with attention pooling and layer-wise rate decay
on a one-cycle schedule); layer-wise decay gives each block its rate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import interrupt_at_epoch, make_ham_folder

from lesionkit import LesionkitError
from lesionkit.cli import main
from lesionkit.config import load_config
from lesionkit.model.losses import make_criterion
from lesionkit.train.loop import mixing


def test_both_losses_take_mixed_labels_as_the_mix_of_their_classes_losses():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=generator)
    soft = torch.softmax(torch.randn(16, 7, generator=generator), dim=1)
    weights = [0.5, 1.0, 1.5, 2.0, 1.0, 0.3, 4.0]
    reference = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(logits, soft)
    assert make_criterion("focal", weights, 0.0, focal_gamma=0.0)(logits, soft).item() == pytest.approx(
        reference.item(), rel=1e-5)
    # Smoothed: each class's weighted, smoothed loss, mixed in the target's shares, over the image count.
    per_class = torch.stack([torch.nn.functional.cross_entropy(logits, torch.full((16,), k), label_smoothing=0.1,
                                                               reduction="none") for k in range(7)], dim=1)
    mixed = (soft * torch.tensor(weights) * per_class).sum() / 16
    for loss in ("cross_entropy", "focal"):
        smoothed = make_criterion(loss, weights, 0.1, focal_gamma=0.0)(logits, soft)
        assert smoothed.item() == pytest.approx(mixed.item(), rel=1e-5)
    assert make_criterion("focal", weights, 0.1, focal_gamma=2.0)(logits, soft) < mixed


def test_mixup_mixes_pairs_of_images_and_their_labels():
    assert mixing(load_config(None, [])) is None, "off by default"
    assert mixing(load_config(None, ["augment.mixup=0.4", "augment.enabled=false"])) is None
    mix = mixing(load_config(None, ["augment.mixup=0.4", "augment.cutmix=1.0"]))
    np.random.seed(0)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mix(images.clone(), labels)
    assert targets.shape == (4, 7) and torch.allclose(targets.sum(dim=1), torch.ones(4))
    # Image i is mixed with image 3 - i (the batch reversed), its label likewise.
    assert (targets[0, 0] + targets[0, 3]).item() == pytest.approx(1.0) and 0 < targets[0, 0] < 1
    assert not torch.equal(mixed, images)
    # The clinical metadata is mixed in the share the labels get: the first sample's is 0 * t00 + 3 * t03.
    metadata = mix.mix_metadata(torch.arange(4.0).view(4, 1))
    assert torch.allclose(metadata[:, 0], (targets * torch.tensor([0.0, 1, 2, 3, 0, 0, 0])).sum(dim=1))
    with pytest.raises(LesionkitError, match="need an even data.batch_size"):
        mixing(load_config(None, ["augment.mixup=0.4", "data.batch_size=7"]))


def test_a_run_with_mixup_trains_on_mixed_labels(tmp_path, monkeypatch):
    from lesionkit.model.module import LesionClassifier

    data = make_ham_folder(tmp_path / "ham", lesions_per_class=3)
    seen, training = [], []
    step, loss = LesionClassifier.training_step, torch.nn.CrossEntropyLoss.forward

    def in_training(self, batch, batch_idx):
        training.append(True)
        try:
            return step(self, batch, batch_idx)
        finally:
            training.pop()

    def watched(self, logits, target):
        if training:  # not validation's loss, which sees the true labels
            seen.append(target.dtype)
        return loss(self, logits, target)

    monkeypatch.setattr(LesionClassifier, "training_step", in_training)
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", watched)
    assert main(["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--model", "test_efficientnet",
                 "--weights", "none", "--set", "data.image_size=[48,64]", "--set", "data.batch_size=8",
                 "--set", "data.num_workers=0", "--set", "train.accelerator=cpu", "--set", "augment.mixup=0.4",
                 "--set", "train.phases.0.epochs=1", "--set", "train.phases.1.epochs=1"]) == 0
    assert seen and set(seen) == {torch.float32}, "every training batch's labels are mixed probabilities"


def test_a_metadata_run_mixes_images_and_metadata_in_one_share(tmp_path, monkeypatch):
    from lesionkit.model.module import LesionClassifier

    data = make_ham_folder(tmp_path / "ham", lesions_per_class=3)
    table = pd.read_csv(data / "HAM10000_metadata.csv")
    table["age"] = 5.0 * (np.arange(len(table)) % 17)  # every image its own age, so that mixing shows
    table.to_csv(data / "HAM10000_metadata.csv", index=False)
    step, forward = LesionClassifier.training_step, LesionClassifier.forward
    raw, mixed, shares = [], [], []

    def in_training(self, batch, batch_idx):
        (images, metadata), _ = batch
        raw.append((images.clone(), metadata.clone()))  # timm's Mixup mixes the images in place
        return step(self, batch, batch_idx)

    def watched(self, inputs):
        if self.training and isinstance(inputs, (tuple, list)) and len(raw) > len(mixed):
            mixed.append((inputs[0].clone(), inputs[1].clone()))
            shares.append(self.mixing.share)
        return forward(self, inputs)

    monkeypatch.setattr(LesionClassifier, "training_step", in_training)
    monkeypatch.setattr(LesionClassifier, "forward", watched)
    assert main(["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--model", "test_efficientnet",
                 "--weights", "none", "--set", "data.image_size=[48,64]", "--set", "data.batch_size=8",
                 "--set", "data.num_workers=0", "--set", "train.accelerator=cpu", "--set", "augment.mixup=0.4",
                 "--set", "augment.mix_prob=1.0", "--set", "model.metadata=[age,sex,localization]",
                 "--set", "train.phases.0.epochs=1", "--set", "train.phases.1.epochs=1"]) == 0
    assert mixed and len(mixed) == len(raw)
    for (images, metadata), (images_in, metadata_in), share in zip(raw, mixed, shares, strict=True):
        assert 0 < share < 1
        torch.testing.assert_close(images_in, images * share + images.flip(0) * (1 - share))
        torch.testing.assert_close(metadata_in, metadata * share + metadata.flip(0) * (1 - share))
        assert not torch.equal(metadata_in, metadata), "the model saw mixed metadata, not each image's own"


EMA_RUN = """\
data: {image_size: [48, 64], batch_size: 8, num_workers: 0}
split: {val_fraction: 0.25}
model: {name: test_efficientnet, weights: none, pool: attention}
train:
  accelerator: cpu
  ema: 0.9
  phases:
    - {name: head, epochs: 1, lr: 1.0e-2, unfreeze: 0}
    - {name: finetune, epochs: 3, lr: 1.0e-2, unfreeze: -1, lr_decay: 0.8, schedule: onecycle}
"""


def test_ema_weights_are_the_checkpointed_model_and_a_resumed_run_keeps_both(tmp_path, monkeypatch):
    data = make_ham_folder(tmp_path / "ham", lesions_per_class=4)
    (tmp_path / "ema.yaml").write_text(EMA_RUN)

    def train(out):
        return main(["train", "--config", str(tmp_path / "ema.yaml"), "--data-dir", str(data), "--out", str(out)])

    assert train(tmp_path / "a") == 0
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    averaged = {k.removeprefix("model."): v for k, v in last["state_dict"].items() if k.startswith("model.")}
    raw = last["callbacks"]["WeightAverage"]["raw"]
    assert averaged.keys() == raw.keys()
    moved = [k for k, v in raw.items() if v.is_floating_point() and not torch.allclose(v, averaged[k])]
    assert len(moved) > len(raw) // 4, "the average differs from the raw weights it follows"
    assert last["callbacks"]["WeightAverage"]["steps"] > 0
    assert "global_pool.score.weight" in raw and last["hyper_parameters"]["pool"] == "attention"

    interrupt_at_epoch(monkeypatch, phase=1, epoch=2)
    assert train(tmp_path / "b") == 130
    monkeypatch.undo()
    assert main(["train", "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert (tmp_path / "b" / "metrics.csv").read_text() == (tmp_path / "a" / "metrics.csv").read_text()
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in last["state_dict"].items())


def test_layer_wise_lr_decay_gives_each_block_a_smaller_rate_than_the_one_above():
    import timm

    from lesionkit.config import PhaseConfig
    from lesionkit.model.module import LesionClassifier

    def groups(lr_decay):
        phases = [PhaseConfig("all", 1, 1e-3, unfreeze=-1, lr_decay=lr_decay)]
        module = LesionClassifier(timm.create_model("test_efficientnet", num_classes=7), phases, None,
                                  {"classes": ["x"] * 7})
        module.set_phase(0)
        return module, module.param_groups()

    module, decayed = groups(0.5)
    rates = {id(p): g["lr"] for g in decayed for p in g["params"]}
    assert len(rates) == sum(1 for p in module.parameters() if p.requires_grad), "every trained parameter, once"
    stem, head = module.model.conv_stem.weight, module.model.get_classifier().weight
    assert rates[id(head)] == pytest.approx(1e-3) and rates[id(stem)] < rates[id(module.model.blocks[-1][0]
                                                                                  .conv_pw.weight)] < 1e-3
    assert min(rates.values()) < 0.1e-3
    _, plain = groups(1.0)
    assert len(plain) == 1 and "lr" not in plain[0]
    with pytest.raises(LesionkitError, match="lr_decay must be in"):
        PhaseConfig("x", 1, 1e-3, lr_decay=1.5)


def test_an_ablation_arm_keeps_its_test_part_unseen(tmp_path):
    import pandas as pd

    data = make_ham_folder(tmp_path / "ham", lesions_per_class=4)
    out = tmp_path / "arm"
    assert main(["train", "--data-dir", str(data), "--out", str(out), "--model", "test_efficientnet",
                 "--weights", "none", "--set", "data.image_size=[48,64]", "--set", "data.num_workers=0",
                 "--set", "train.accelerator=cpu", "--set", "split.test_fraction=0.25",
                 "--set", "split.evaluate_test=false", "--set", "train.phases.0.epochs=1",
                 "--set", "train.phases.1.epochs=1"]) == 0
    assert (pd.read_csv(out / "split.csv")["split"] == "test").sum() > 0, "the test part exists"
    assert (out / "report.json").is_file() and not (out / "test").exists(), "and nothing measured it"
