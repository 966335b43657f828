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


def test_lesion_level_averages_each_lesions_images_before_it_answers():
    from lesionkit.evaluate.report import lesion_level

    def row(**p):
        out = np.full(len(CLASSES), 0.0)
        for name, value in p.items():
            out[CLASSES.index(name)] = value
        return out

    # Lesion A (nv): one image right, one confidently wrong: averaged, mel wins. Lesion B (mel): right twice.
    # Lesion C (bkl): one image, right.
    probabilities = np.stack([row(nv=0.6, mel=0.4), row(nv=0.1, mel=0.9), row(mel=0.8, nv=0.2),
                              row(mel=0.7, nv=0.3), row(bkl=0.9, nv=0.1)])
    labels = np.array([CLASSES.index(c) for c in ("nv", "nv", "mel", "mel", "bkl")])
    lesions = np.array(["A", "A", "B", "B", "C"])
    measured = lesion_level(labels, probabilities, lesions, CLASSES)
    assert measured["lesions"] == 3
    assert measured["recall"]["nv"] == 0.0 and measured["recall"]["mel"] == 1.0 and measured["recall"]["bkl"] == 1.0
    assert measured["accuracy"] == pytest.approx(2 / 3) and measured["melanoma_sensitivity"] == 1.0
    image_level = build_report(labels, probabilities, CLASSES)
    assert image_level.per_class["nv"]["recall"] == 0.5  # the image level sees one of A's two images right
    image_level.lesion_level = measured
    markdown = render_markdown(image_level, "t")
    assert "## Lesion level" in markdown and "(3 lesions, 5 images)" in markdown
