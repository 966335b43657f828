"""Clinical metadata (``model.metadata``): the encoding of age, sex and site and its refusals, the metadata
reaching the model and its absence handled, and a run that trains, reports, predicts and exports with it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_ham_folder

from lesionkit import CLASSES, LesionkitError
from lesionkit.cli import main
from lesionkit.data.clinical import ClinicalEncoding
from lesionkit.model.network import MetadataHead, attach_metadata, logits_with_metadata

FIELDS = ["age", "sex", "localization"]
SITES = ["back", "face", "scalp", "chest", "foot", "trunk", "hand"]  # one per class: metadata that tells


def encoding() -> ClinicalEncoding:
    frame = pd.DataFrame({"age": [30, 50, 70, None], "sex": ["male", "female", "", "unknown"],
                          "localization": ["back", "face", None, "palm"]})
    return ClinicalEncoding.fit(FIELDS, frame.iloc[:3], frame)


def test_encoding_scales_age_flags_missing_values_and_one_hot_encodes_levels():
    enc = encoding()
    assert (enc.age_mean, enc.age_std) == (50.0, 20.0), "age's scale comes from the training part"
    assert "palm" in enc.levels["localization"], "a site of the data beyond HAM10000's becomes a level"
    assert enc.levels["localization"][-1] == "unknown" and enc.levels["sex"] == ("female", "male", "unknown")
    rows = enc.encode({"age": [70, None], "sex": ["Female", ""], "localization": [" face ", "unknown"]})
    assert rows.shape == (2, enc.width) == (2, 2 + 3 + len(enc.levels["localization"]))
    np.testing.assert_allclose(rows[0, :2], [1.0, 0.0])  # (70 - 50) / 20, not missing
    np.testing.assert_allclose(rows[1, :2], [0.0, 1.0])  # missing
    (sex0, sex1), (site0, site1) = (rows[:, slice(*enc.slices[i])] for i in (1, 2))
    assert enc.levels["sex"][sex0.argmax()] == "female" and enc.levels["sex"][sex1.argmax()] == "unknown"
    assert enc.levels["localization"][site0.argmax()] == "face"
    np.testing.assert_array_equal(rows[1], enc.unknown(1)[0]), "blank is unknown"
    np.testing.assert_array_equal(enc.encode({}, 3), enc.unknown(3)), "an absent column is unknown throughout"
    assert ClinicalEncoding.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc


@pytest.mark.parametrize(("values", "message"), [
    ({"localization": ["knee"]}, r"localization 'knee' is not one this model knows.*use one of: abdomen, acral"),
    ({"sex": ["x"]}, r"sex 'x' is not one.*female, male, unknown"),
    ({"age": ["old"]}, r"age must be a number of years from 0 to 120.*'old'"),
    ({"age": [-3]}, r"age must be a number of years"),
    ({"age": [130], "image_id": ["ISIC_1"]}, r"'130' for image\(s\) ISIC_1"),
])
def test_a_bad_value_is_refused_naming_what_is_allowed(values, message):
    with pytest.raises(LesionkitError, match=message):
        encoding().encode(values)


def test_metadata_reaches_the_model_and_without_it_every_field_is_unknown():
    import timm

    enc = encoding()
    torch.manual_seed(0)
    model = attach_metadata(timm.create_model("test_efficientnet", num_classes=7), enc).eval()
    assert isinstance(model.get_classifier(), MetadataHead)
    images = torch.rand(2, 3, 32, 32)
    young = torch.from_numpy(enc.encode({"age": [20, 20], "localization": ["back", "back"]}))
    old = torch.from_numpy(enc.encode({"age": [80, 80], "localization": ["face", "face"]}))
    torch.nn.init.normal_(model.get_classifier().fc.weight)  # a trained head reads its inputs; zero-ish does not
    with torch.no_grad():
        assert not torch.allclose(logits_with_metadata(model, images, young), logits_with_metadata(model, images, old))
        unknown = torch.from_numpy(enc.unknown(2))
        torch.testing.assert_close(model(images), logits_with_metadata(model, images, unknown))
        torch.testing.assert_close(logits_with_metadata(model, images, None), model(images))


def test_field_dropout_in_training_replaces_fields_by_unknown():
    enc = encoding()
    head = MetadataHead(8, 7, torch.from_numpy(enc.unknown(1)[0]), enc.slices, field_dropout=0.999).train()
    features = torch.rand(64, 8)
    given = torch.from_numpy(enc.encode({"age": [20] * 64, "sex": ["male"] * 64}))
    torch.manual_seed(0)
    # Each field dropped alone, with probability ~1: the head sees the unknown row, as without metadata.
    torch.testing.assert_close(head(features, given), head(features, None))
    head.field_dropout = 0.0
    assert not torch.allclose(head(features, given), head(features, None))


@pytest.fixture(scope="module")
def metadata_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("metadata")
    data = make_ham_folder(root / "ham", lesions_per_class=4)
    frame = pd.read_csv(data / "HAM10000_metadata.csv")
    frame["localization"] = [SITES[CLASSES.index(d)] for d in frame["dx"]]
    frame["age"] = frame["age"].astype(object)
    frame.loc[::5, "age"] = None
    frame.to_csv(data / "HAM10000_metadata.csv", index=False)
    assert main(["train", "--data-dir", str(data), "--out", str(root / "run"), "--model", "test_efficientnet",
                 "--weights", "none", "--set", "data.image_size=[48,64]", "--set", "data.batch_size=8",
                 "--set", "data.num_workers=0", "--set", "train.accelerator=cpu",
                 "--set", "model.metadata=[age,sex,localization]", "--set", "train.phases.0.epochs=2",
                 "--set", "train.phases.0.lr=0.05", "--set", "train.phases.1.epochs=1"]) == 0
    return root, data


def test_a_metadata_run_carries_its_encoding_and_reports_with_and_without_metadata(metadata_run):
    root, data = metadata_run
    checkpoint = torch.load(root / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    carried = ClinicalEncoding.from_dict(checkpoint["hyper_parameters"]["metadata"])
    assert carried.fields == tuple(FIELDS) and "classifier.embed.0.weight" in {
        k.removeprefix("model.") for k in checkpoint["state_dict"]}
    report = json.loads((root / "run" / "report.json").read_text())
    section = report["metadata"]
    assert section["given"] == "age, sex, localization" and set(section) == {"fields", "given", "with", "without"}
    assert section["with"]["balanced_accuracy"] == report["balanced_accuracy"]
    # The site tells the class here: the model uses it, so its figures change when it is withheld.
    assert section["with"] != section["without"]
    assert "## Clinical metadata" in (root / "run" / "report.md").read_text()
    # The gallery's maps ran with each image's own metadata (blank ages left out), as its probabilities did.
    frame = pd.read_csv(data / "HAM10000_metadata.csv").set_index("image_id")
    entries = [entry for kinds in report["gallery"]["images"].values() for entry in kinds.values()]
    assert entries and all("error" not in entry for entry in entries)
    for entry in entries:
        row = frame.loc[entry["image_id"]]
        assert entry["metadata"] == {f: row[f] for f in FIELDS if pd.notna(row[f])}
    assert main(["card", str(root / "run")]) == 0
    card = (root / "run" / "MODEL_CARD.md").read_text()
    assert "also reads age, sex, localization" in card and "Without the clinical metadata" in card


def test_the_logits_without_metadata_come_from_the_same_backbone_passes(metadata_run, monkeypatch):
    from lesionkit.serve.classifier import view_logits, view_outputs
    from lesionkit.serve.torch_classifier import TorchClassifier

    root, _ = metadata_run
    classifier = TorchClassifier.load(root / "run" / "checkpoints" / "best.ckpt")
    enc = classifier.encoding
    batch = np.random.default_rng(0).random((3, 3, 48, 64), dtype=np.float32)
    given = enc.encode({"age": [20, 50, 80], "localization": ["back", "face", "foot"]})
    outputs = view_outputs(classifier, batch, True, given, unknown_too=True)
    assert outputs.logits.shape == outputs.unknown_logits.shape == (3, 8, 7)
    np.testing.assert_allclose(outputs.logits, view_logits(classifier, batch, True, given), atol=1e-5)
    # The head alone on the stored features gives what a pass without metadata gives, view by view.
    np.testing.assert_allclose(outputs.unknown_logits, view_logits(classifier, batch, True), atol=1e-5)
    assert not np.allclose(outputs.logits, outputs.unknown_logits, atol=1e-3)
    # A backend that cannot run its head alone (an export, an ensemble) gets passes of their own, alike.
    passes = []
    monkeypatch.setattr(classifier, "head_logits", lambda features, metadata=None: None)
    monkeypatch.setattr(classifier, "logits", lambda view, metadata=None: passes.append(view) or
                        TorchClassifier.logits(classifier, view, metadata))
    fallback = view_outputs(classifier, batch, True, given, unknown_too=True)
    assert len(passes) == 8
    np.testing.assert_allclose(fallback.unknown_logits, outputs.unknown_logits, atol=1e-5)
    assert view_outputs(classifier, batch, False, given).unknown_logits is None


def test_predict_takes_metadata_from_flags_or_a_csv_and_through_onnx(metadata_run, capsys):
    root, data = metadata_run
    checkpoint = root / "run" / "checkpoints" / "best.ckpt"
    images = sorted((data / "HAM10000_images_part_1").glob("*.jpg"))[:2]

    def predict(*extra, backend="torch"):
        capsys.readouterr()
        code = main(["predict", *map(str, images), "--checkpoint", str(checkpoint), "--format", "json",
                     "--backend", backend, *extra])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if code == 0 else None), err

    code, plain, err = predict()
    assert code == 0 and "metadata: none given" in err and all(r["metadata"] is None for r in plain)
    code, flagged, err = predict("--age", "55", "--sex", "Female", "--site", "face")  # echoed as the model reads it
    assert code == 0 and all(r["metadata"] == {"age": "55", "sex": "female", "localization": "face"} for r in flagged)
    assert flagged[0]["probabilities"] != plain[0]["probabilities"], "the metadata reaches the model"

    table = root / "clinical.csv"
    table.write_text(f"image_id,age,localization\n{images[0].stem},55,face\n")
    code, from_csv, err = predict("--metadata", str(table))
    assert code == 0 and "for 1 of 2 image(s)" in err
    assert from_csv[0]["metadata"] == {"age": "55", "localization": "face"} and from_csv[1]["metadata"] is None
    assert from_csv[1]["probabilities"] == plain[1]["probabilities"]
    for fmt, shown in (("csv", ["55", "", "face"]), ("table", ["age 55, localization face"])):
        assert main(["predict", *map(str, images), "--checkpoint", str(checkpoint), "--format", fmt, "--metadata",
                     str(table)]) == 0
        lines = capsys.readouterr().out.splitlines()
        if fmt == "csv":
            rows = list(csv.DictReader(lines))
            assert [rows[0][f] for f in FIELDS] == shown and [rows[1][f] for f in FIELDS] == ["", "", ""]
        else:
            assert lines[0].endswith("metadata") and lines[1].endswith(shown[0]) and lines[2].endswith("  -")

    assert main(["export", "--checkpoint", str(checkpoint)]) == 0
    code, served, _ = predict("--metadata", str(table), backend="onnx")
    assert code == 0
    for ours, theirs in zip(from_csv, served, strict=True):
        assert theirs["metadata"] == ours["metadata"]
        np.testing.assert_allclose(list(theirs["probabilities"].values()), list(ours["probabilities"].values()),
                                   atol=1e-4)


def test_the_demo_offers_the_fields_the_model_reads_and_uses_them(metadata_run):
    from lesionkit.serve.demo import analyse, build_demo
    from lesionkit.serve.torch_classifier import TorchClassifier

    root, data = metadata_run
    classifier = TorchClassifier.load(root / "run" / "checkpoints" / "best.ckpt")
    image = str(next((data / "HAM10000_images_part_1").glob("*.jpg")))
    status, without, _ = analyse(classifier, image, "tiny")
    assert "Clinical metadata used: none" in status
    status, given, _ = analyse(classifier, image, "tiny", 70, "female", "face")
    assert "Clinical metadata used: age 70, sex female, localization face" in status and given != without
    status, _, _ = analyse(classifier, image, "tiny", None, None, "knee")
    assert "Could not use this upload" in status and "use one of: abdomen" in status
    page = build_demo(classifier, "tiny").config
    assert {"age", "sex", "localization"} <= {c["props"].get("elem_id") for c in page["components"]}


def test_explain_maps_the_answer_given_with_the_metadata(metadata_run, capsys, tmp_path):
    root, data = metadata_run
    checkpoint = str(root / "run" / "checkpoints" / "best.ckpt")
    image = str(next((data / "HAM10000_images_part_1").glob("*.jpg")))
    flags = ["--age", "70", "--sex", "female", "--site", "face"]
    lines = {}
    for name, extra in (("with", flags), ("without", [])):
        assert main(["explain", image, "--checkpoint", checkpoint, "--class", "mel", "--out", str(tmp_path / name),
                     *extra]) == 0
        lines[name] = json.loads((tmp_path / name / "explanations.jsonl").read_text())
        capsys.readouterr()
        assert main(["predict", image, "--checkpoint", checkpoint, "--format", "json", *extra]) == 0
        predicted = json.loads(capsys.readouterr().out)[0]
        assert lines[name]["probability"] == pytest.approx(predicted["probabilities"]["mel"], abs=1e-5)
    assert lines["with"]["metadata"] == {"age": "70", "sex": "female", "localization": "face"}
    assert lines["without"]["metadata"] is None
    assert lines["with"]["probability"] != lines["without"]["probability"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--site", "knee"], "localization 'knee' is not one this model knows; use one of: abdomen"),
    (["--metadata", "header-only.csv"], "needs an image_id column and one or more of age, sex, localization; it "
                                        "has x"),
    (["--metadata", "short.csv"], "image_id is blank on line(s) 3: give each row the file name"),
    (["--metadata", "twice.csv"], "lists A, B more than once: keep one row per image"),
    (["--age", "abc"], "age must be a number of years"),
    (["--age", "50", "--metadata", "x.csv"], "either as --age/--sex/--site"),
])
def test_predict_refuses_bad_metadata_before_any_answer(metadata_run, capsys, tmp_path, flags, message):
    root, data = metadata_run
    image = next((data / "HAM10000_images_part_1").glob("*.jpg"))
    tables = {"header-only.csv": "x,y\n", "short.csv": "image_id,age\nA,50\n,60\n",
              "twice.csv": "image_id,age\nA,50\nB,1\nA,60\nB,2\n"}
    for name, text in tables.items():
        (tmp_path / name).write_text(text)
    flags = [str(tmp_path / flag) if flag in tables else flag for flag in flags]
    capsys.readouterr()
    assert main(["predict", str(image), "--checkpoint", str(root / "run" / "checkpoints" / "best.ckpt"),
                 *flags]) == 1
    out, err = capsys.readouterr()
    assert message in err and "prediction" not in out


def test_metadata_settings_are_checked():
    from lesionkit.config import load_config

    with pytest.raises(LesionkitError, match="model.metadata lists fields once each, from age, sex, localization"):
        load_config(None, ["model.metadata=[age,weight]"])
    with pytest.raises(LesionkitError, match="with model.metadata set cache_features: false"):
        load_config(None, ["model.metadata=[age]", "augment.enabled=false", "train.phases.0.cache_features=true"])
