"""The model shipped under models/: it answers right after install with no --checkpoint, through both backends,
explains and is described by its card; and the pieces it is made of (a slim checkpoint, the default
checkpoint's messages)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FULLRES, REPO, fake_checkpoint, not_dermoscopy

from lesionkit.cli import main
from lesionkit.model.checkpoint import slim_checkpoint
from lesionkit.serve.torch_classifier import TorchClassifier
from lesionkit.model.shipped import CHECKPOINT

shipped = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"no shipped model at {CHECKPOINT}")


def original() -> str:
    images = sorted(FULLRES.rglob("*.jpg"))
    if not images:
        pytest.skip(f"no 600x450 originals under {FULLRES}")
    return str(images[0])


@shipped
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_answers_an_original_with_the_shipped_model_from_anywhere(backend, tmp_path):
    """As a user runs it after `make install`: another folder, no --checkpoint."""
    done = subprocess.run([sys.executable, "-m", "lesionkit", "predict", original(), "--format", "json",
                           "--coverage", "0.9", "--backend", backend], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    served = CHECKPOINT if backend == "torch" else CHECKPOINT.with_suffix(".onnx")
    assert f"model: {served} (no --checkpoint given)" in done.stderr, "the file that answered is named"
    (answer,) = json.loads(done.stdout)
    assert answer["prediction"] in answer["prediction_set"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert isinstance(answer["out_of_distribution"], bool) and isinstance(answer["refer"], bool)


@shipped
def test_the_two_shipped_files_agree_and_carry_the_same_record():
    from lesionkit.data.images import load_image
    from lesionkit.serve.onnx_classifier import OnnxClassifier

    torch_model, onnx_model = TorchClassifier.load(CHECKPOINT), OnnxClassifier(CHECKPOINT.with_suffix(".onnx"))
    assert onnx_model.meta["quantized"] == "fp16"
    assert onnx_model.calibration.temperature == pytest.approx(torch_model.calibration.temperature)
    assert onnx_model.calibration.ood.thresholds == torch_model.calibration.ood.thresholds
    batch = np.stack([torch_model.transform(load_image(p)) for p in sorted(FULLRES.rglob("*.jpg"))[:16]])
    if not len(batch):
        pytest.skip(f"no 600x450 originals under {FULLRES}")
    assert (onnx_model.logits(batch).argmax(1) == torch_model.logits(batch).argmax(1)).mean() >= 0.9


@shipped
def test_explain_and_card_work_on_the_shipped_model(tmp_path, capsys):
    assert main(["explain", original(), "--out", str(tmp_path / "maps")]) == 0
    (line,) = (tmp_path / "maps" / "explanations.jsonl").read_text().splitlines()
    assert (tmp_path / "maps" / json.loads(line)["overlay"]).is_file()
    assert f"model: {CHECKPOINT}" in capsys.readouterr().err
    # The committed card is what `lesionkit card models` writes from the committed folder.
    name = "lesionkit-lite1, the model shipped with lesionkit"  # as scripts/ship_model.py names it
    assert main(["card", str(CHECKPOINT.parent), "--out", str(tmp_path / "card.md"), "--name", name]) == 0
    assert (tmp_path / "card.md").read_text() == (CHECKPOINT.parent / "MODEL_CARD.md").read_text()


def test_a_missing_default_model_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESIONKIT_MODEL", str(tmp_path / "nowhere.ckpt"))
    assert main(["predict", str(REPO / "README.md")]) == 1
    err = capsys.readouterr().err
    assert f"$LESIONKIT_MODEL, {tmp_path / 'nowhere.ckpt'}, is not there" in err and "--checkpoint" in err


def test_a_slim_checkpoint_serves_like_its_source_at_a_fraction_of_the_size(tmp_path):
    source = fake_checkpoint(tmp_path / "full.ckpt")
    full = torch.load(source, weights_only=True)
    full["optimizer_states"] = [{"state": {k: v.clone() for k, v in full["state_dict"].items()}}]  # as training
    torch.save(full, source)
    slim = slim_checkpoint(source, tmp_path / "slim.ckpt")
    assert slim.stat().st_size < 0.4 * source.stat().st_size
    state = torch.load(slim, weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.dim() > 1} == {torch.float16}
    assert all(t.dtype != torch.float16 for t in state.values() if t.dim() <= 1)  # statistics kept as they were
    batch = np.random.default_rng(0).normal(size=(2, 3, 48, 64)).astype(np.float32)
    reference, served = TorchClassifier.load(source).logits(batch), TorchClassifier.load(slim).logits(batch)
    assert np.abs(served - reference).max() <= 0.01 * np.abs(reference).max() + 1e-3


@shipped
def test_the_shipped_model_flags_photos_noise_and_blank_images_and_passes_lesions(tmp_path):
    """Its record, fitted on its validation part: every scikit-image photo, noise and blank image is flagged but
    gravel, a grey stone texture at 0.96 of the threshold (docs/ood.md), and few of the 600x450 originals, which
    are dermoscopy."""
    from lesionkit.serve.predict import predict_paths

    classifier = TorchClassifier.load(CHECKPOINT)
    answers, errors = predict_paths(classifier, not_dermoscopy(tmp_path / "other"))
    assert not errors and len(answers) == 23
    assert {Path(a["image"]).stem for a in answers if not a["out_of_distribution"]} <= {"gravel"}
    originals = sorted(FULLRES.rglob("*.jpg"))
    if originals:
        lesions, _ = predict_paths(classifier, originals)
        assert sum(a["out_of_distribution"] for a in lesions) < 0.1 * len(lesions)
