"""Split conformal APS keeps its promise: checked on held-out halves of synthetic probabilities, not only on the
images it was calibrated on."""

import math

import numpy as np
import pytest

from lesionkit import LesionkitError
from lesionkit.evaluate.conformal import aps_scores, conformal_threshold, coverage_report, prediction_sets


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of 7 classes and labels drawn from *flatter* ones: a miscalibrated model, which conformal
    prediction must cover all the same."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (n, 7))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = np.exp(logits / 2) / np.exp(logits / 2).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(7, p=p) for p in truth])
    return probabilities, labels


def covered(probabilities: np.ndarray, labels: np.ndarray, scores: np.ndarray, coverage: float) -> np.ndarray:
    members = prediction_sets(probabilities, conformal_threshold(scores, coverage))
    return members[np.arange(len(labels)), labels]


def test_the_score_is_the_mass_ranked_above_the_true_class_and_sets_keep_the_top_class():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert aps_scores(probabilities, np.array([1, 2])).tolist() == pytest.approx([0.5, 0.6])
    assert aps_scores(probabilities, np.array([0, 1])).tolist() == [0, 0]  # right answers score 0, exactly
    # Down to and including the class whose mass crosses the threshold.
    assert prediction_sets(probabilities, 0.55).tolist() == [[True, True, False], [False, True, False]]
    assert prediction_sets(probabilities, 0.0).tolist() == [[True, False, False], [False, True, False]]


def test_coverage_on_a_held_out_half_keeps_the_finite_sample_bound():
    """Calibrated on one half, checked on the other: 1 - alpha <= coverage <= 1 - alpha + 1/(n + 1) in
    expectation (Romano et al. 2020), averaged over 200 random halvings (standard error about 0.0007), and each
    halving within the spread of its two finite halves."""
    probabilities, labels = synthetic(2000, seed=0)
    rng, n, coverages = np.random.default_rng(1), 1000, []
    for _ in range(200):
        order = rng.permutation(len(labels))
        calibrate, check = order[:n], order[n:]
        scores = aps_scores(probabilities[calibrate], labels[calibrate])
        coverages.append(covered(probabilities[check], labels[check], scores, 0.9).mean())
        # Conditional on its calibration half a halving's coverage is Beta-distributed around 0.9 (sd 0.0095),
        # and 1,000 checked images add as much: 4 sd is about 0.054.
        assert abs(coverages[-1] - 0.9) < 4 * math.sqrt(0.9 * 0.1 * (1 / n + 1 / n))
    error = 3 * np.std(coverages) / math.sqrt(len(coverages))
    assert 0.9 - error <= np.mean(coverages) <= 0.9 + 1 / (n + 1) + error


def test_on_the_calibration_images_themselves_coverage_is_within_a_point():
    probabilities, labels = synthetic(2003, seed=2)
    scores = aps_scores(probabilities, labels)
    report = coverage_report(probabilities, labels, scores, [f"c{i}" for i in range(7)], 0.9)
    assert 0.9 <= report["coverage"] <= 0.91
    assert report["calibration_scores"] == 2003 and sum(c["images"] for c in report["per_class"].values()) == 2003


def test_sets_grow_with_the_coverage_asked():
    probabilities, labels = synthetic(1000, seed=3)
    scores = aps_scores(probabilities, labels)
    sizes = [prediction_sets(probabilities, conformal_threshold(scores, c)).sum(axis=1) for c in
             (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
    for smaller, larger in zip(sizes, sizes[1:]):
        assert (smaller <= larger).all()  # each image's set, not only the mean
    means = [s.mean() for s in sizes]
    assert means == sorted(means) and means[-1] > means[0] + 1


@pytest.mark.parametrize("coverage, message", [(1.5, "between 0 and 1"), (0.0, "between 0 and 1"),
                                               (0.999, "at least 999 validation scores")])
def test_a_coverage_that_cannot_be_given_says_how_high_it_may_go(coverage, message):
    with pytest.raises(LesionkitError, match=message):
        conformal_threshold(np.linspace(0, 1, 100), coverage)
    assert conformal_threshold(np.linspace(0, 1, 100), 100 / 101) == 1.0  # the largest of 100 scores
