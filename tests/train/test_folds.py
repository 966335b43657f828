"""Cross-validation end to end: ``train --folds 2`` on a tiny job, interrupted in its second fold and continued,
then the out-of-fold estimate, the ensemble manifest and the ensemble through evaluate, predict and export; and
``lesionkit ensemble`` combining it with the same job at another seed.

One tiny job (timm's ``test_efficientnet``, 48x64 px, one epoch per phase, reading clinical metadata) serves every
test of the module.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from helpers import assert_no_lesion_leak, make_ham_folder
from lesionkit import CLASSES
from lesionkit.cli import main

TINY = """\
data: {image_size: [48, 64], batch_size: 8, num_workers: 0}
split: {test_fraction: 0.25}
model: {name: test_efficientnet, weights: none, metadata: [age, sex, localization]}
train:
  accelerator: cpu
  phases:
    - {name: head, epochs: 1, lr: 1.0e-3, unfreeze: 0}
    - {name: finetune, epochs: 1, lr: 1.0e-3, unfreeze: 1}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_pace_of_the_folds_left_comes_from_those_trained_whole():
    from lesionkit.train.folds import pace

    assert pace(2, 5, [3000.0, 3600.0], 3) == ("Fold 2/5: 3 fold(s) to go, about 2.8 h at 55 min a fold (stop at "
                                               "any time: the same command with --resume continues)")
    assert pace(3, 5, [], 2) == "Fold 3/5: 2 fold(s) to go"
    assert pace(5, 5, [60.0], 0) == "Fold 5/5: every fold has finished"


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """The job with its second fold interrupted as by Ctrl-C after its first epoch, then continued with
    ``--resume``; returns the data, the run and what each of the two commands printed."""
    from lesionkit.train.resume import EpochSeed

    root = tmp_path_factory.mktemp("folds")
    data = make_ham_folder(root / "ham", lesions_per_class=4)
    metadata = pd.read_csv(data / "HAM10000_metadata.csv")
    metadata["age"] = 25.0 + 5 * (metadata.index % 11)  # each fold's training part scales age its own way
    metadata.to_csv(data / "HAM10000_metadata.csv", index=False)
    (root / "tiny.yaml").write_text(TINY)
    run = root / "run"
    argv = ["train", "--folds", "2", "--config", str(root / "tiny.yaml"), "--data-dir", str(data), "--out", str(run)]
    start = EpochSeed.on_train_epoch_start

    def stop_in_fold_2(self, trainer, module):
        if Path(trainer.default_root_dir).name == "fold-2" and module.phase_index == 1:
            raise KeyboardInterrupt
        start(self, trainer, module)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EpochSeed, "on_train_epoch_start", stop_in_fold_2)
        first = capture(argv)
    assert first[0] == 130, first[2][-2000:]
    second = capture(["train", "--folds", "2", "--out", str(run), "--resume"])
    assert second[0] == 0, second[2][-2000:]
    return data, run, argv, first, second


def capture(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)``'s exit code, standard output and standard error (pytest's capture is per test, and the
    module's fixture runs the commands)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_an_interrupted_fold_resumes_from_its_checkpoint_and_a_finished_one_is_skipped(folds_run):
    data, run, _, first, second = folds_run
    assert f"lesionkit train --folds 2 --out {run} --resume" in first[2] and "Traceback" not in first[2]
    assert "Fold 1/2: finished" in second[1] and f"Fold 2/2: resuming {run / 'fold-2'}" in second[1]
    # A fold trained whole sets the pace of those left; a resumed one does not.
    assert re.search(r"Fold 1/2: 1 fold\(s\) to go, about \d+ min at \d+ min a fold", first[1])
    assert "Fold 2/2: every fold has finished" in second[1] and "a fold" not in second[1]
    fold_2 = run / "fold-2"
    assert list(pd.read_csv(fold_2 / "metrics.csv")["phase"]) == ["head", "finetune"]
    assert len(json.loads((fold_2 / "provenance.json").read_text())["resumed"]) == 1
    assert len(json.loads((run / "fold-1" / "provenance.json").read_text()).get("resumed", [])) == 0
    assert json.loads((run / "folds.json").read_text())["finished"] == [1, 2]


def test_each_fold_is_a_normal_run_on_its_own_split_without_the_test_part(folds_run):
    data, run, *_ = folds_run
    splits = [pd.read_csv(run / f"fold-{n}" / "split.csv") for n in (1, 2)]
    test = [set(split.loc[split["split"] == "test", "image_id"]) for split in splits]
    assert test[0] and test[0] == test[1]
    for n, split in enumerate(splits, 1):
        fold = run / f"fold-{n}"
        assert_no_lesion_leak(split, data / "HAM10000_metadata.csv")
        for name in ("config.yaml", "report.json", "predictions.csv", "checkpoints/best.ckpt",
                     "checkpoints/temperature.json"):
            assert (fold / name).is_file(), f"fold-{n}/{name}"
        assert not (fold / "test").exists(), "a fold measured the test part"
        report = json.loads((fold / "report.json").read_text())
        assert report["n_images"] == (split["split"] == "val").sum()
        assert "evaluate_test: false" in (fold / "config.yaml").read_text()
    vals = [set(split.loc[split["split"] == "val", "lesion_id"]) for split in splits]
    assert not vals[0] & vals[1]
    # Fold 1's validation part is what fold 2 trains on, and the other way round.
    assert vals[0] == set(splits[1].loc[splits[1]["split"] == "train", "lesion_id"])


def test_out_of_fold_predictions_and_the_estimate(folds_run):
    _, run, *_ = folds_run
    oof = pd.read_csv(run / "oof.csv")
    split = pd.read_csv(run / "fold-1" / "split.csv")
    assert sorted(oof["image_id"]) == sorted(split.loc[split["split"] != "test", "image_id"])
    for n in (1, 2):
        own = pd.read_csv(run / f"fold-{n}" / "split.csv").query("split == 'val'")
        rows = oof[oof["fold"] == n]
        assert sorted(rows["image_id"]) == sorted(own["image_id"])
        predicted = pd.read_csv(run / f"fold-{n}" / "predictions.csv").set_index("image_id")
        columns = [f"p_{c}" for c in CLASSES]
        assert np.allclose(rows.set_index("image_id")[columns], predicted.loc[rows["image_id"], columns], atol=1e-6)
    probabilities = oof[[f"p_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    cv = json.loads((run / "cv.json").read_text())
    labels = [CLASSES.index(d) for d in oof["dx"]]
    assert cv["pooled"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, probabilities.argmax(axis=1)))
    low, high = cv["intervals"]["balanced_accuracy"]
    assert low <= cv["pooled"]["balanced_accuracy"] <= high and cv["bootstrap"]["unit"] == "lesion"
    assert cv["bootstrap"]["units"] == oof["lesion_id"].nunique()
    per_fold = [fold["balanced_accuracy"] for fold in cv["per_fold"]]
    assert cv["over_folds"]["balanced_accuracy"]["mean"] == pytest.approx(np.mean(per_fold))
    assert cv["over_folds"]["balanced_accuracy"]["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    assert cv["validation_lesions_disjoint"] and cv["images"] == len(oof)
    assert "Cross-validation, 2 folds, out of fold" in folds_run[4][1]


def test_the_ensemble_manifest_and_its_test_report(folds_run):
    _, run, *_ = folds_run
    manifest = json.loads((run / "ensemble.json").read_text())
    assert manifest["kind"] == "lesionkit-ensemble" and manifest["classes"] == list(CLASSES)
    assert [m["checkpoint"] for m in manifest["members"]] == [f"fold-{n}/checkpoints/best.ckpt" for n in (1, 2)]
    for member in manifest["members"]:
        assert member["sha256"] == sha256(run / member["checkpoint"])
    record = manifest["calibration"]
    assert record["temperature"] == 1.0 and len(record["conformal"]["scores"]) == len(pd.read_csv(run / "oof.csv"))
    assert record["ood"] == json.loads((run / "fold-1" / "checkpoints" / "temperature.json").read_text())[
        "best.ckpt"]["ood"], "the first member's detector: the ensemble serves its features"
    test = json.loads((run / "test" / "report.json").read_text())
    split = pd.read_csv(run / "fold-1" / "split.csv")
    assert test["n_images"] == (split["split"] == "test").sum()
    assert test["context"]["model"] == "ensemble of 2 test_efficientnet"


def test_the_same_command_again_skips_every_fold_and_other_settings_are_refused(folds_run, capsys):
    _, run, argv, *_ = folds_run
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("fold-*/checkpoints/*.ckpt")}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Fold 1/2: finished" in out and "Fold 2/2: finished" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a finished fold was trained again"

    assert main([*argv[:2], "3", *argv[3:]]) == 1
    assert "holds a 2-fold cross-validation, not 3 folds" in capsys.readouterr().err
    assert main([*argv, "--set", "train.seed=1"]) == 1
    assert "train.seed differ" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 1
    assert "holds a cross-validation" in capsys.readouterr().err
    assert main([*argv, "--split-file", str(run / "fold-1" / "split.csv")]) == 1
    assert "--folds makes each fold's split itself" in capsys.readouterr().err


def test_a_manifest_whose_member_changed_is_refused(folds_run, tmp_path, capsys):
    data, run, *_ = folds_run
    image = str(next(data.rglob("*.jpg")))
    copy = tmp_path / "ensemble.json"  # a manifest beside copies of the members, one of them altered
    for n in (1, 2):
        member = tmp_path / f"fold-{n}" / "checkpoints" / "best.ckpt"
        member.parent.mkdir(parents=True)
        member.write_bytes((run / f"fold-{n}" / "checkpoints" / "best.ckpt").read_bytes() + b"!" * (n == 2))
    copy.write_text((run / "ensemble.json").read_text())
    assert main(["predict", "--checkpoint", str(copy), image]) == 1
    err = capsys.readouterr().err
    assert f"member {tmp_path / 'fold-2' / 'checkpoints' / 'best.ckpt'} is not the file" in err


def test_predict_evaluate_and_export_take_the_ensemble_as_one_model(folds_run, tmp_path, capsys):
    from lesionkit.serve.classifier import probabilities
    from lesionkit.serve.ensemble import EnsembleClassifier
    from lesionkit.data.images import load_image

    data, run, *_ = folds_run
    images = sorted(data.rglob("*.jpg"))[:3]
    manifest = run / "ensemble.json"
    assert main(["predict", "--checkpoint", str(manifest), "--format", "json", *map(str, images)]) == 0
    torch_answers = json.loads(capsys.readouterr().out)
    ensemble = EnsembleClassifier.load(manifest)
    expected = probabilities(ensemble, np.stack([ensemble.transform(load_image(p)) for p in images]))
    got = np.array([[a["probabilities"][c] for c in CLASSES] for a in torch_answers])
    assert np.allclose(got, expected, atol=1e-6)
    assert all(isinstance(a["out_of_distribution"], bool) and isinstance(a["refer"], bool) for a in torch_answers)

    assert main(["predict", "--checkpoint", str(run), "--format", "json", str(images[0])]) == 0  # the folder
    assert json.loads(capsys.readouterr().out)[0]["probabilities"] == torch_answers[0]["probabilities"]

    assert main(["export", "--checkpoint", str(manifest)]) == 0
    assert "logit difference" in capsys.readouterr().out and (run / "ensemble.onnx").is_file()
    assert main(["predict", "--checkpoint", str(manifest), "--backend", "onnx", "--format", "json",
                 *map(str, images)]) == 0
    onnx_answers = json.loads(capsys.readouterr().out)
    served = np.array([[a["probabilities"][c] for c in CLASSES] for a in onnx_answers])
    assert np.allclose(served, got, atol=1e-4)
    assert [a["out_of_distribution"] for a in onnx_answers] == [a["out_of_distribution"] for a in torch_answers]

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(manifest), "--data-dir", str(data), "--split-file",
                 str(run / "fold-1" / "split.csv"), "--split", "test", "--out", str(out)]) == 0
    report, trained = (json.loads((folder / "report.json").read_text()) for folder in (out, run / "test"))
    assert report["balanced_accuracy"] == pytest.approx(trained["balanced_accuracy"])
    assert report["conformal"]["calibration_scores"] == len(pd.read_csv(run / "oof.csv"))

    assert main(["evaluate", "--checkpoint", str(manifest), "--data-dir", str(data), "--split-file",
                 str(run / "fold-1" / "split.csv"), "--fit-temperature", "--out", str(out)]) == 1
    assert "is an ensemble" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(manifest), str(images[0]), "--out", str(tmp_path / "maps")]) == 1
    assert "explain a member, e.g. --checkpoint" in capsys.readouterr().err


# ---- several cross-validations of the same folds as one ensemble ---------------------------------------------

@pytest.fixture(scope="module")
def second_run(folds_run):
    """The same job at another training seed: the same folds, other members."""
    _, run, argv, *_ = folds_run
    second = run.parent / "run-seed-7"
    code, _, err = capture([*argv[:-1], str(second), "--set", "train.seed=7"])
    assert code == 0, err[-2000:]
    return second


def test_two_cross_validations_of_the_same_folds_combine_into_one_ensemble(folds_run, second_run, tmp_path,
                                                                          capsys):
    from lesionkit.data.images import load_image
    from lesionkit.serve.classifier import probabilities
    from lesionkit.serve.ensemble import EnsembleClassifier

    data, run, *_ = folds_run
    out = tmp_path / "both"
    assert main(["ensemble", str(run), str(second_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Cross-validation, 2 folds, out of fold" in printed and "Ensemble of 4 members from 2 runs" in printed

    columns = [f"p_{c}" for c in CLASSES]
    combined = pd.read_csv(out / "oof.csv").set_index("image_id")
    each = [pd.read_csv(r / "oof.csv").set_index("image_id").loc[combined.index] for r in (run, second_run)]
    assert not np.allclose(each[0][columns], each[1][columns]), "the seeds trained other members"
    assert np.allclose(combined[columns], (each[0][columns] + each[1][columns]) / 2, atol=2e-6)
    assert list(combined["prediction"]) == [CLASSES[i] for i in combined[columns].to_numpy().argmax(axis=1)]
    assert combined["fold"].equals(each[0]["fold"]) and combined["fold"].equals(each[1]["fold"])

    cv = json.loads((out / "cv.json").read_text())
    labels = [CLASSES.index(d) for d in combined["dx"]]
    assert cv["pooled"]["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels, combined[columns].to_numpy().argmax(axis=1)))
    assert [(out / name).resolve() for name in cv["runs"]] == [run.resolve(), second_run.resolve()]

    manifest = json.loads((out / "ensemble.json").read_text())
    named = [(out / m["checkpoint"]).resolve() for m in manifest["members"]]
    assert named == [(r / f"fold-{n}" / "checkpoints" / "best.ckpt").resolve()
                     for r in (run, second_run) for n in (1, 2)]
    assert [m["sha256"] for m in manifest["members"]] == [sha256(path) for path in named]
    assert len(manifest["calibration"]["conformal"]["scores"]) == len(combined)

    images = sorted(data.rglob("*.jpg"))[:3]
    assert main(["predict", "--checkpoint", str(out), "--format", "json", *map(str, images)]) == 0
    got = np.array([[a["probabilities"][c] for c in CLASSES] for a in json.loads(capsys.readouterr().out)])
    halves = [EnsembleClassifier.load(r / "ensemble.json") for r in (run, second_run)]
    expected = [probabilities(e, np.stack([e.transform(load_image(p)) for p in images])) for e in halves]
    assert np.allclose(got, (expected[0] + expected[1]) / 2, atol=1e-5)
    assert main(["evaluate", "--checkpoint", str(out), "--data-dir", str(data), "--split-file",
                 str(run / "fold-1" / "split.csv"), "--split", "test", "--out", str(out / "test")]) == 0
    assert json.loads((out / "test" / "report.json").read_text())["context"]["model"] == \
        "ensemble of 4 test_efficientnet"


def test_favouring_melanoma_weighs_p_mel_as_fitted_out_of_fold(folds_run, tmp_path, capsys):
    from lesionkit.evaluate.decisions import MELANOMA_WEIGHTS

    data, run, *_ = folds_run
    out = tmp_path / "favoured"
    assert main(["ensemble", str(run), "--out", str(out), "--favour-melanoma", "0.9"]) == 0
    printed = capsys.readouterr().out
    columns, mel = [f"p_{c}" for c in CLASSES], CLASSES.index("mel")
    plain = pd.read_csv(run / "oof.csv").set_index("image_id")
    labels = np.array([CLASSES.index(d) for d in plain["dx"]])

    def smallest(here: np.ndarray) -> float:
        """By brute force: the first weight of the grid whose argmax finds 90% of these melanomas."""
        weights = [w for w in MELANOMA_WEIGHTS if (
            (plain.loc[here, columns].to_numpy() * np.where(np.arange(7) == mel, w, 1.0))[labels[here] == mel]
            .argmax(axis=1) == mel).mean() >= 0.9]
        return float(weights[0]) if weights else float(MELANOMA_WEIGHTS[-1])

    weight = json.loads((out / "ensemble.json").read_text())["class_weights"]
    assert weight == {c: (smallest(np.ones(len(plain), dtype=bool)) if c == "mel" else 1.0) for c in CLASSES}
    assert weight["mel"] > 1, "the tiny models miss melanomas at the plain argmax"
    # oof.csv: each fold's probabilities weighted by the weight fitted on the other fold.
    favoured = pd.read_csv(out / "oof.csv").set_index("image_id").loc[plain.index]
    cv = json.loads((out / "cv.json").read_text())
    for n, fitted in zip((1, 2), cv["favour_melanoma"]["per_fold"], strict=True):
        here = (plain["fold"] == n).to_numpy()
        assert fitted == smallest(~here)
        shifted = plain.loc[here, columns].to_numpy() * np.where(np.arange(7) == mel, fitted, 1.0)
        assert np.allclose(favoured.loc[here, columns], shifted / shifted.sum(axis=1, keepdims=True), atol=2e-6)
    assert cv["pooled"]["melanoma_sensitivity"] == pytest.approx(
        (favoured[columns].to_numpy().argmax(axis=1)[labels == mel] == mel).mean())
    assert f"p(mel) weighted {weight['mel']:.2f}" in printed and "Ensemble of 2 members from 1 run," in printed

    # Served: the plain ensemble's probabilities, p(mel) weighted and renormalised.
    images = sorted(data.rglob("*.jpg"))[:3]
    answers = []
    for checkpoint in (run, out):
        assert main(["predict", "--checkpoint", str(checkpoint), "--format", "json", *map(str, images)]) == 0
        answers.append(np.array([[a["probabilities"][c] for c in CLASSES]
                                 for a in json.loads(capsys.readouterr().out)]))
    shifted = answers[0] * np.where(np.arange(7) == mel, weight["mel"], 1.0)
    assert np.allclose(answers[1], shifted / shifted.sum(axis=1, keepdims=True), atol=1e-5)

    # Its export serves the weight; written again for another sensitivity, the manifest no longer matches it.
    assert main(["export", "--checkpoint", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--backend", "onnx", "--checkpoint", str(out), "--format", "json", *map(str, images)]) == 0
    served = np.array([[a["probabilities"][c] for c in CLASSES] for a in json.loads(capsys.readouterr().out)])
    assert np.allclose(served, answers[1], atol=1e-5)
    assert main(["ensemble", str(run), "--out", str(out), "--favour-melanoma", "0.5"]) == 0
    capsys.readouterr()
    assert main(["predict", "--backend", "onnx", "--checkpoint", str(out), str(images[0])]) == 1
    assert (f"{out / 'ensemble.onnx'} was exported from another ensemble.json than {out / 'ensemble.json'} holds now"
            in capsys.readouterr().err)
    assert main(["predict", "--checkpoint", str(out / "ensemble.onnx"), str(images[0])]) == 1  # named directly
    assert "export it again with `lesionkit export --checkpoint" in capsys.readouterr().err
    beside = tmp_path / "beside"  # the export beside a manifest that is JSON but no manifest
    beside.mkdir()
    shutil.copy(out / "ensemble.onnx", beside)
    (beside / "ensemble.json").write_text("[]")
    assert main(["predict", "--checkpoint", str(beside / "ensemble.onnx"), str(images[0])]) == 1
    assert f"{beside / 'ensemble.json'} is not an ensemble manifest (a JSON object)" in capsys.readouterr().err

    # A manifest whose members are gone names the command that writes it again, the weight's target included.
    moved = tmp_path / "moved" / "deeper"  # the members' relative paths lead nowhere from here
    moved.mkdir(parents=True)
    (moved / "ensemble.json").write_text((out / "ensemble.json").read_text())
    assert main(["predict", "--checkpoint", str(moved), str(images[0])]) == 1
    assert f"--out {moved} --favour-melanoma 0.5`" in capsys.readouterr().err

    for bad in ("0", "1", "1.5"):
        assert main(["ensemble", str(run), "--out", str(tmp_path / "bad"), "--favour-melanoma", bad]) == 1
        assert f"--favour-melanoma {bad}: must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_melanoma_weight_needs_melanomas_in_two_folds_and_says_when_it_falls_short():
    from lesionkit import LesionkitError
    from lesionkit.train.folds import fit_melanoma_weight

    rng, mel = np.random.default_rng(0), CLASSES.index("mel")
    labels = np.repeat([mel, CLASSES.index("nv")], 20)
    probabilities = rng.dirichlet(np.ones(len(CLASSES)), len(labels))
    probabilities[:, CLASSES.index("nv")] += 3.0 * (labels != mel)  # the naevi are sure
    probabilities[:, mel] += 0.2 * (labels == mel)  # a large enough weight finds a melanoma...
    probabilities[:5, mel] = 0.0  # ...but for five
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    oof = pd.DataFrame(probabilities, columns=[f"p_{c}" for c in CLASSES]).assign(
        dx=[CLASSES[i] for i in labels], fold=1 + np.arange(len(labels)) % 2)
    short = fit_melanoma_weight(oof, 0.95)
    assert short.found == pytest.approx(0.75) and short.weight == pytest.approx(np.exp(3.0))
    reached = fit_melanoma_weight(oof, 0.7)
    assert reached.found >= 0.7 and reached.weight < np.exp(3.0)
    oof.loc[(oof["dx"] == "mel") & (oof["fold"] == 2), "dx"] = "nv"
    with pytest.raises(LesionkitError, match="the folds other than fold 1 hold no melanoma"):
        fit_melanoma_weight(oof, 0.7)


def test_runs_that_cut_other_folds_or_have_not_finished_are_refused(folds_run, second_run, tmp_path, capsys):
    import shutil

    _, run, *_ = folds_run
    other = tmp_path / "other-folds"
    shutil.copytree(second_run, other)
    split = pd.read_csv(other / "fold-1" / "split.csv")
    swap = [split.index[split["split"] == part][0] for part in ("train", "val")]
    split.loc[swap, "split"] = ["val", "train"]
    split.to_csv(other / "fold-1" / "split.csv", index=False)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(second_run, unfinished)
    (unfinished / "folds.json").write_text(json.dumps({"kind": "lesionkit-cross-validation", "folds": 2,
                                                       "finished": [1]}))
    for argv, message in (
            ([str(run), str(other)], f"fold 1 of {other} splits the images otherwise than fold 1 of {run}"),
            ([str(run), str(unfinished)], f"lesionkit train --folds 2 --out {unfinished} --resume"),
            ([str(run)], "give two or more"),
            ([str(run), str(tmp_path)], "holds no cross-validation")):
        assert main(["ensemble", *argv, "--out", str(tmp_path / "combined")]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert main(["ensemble", str(run), str(second_run), "--out", str(run)]) == 1
    assert "holds a run: choose a new folder" in capsys.readouterr().err
    assert main(["ensemble", str(run), str(run), "--out", str(tmp_path / "combined")]) == 1
    assert "a run is named twice" in capsys.readouterr().err
    assert not (tmp_path / "combined").exists(), "a refused combination writes nothing"

    # A combined ensemble whose member was retrained is refused, naming the command that writes it again.
    copies = [tmp_path / "copies" / r.name for r in (run, second_run)]
    for source, copy in zip((run, second_run), copies, strict=True):
        shutil.copytree(source, copy)
    assert main(["ensemble", *map(str, copies), "--out", str(tmp_path / "copies" / "both")]) == 0
    member = copies[1] / "fold-2" / "checkpoints" / "best.ckpt"
    member.write_bytes(member.read_bytes() + b"!")
    capsys.readouterr()
    image = str(next((folds_run[0]).rglob("*.jpg")))
    assert main(["predict", "--checkpoint", str(tmp_path / "copies" / "both"), image]) == 1
    err = capsys.readouterr().err
    assert f"member {member}" in err and "is not the file" in err and "`lesionkit ensemble " in err
