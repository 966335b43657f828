import numpy as np
import pytest
from sklearn import metrics

from lesionkit import CLASSES
from lesionkit.evaluate.render import render_markdown
from lesionkit.evaluate.report import build_report


def fixed_case():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300)
    logits = rng.normal(size=(300, 7))
    logits[np.arange(300), labels] += 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probabilities


def test_metrics_match_scikit_learn():
    labels, probabilities = fixed_case()
    predictions = probabilities.argmax(1)
    report = build_report(labels, probabilities, list(CLASSES))
    assert report.balanced_accuracy == pytest.approx(metrics.balanced_accuracy_score(labels, predictions))
    assert report.accuracy == pytest.approx(metrics.accuracy_score(labels, predictions))
    assert report.macro_f1 == pytest.approx(metrics.f1_score(labels, predictions, average="macro"))
    assert report.macro_auc == pytest.approx(metrics.roc_auc_score(labels, probabilities, multi_class="ovr"))
    mel = CLASSES.index("mel")
    assert report.melanoma_sensitivity == pytest.approx(metrics.recall_score(labels == mel, predictions == mel))
    assert report.per_class["nv"]["support"] == int((labels == CLASSES.index("nv")).sum())
    assert np.array(report.confusion_matrix["matrix"]).sum() == 300
    assert "| mel |" in render_markdown(report, "t")


def test_always_nv_scores_one_seventh_balanced_accuracy():
    labels = np.array([5] * 67 + list(range(7)) * 4 + [0] * 5)
    probabilities = np.tile(np.eye(7)[5], (len(labels), 1))
    report = build_report(labels, probabilities, list(CLASSES))
    assert report.balanced_accuracy == pytest.approx(1 / 7)
    assert report.accuracy > 0.67


def test_absent_class_has_no_auc():
    labels, probabilities = fixed_case()
    keep = labels != 3
    report = build_report(labels[keep], probabilities[keep], list(CLASSES))
    assert report.per_class["df"]["auc"] is None and report.per_class["df"]["support"] == 0
    assert report.macro_auc is not None
