"""The ensemble classifier and its manifest, on fake checkpoints (no training): the averaged calibrated
probabilities, the first member's features, and the manifests that must be refused."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fake_checkpoint
from lesionkit import CLASSES, LesionkitError
from lesionkit.evaluate.record import Calibration, save_calibration
from lesionkit.serve.classifier import probabilities, softmax
from lesionkit.serve.ensemble import EnsembleClassifier, load_torch_classifier, write_manifest
from lesionkit.serve.torch_classifier import TorchClassifier

TEMPERATURES = (0.6, 2.5)  # far apart: an average at one shared temperature would not match


def members(root: Path, temperatures=TEMPERATURES, classes=CLASSES) -> list[Path]:
    checkpoints = []
    for n, temperature in enumerate(temperatures, 1):
        torch.manual_seed(n)  # each member its own weights
        folder = root / f"fold-{n}" / "checkpoints"
        folder.mkdir(parents=True)
        checkpoint = fake_checkpoint(folder / "best.ckpt", classes=classes)
        saved = torch.load(checkpoint, weights_only=True)
        saved["state_dict"]["model.classifier.weight"] *= 500  # logits of a few units, not near-uniform answers
        torch.save(saved, checkpoint)
        if temperature is not None:
            save_calibration(checkpoint, Calibration(temperature=temperature))
        checkpoints.append(checkpoint)
    return checkpoints


def manifest(root: Path, checkpoints: list[Path]) -> Path:
    first = TorchClassifier.load(checkpoints[0])
    return write_manifest(root / "ensemble.json", checkpoints, first.classes, first.preprocessing, Calibration())


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    checkpoints = members(root)
    return load_torch_classifier(manifest(root, checkpoints)), [TorchClassifier.load(c) for c in checkpoints]


def batch(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 48, 64)).astype(np.float32)


def test_the_probabilities_are_the_mean_of_the_members_calibrated_ones(ensemble):
    classifier, single = ensemble
    assert [m.temperature for m in single] == list(TEMPERATURES) and classifier.temperature == 1.0
    x = batch()
    expected = np.mean([softmax(member.logits(x), member.temperature) for member in single], axis=0)
    assert np.allclose(probabilities(classifier, x), expected, atol=1e-6)
    assert not np.allclose(expected, softmax(np.mean([m.logits(x) for m in single], axis=0)), atol=1e-3)
    # With test-time views too: each view's mean, then the views' mean, as for any classifier.
    views = probabilities(classifier, x, tta=True)
    assert views.shape == (5, len(CLASSES)) and np.allclose(views.sum(axis=1), 1)


def test_class_weights_shift_the_mean_under_pytorch_and_in_the_export(ensemble, tmp_path):
    import json

    from lesionkit.serve.export import export_classifier
    from lesionkit.serve.onnx_classifier import OnnxClassifier

    _, single = ensemble
    checkpoints = members(tmp_path)
    path = manifest(tmp_path, checkpoints)
    written = json.loads(path.read_text())
    path.write_text(json.dumps({**written, "class_weights": {"mel": 3.0, "df": 0.5}}))
    weighted = load_torch_classifier(path)
    x = batch()
    mean = np.mean([softmax(member.logits(x), member.temperature) for member in single], axis=0)
    weights = np.array([{"mel": 3.0, "df": 0.5}.get(c, 1.0) for c in CLASSES])
    expected = mean * weights / (mean * weights).sum(axis=1, keepdims=True)
    assert np.allclose(probabilities(weighted, x), expected, atol=1e-6)
    assert not np.allclose(expected, mean, atol=1e-3)
    assert weighted.meta["model_name"] == "ensemble of 2 test_efficientnet, weighted df x0.50, mel x3.00"

    exported = OnnxClassifier(export_classifier(weighted, path, tmp_path / "ensemble.onnx"))
    assert np.allclose(probabilities(exported, x), expected, atol=1e-5)
    assert exported.meta["class_weights"] == {"mel": 3.0, "df": 0.5}

    path.write_text(json.dumps({**written, "class_weights": {"mel": 1.0}}))
    assert load_torch_classifier(path).meta["model_name"] == "ensemble of 2 test_efficientnet"

    for bad in ({"melanoma": 2.0}, {"mel": 0}, {"mel": "2"}, {"mel": True}, {"mel": float("nan")}, {"mel": 10 ** 400},
                [2.0]):
        path.write_text(json.dumps({**written, "class_weights": bad}))
        with pytest.raises(LesionkitError, match=re.escape(str(path)) + ": class_weights .* must give positive "
                                                 "numbers for classes among akiec, bcc"):
            load_torch_classifier(path)


def test_features_are_the_first_members_and_metadata_reaches_every_member(ensemble, monkeypatch):
    classifier, single = ensemble
    x = batch(2)
    features, logits = classifier.features_and_logits(x)
    assert np.allclose(features, single[0].features_and_logits(x)[0], atol=1e-6)
    assert np.allclose(logits, classifier.logits(x), atol=1e-6)

    seen = []
    for member in classifier.members:
        monkeypatch.setattr(member, "logits", lambda b, metadata=None: seen.append(metadata) or np.zeros((len(b), 7)))
    rows = np.ones((2, 4), dtype=np.float32)
    classifier.logits(x)
    classifier.logits(x, rows)
    assert seen[:2] == [None, None] and all(m is rows for m in seen[2:]) and len(seen) == 4


def test_a_changed_or_missing_member_is_refused_naming_the_file(tmp_path):
    checkpoints = members(tmp_path)
    path = manifest(tmp_path, checkpoints)
    with checkpoints[1].open("ab") as f:
        f.write(b"retrained")
    with pytest.raises(LesionkitError, match=f"member {checkpoints[1]} is not the file the manifest was written"):
        load_torch_classifier(path)
    checkpoints[1].unlink()
    with pytest.raises(LesionkitError, match=f"member {checkpoints[1]} does not exist"):
        load_torch_classifier(tmp_path)  # the run folder, which holds ensemble.json
    with pytest.raises(LesionkitError, match="without ensemble.json"):
        load_torch_classifier(tmp_path / "fold-1")


def test_members_must_share_classes_and_a_fitted_temperature(tmp_path):
    checkpoints = members(tmp_path / "a")
    other = fake_checkpoint(tmp_path / "a" / "other.ckpt", classes=list(reversed(CLASSES)))
    save_calibration(other, Calibration(temperature=1.0))
    with pytest.raises(LesionkitError, match="member 2 predicts"):
        EnsembleClassifier([TorchClassifier.load(checkpoints[0]), TorchClassifier.load(other)])
    uncalibrated = members(tmp_path / "b", temperatures=(1.0, None))
    with pytest.raises(LesionkitError, match=f"member {uncalibrated[1]} has no fitted temperature"):
        load_torch_classifier(manifest(tmp_path / "b", uncalibrated))


def test_the_demo_serves_an_ensemble_and_maps_its_first_member(ensemble, tmp_path):
    from PIL import Image

    from lesionkit.serve.demo import analyse, build_demo
    from lesionkit.serve.explain import explain

    classifier, single = ensemble
    path = tmp_path / "lesion.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(path)
    status, shown, overlay = analyse(classifier, str(path), "ensemble.json")
    expected = np.mean([softmax(m.logits(m.transform(Image.open(path).convert("RGB"))[None]), m.temperature)
                        for m in single], axis=0)[0]
    assert np.allclose([shown[c] for c in CLASSES], expected, atol=1e-5), "the page shows the ensemble's answer"
    predicted = max(shown, key=shown.get)
    first = explain(single[0], Image.open(path).convert("RGB"), class_name=predicted).overlay
    assert np.array_equal(overlay, first) and predicted in status
    labels = {c["props"].get("label") for c in build_demo(classifier, "ensemble.json").config["components"]}
    assert "Grad-CAM of member 1 of the 2: where it looked for the ensemble's answer" in labels


def test_serve_takes_an_ensembles_run_folder(ensemble, tmp_path, monkeypatch):
    from lesionkit.cli import main
    from lesionkit.model.shipped import checkpoint_or_default

    root = tmp_path / "run"
    folder_manifest = manifest(root, members(root))
    assert checkpoint_or_default(root) == folder_manifest and checkpoint_or_default(folder_manifest) == folder_manifest
    checkpoint = root / "fold-1" / "checkpoints" / "best.ckpt"
    assert checkpoint_or_default(checkpoint) == checkpoint
    served = {}
    monkeypatch.setattr("lesionkit.serve.demo.serve", lambda classifier, source, *rest: served.update(
        classifier=classifier, source=source))
    assert main(["serve", "--checkpoint", str(root)]) == 0
    assert isinstance(served["classifier"], EnsembleClassifier) and served["source"] == str(folder_manifest)
    assert len(served["classifier"].members) == 2


def metadata_member(seed: int, ages: list[float], fields=("age", "sex", "localization")) -> TorchClassifier:
    """A member that reads metadata, its age scaled by a training part of ``ages`` (as each fold's is)."""
    import pandas as pd
    import timm

    from lesionkit.data.clinical import ClinicalEncoding
    from lesionkit.data.preprocessing import Preprocessing
    from lesionkit.model.network import attach_metadata

    torch.manual_seed(seed)
    part = pd.DataFrame({"age": ages, "sex": "male", "localization": "back"})
    encoding = ClinicalEncoding.fit(fields, part, part)
    model = attach_metadata(timm.create_model("test_efficientnet", num_classes=len(CLASSES)), encoding)
    torch.nn.init.normal_(model.get_classifier().fc.weight, std=0.3)  # logits that move by units with metadata
    meta = {"model_name": "test_efficientnet", "classes": list(CLASSES), "metadata": encoding.to_dict()}
    return TorchClassifier(model, Preprocessing(48, 64, (0.5,) * 3, (0.5,) * 3), meta, Calibration(temperature=1.5))


def test_members_whose_folds_scaled_age_apart_read_one_vector_as_each_read_its_own():
    from lesionkit.serve.export import network

    single = [metadata_member(1, [30, 40, 50]), metadata_member(2, [55, 70, 85, 60])]
    assert single[0].encoding.age_mean != single[1].encoding.age_mean
    patients = {"age": [20, 62.5, None], "sex": ["female", "male", ""], "localization": ["face", "back", ""]}
    x = batch(3)
    expected = np.mean([softmax(m.logits(x, m.encoding.encode(patients)), m.temperature) for m in single], axis=0)
    alone = np.mean([softmax(m.logits(x), m.temperature) for m in single], axis=0)

    classifier = EnsembleClassifier(single)
    rows = classifier.encoding.encode(patients)
    assert np.allclose(softmax(classifier.logits(x, rows)), expected, atol=1e-5)
    assert np.allclose(softmax(classifier.logits(x)), alone, atol=1e-5), "no metadata: every field unknown"
    assert not np.allclose(expected, alone, atol=1e-2), "the metadata must matter for the check to mean anything"
    with torch.inference_mode():  # the graph that `export` writes holds the adapted members too
        graph = network(classifier)(torch.from_numpy(x), torch.from_numpy(rows)).numpy()
    assert np.allclose(softmax(graph), expected, atol=1e-5)


def test_members_must_read_the_same_metadata_fields(tmp_path):
    unlike = r"member 2 reads clinical metadata as age; sex \(female, male, unknown\), member 1 as age; sex \(.*\); "
    with pytest.raises(LesionkitError, match=unlike + r"localization \(abdomen, .*members must read the same"):
        EnsembleClassifier([metadata_member(1, [30, 40]), metadata_member(2, [30, 40], fields=("age", "sex"))])
    without = TorchClassifier.load(members(tmp_path, temperatures=(1.0,))[0])
    with pytest.raises(LesionkitError, match="member 2 reads clinical metadata as nothing"):
        EnsembleClassifier([metadata_member(1, [30, 40]), without])
