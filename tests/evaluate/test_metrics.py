"""The evaluation's numbers against scikit-learn, the bootstrap, temperature scaling, labels and subgroups."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics

from lesionkit import CLASSES, LesionkitError
from lesionkit.evaluate.bootstrap import BootstrapSettings, intervals, resample_weights, weighted_metrics
from lesionkit.evaluate.calibration import fit_temperature, reliability_bins
from lesionkit.evaluate.report import build_report
from lesionkit.serve.classifier import softmax
from lesionkit.evaluate.compare import comparison_table, hardware_note
from lesionkit.data.labels import read_labels
from lesionkit.evaluate.metrics import (brier_score, classification_metrics, expected_calibration_error,
                               operating_points)
from lesionkit.evaluate.subgroups import MIN_IMAGES, subgroup_metrics

K = len(CLASSES)
MEL = CLASSES.index("mel")


def case(n=600, seed=0, strength=1.5, sharpen=1.0):
    """Labels and logits of a fair model (``sharpen`` > 1 makes it over-confident); scores rounded for ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    logits = rng.normal(size=(n, K))
    logits[np.arange(n), labels] += strength
    return labels, np.round(logits * sharpen, 2)


def test_metrics_match_scikit_learn():
    labels, logits = case()
    p = softmax(logits)
    predictions = p.argmax(1)
    report = classification_metrics(labels, p, list(CLASSES))
    assert report["weighted_f1"] == pytest.approx(metrics.f1_score(labels, predictions, average="weighted"))
    cm = metrics.confusion_matrix(labels, predictions)
    for i, name in enumerate(CLASSES):
        c = report["per_class"][name]
        negatives = cm.sum() - cm[i].sum()
        assert c["specificity"] == pytest.approx((negatives - (cm[:, i].sum() - cm[i, i])) / negatives)
        assert c["sensitivity"] == pytest.approx(metrics.recall_score(labels == i, predictions == i))
        assert c["average_precision"] == pytest.approx(metrics.average_precision_score(labels == i, p[:, i]))
    onehot = np.eye(K)[labels]
    assert brier_score(labels, p) == pytest.approx(((p - onehot) ** 2).sum(1).mean())
    # ECE from torchmetrics equals the reliability diagram's bars, weighted by count.
    bins = reliability_bins(labels, p, 15)
    gaps = [n * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"], strict=True) if n]
    assert expected_calibration_error(labels, p) == pytest.approx(sum(gaps) / len(labels), abs=1e-5)


def test_melanoma_operating_points_match_the_roc_curve():
    labels, logits = case(seed=1)
    p = softmax(logits)
    points = operating_points(labels, p, list(CLASSES))
    fpr, tpr, _ = metrics.roc_curve(labels == MEL, p[:, MEL])
    for spec in ("0.80", "0.90"):
        best = tpr[fpr <= 1 - float(spec) + 1e-9].max()
        assert points["sensitivity_at_specificity"][spec]["value"] == pytest.approx(best, abs=1e-6)
    assert points["specificity_at_sensitivity"]["0.90"]["value"] == pytest.approx(1 - fpr[tpr >= 0.9].min(), abs=1e-6)


def test_each_bootstrap_resample_is_scikit_learn_with_sample_weight():
    labels, logits = case(seed=2)
    p = softmax(logits)
    predictions = p.argmax(1)
    lesions = np.random.default_rng(2).integers(0, 400, len(labels))
    weights = resample_weights(lesions, 4, seed=3)
    # A lesion is drawn whole: all its images share one weight.
    assert all(len(set(weights[0][lesions == g])) == 1 for g in np.unique(lesions))
    values = weighted_metrics(labels, p, weights, MEL)
    for r, w in enumerate(weights):
        assert values["balanced_accuracy"][r] == pytest.approx(
            metrics.balanced_accuracy_score(labels, predictions, sample_weight=w))
        assert values["macro_f1"][r] == pytest.approx(
            metrics.f1_score(labels, predictions, average="macro", sample_weight=w))
        assert values["macro_auc"][r] == pytest.approx(np.mean(
            [metrics.roc_auc_score(labels == c, p[:, c], sample_weight=w) for c in range(K)]))
        assert values["melanoma_sensitivity"][r] == pytest.approx(
            metrics.recall_score(labels == MEL, predictions == MEL, sample_weight=w))


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (300, 3000):
        labels, logits = case(n=n, seed=4)
        p = softmax(logits)
        point = classification_metrics(labels, p, list(CLASSES))
        result = intervals(labels, p, list(CLASSES), np.arange(n) // 2, BootstrapSettings(400, seed=0))
        for key, (low, high) in result["intervals"].items():
            assert low <= point[key] <= high, key
        low, high = result["intervals"]["balanced_accuracy"]
        widths.append(high - low)
        assert result["bootstrap"] == {"resamples": 400, "seed": 0, "confidence": 0.95, "method": "percentile",
                                       "units": n // 2}
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(10) in theory
    with pytest.raises(LesionkitError, match="at least 10"):
        BootstrapSettings(resamples=3)


def test_temperature_scaling_fixes_an_over_confident_model():
    labels, logits = case(n=2000, seed=5, sharpen=4.0)
    val, test = slice(0, 1000), slice(1000, None)
    temperature = fit_temperature(logits[val], labels[val])
    # With unit Gaussian noise and the true class shifted by 1.5, the true posterior is softmax(1.5 x): the
    # 4x sharpened scores 4 x need T = 4 / 1.5 = 2.67.
    assert 2.2 < temperature < 3.2
    before = expected_calibration_error(labels[test], softmax(logits[test]))
    after = expected_calibration_error(labels[test], softmax(logits[test], temperature))
    assert after < 0.5 * before
    scaled, plain = softmax(logits[test], temperature), softmax(logits[test])
    assert brier_score(labels[test], scaled) < brier_score(labels[test], plain)
    np.testing.assert_array_equal(softmax(logits, temperature).argmax(1), logits.argmax(1))


def test_labels_in_either_format(tmp_path):
    isic = tmp_path / "isic.csv"
    isic.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
                    "ISIC_2,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n")
    frame, kind = read_labels(isic)
    assert list(frame["dx"]) == ["mel", "vasc"] and list(frame["image_id"]) == ["ISIC_1", "ISIC_2"] and "ISIC" in kind
    ham = tmp_path / "ham.csv"
    ham.write_text("image_id,dx,age,sex\nISIC_1,bcc,55,female\n")
    frame, kind = read_labels(ham)
    assert frame.loc[0, "dx"] == "bcc" and frame.loc[0, "age"] == 55 and "HAM10000" in kind
    bad = tmp_path / "bad.csv"
    bad.write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,1,0,0,0,0,0\n")
    with pytest.raises(LesionkitError, match="row\\(s\\) 2 do not mark exactly one class"):
        read_labels(bad)
    (tmp_path / "other.csv").write_text("file,label\na,b\n")
    with pytest.raises(LesionkitError, match="ISIC 2018 Task 3"):
        read_labels(tmp_path / "other.csv")


def test_subgroups_count_and_mark_small_groups():
    labels, logits = case(n=300, seed=6)
    sex = np.where(np.arange(300) < 280, "female", "male")
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(300)], "lesion_id": [f"l{i // 2}" for i in range(300)],
                          "sex": sex, "age": np.where(np.arange(300) % 3 == 0, np.nan, 50.0), "localization": "back"})
    groups = subgroup_metrics(frame, labels, softmax(logits), list(CLASSES))
    female, male = groups["sex"]["female"], groups["sex"]["male"]
    assert female["images"] == 280 and male["images"] == 20 and female["lesions"] == 140
    assert female["judged"] and not male["judged"] and str(MIN_IMAGES) in male["status"]
    assert female["balanced_accuracy"] == pytest.approx(metrics.balanced_accuracy_score(
        labels[:280], logits[:280].argmax(1)))
    assert list(groups["age_band"]) == ["45-59", "unknown"] and groups["age_band"]["unknown"]["images"] == 100


def provenance(run, *sessions: dict) -> None:
    first, *resumed = [{"hardware": hardware} for hardware in sessions]
    (run / "provenance.json").write_text(json.dumps({**first, **({"resumed": resumed} if resumed else {})}))


def test_compare_names_the_hardware_each_model_trained_on_and_warns_when_it_differs(tmp_path):
    xeon, epyc = ({"processor": f"{name}, 2 cores, AVX512", "gpus": []} for name in ("Xeon", "EPYC"))
    h200 = {"processor": "EPYC, 16 cores, AVX512", "gpus": ["NVIDIA H200"]}
    labels, logits = case()
    runs = {name: tmp_path / name for name in ("base", "arm", "moved", "ensemble", "gpu")}
    for run in runs.values():
        run.mkdir()
        (run / "report.json").write_text(json.dumps(build_report(labels, softmax(logits), list(CLASSES)).to_dict()))
    provenance(runs["base"], xeon)
    provenance(runs["arm"], xeon)
    (runs["arm"] / "evaluate-val").mkdir()  # an evaluation folder inside the run reads the run's provenance
    (runs["arm"] / "evaluate-val" / "report.json").write_text((runs["arm"] / "report.json").read_text())
    provenance(runs["moved"], xeon, epyc)  # resumed on another machine
    for fold in ("fold-1", "fold-2"):
        (runs["ensemble"] / fold).mkdir()
        provenance(runs["ensemble"] / fold, xeon)
    provenance(runs["gpu"], h200)
    same = comparison_table([runs["base"], runs["arm"] / "evaluate-val", runs["ensemble"]])
    assert list(same["trained on"]) == [xeon["processor"]] * 3 and hardware_note(same) is None
    mixed = comparison_table([runs["base"], runs["moved"], runs["gpu"]])
    assert list(mixed["trained on"]) == [xeon["processor"], f"{xeon['processor']} / {epyc['processor']}",
                                         "1x NVIDIA H200"]
    assert "3 different machines" in hardware_note(mixed) and "compare runs trained on one machine" in \
        hardware_note(mixed)


def test_compare_puts_reports_side_by_side(tmp_path):
    for name, value in (("a", 0.61), ("b", 0.55)):
        (tmp_path / name).mkdir()
        labels, logits = case()
        report = build_report(labels, softmax(logits), list(CLASSES))
        report.balanced_accuracy, report.intervals = value, {"balanced_accuracy": [value - 0.05, value + 0.04]}
        report.bootstrap, report.ece = {"resamples": 1000}, {"before": 0.1, "after": 0.03}
        report.settings = {"tta": name == "b", "temperature": 1.5}
        (tmp_path / name / "report.json").write_text(json.dumps(report.to_dict()))
    table = comparison_table([tmp_path / "a", tmp_path / "b" / "report.json"])
    assert list(table["balanced accuracy"]) == ["61.0% [56.0, 65.0]", "55.0% [50.0, 59.0]"]
    assert list(table["TTA"]) == ["no", "yes"] and list(table["ECE"]) == ["3.0%", "3.0%"]
    assert list(table["trained on"]) == ["unknown", "unknown"] and hardware_note(table) is None
    with pytest.raises(LesionkitError, match="neither a report.json"):
        comparison_table([tmp_path / "none"])
    (tmp_path / "partial.json").write_text(json.dumps({"balanced_accuracy": 0.5}))
    with pytest.raises(LesionkitError, match="partial.json is not a lesionkit report"):
        comparison_table([tmp_path / "partial.json"])
