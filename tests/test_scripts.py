"""The scripts whose output docs/accuracy.md quotes, on synthetic predictions whose answers are computed here:
``melanoma_operating_point.py`` (weights before the argmax, fitted out of fold) and ``average_runs.py``."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import REPO
from sklearn.metrics import balanced_accuracy_score

from lesionkit import CLASSES

COLUMNS = [f"p_{c}" for c in CLASSES]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def predictions(rng: np.random.Generator, n: int, shy: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labels over the classes and probabilities that favour the true class, all but class ``shy``'s
    shifted up by 1.5 in logits: a weight of about e^1.5 on ``shy`` undoes the shift."""
    labels = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), labels] += 2.5
    logits[:, shy] -= 1.5
    probabilities = np.exp(logits)
    return labels, probabilities / probabilities.sum(axis=1, keepdims=True)


def balanced(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return balanced_accuracy_score(labels, probabilities.argmax(axis=1))


def test_weights_fitted_for_balanced_accuracy_raise_the_class_the_argmax_misses():
    labels, probabilities = predictions(np.random.default_rng(0), 1400, CLASSES.index("df"))
    weights = script("melanoma_operating_point").balanced_weights(probabilities, labels)
    assert weights.shape == (len(CLASSES),) and np.log(weights).mean() == pytest.approx(0, abs=1e-9)
    shy = CLASSES.index("df")
    assert np.log(weights[shy]) - np.delete(np.log(weights), shy).mean() == pytest.approx(1.5, abs=0.4)
    assert balanced(labels, probabilities * weights) > balanced(labels, probabilities) + 0.05


def test_the_melanoma_weight_is_fitted_on_the_other_folds_and_reaches_its_target(tmp_path):
    rng = np.random.default_rng(1)
    labels, probabilities = predictions(rng, 2500, CLASSES.index("mel"))
    oof = pd.DataFrame(probabilities, columns=COLUMNS)
    oof.insert(0, "image_id", [f"ISIC_{i:07d}" for i in range(len(oof))])
    oof.insert(1, "lesion_id", [f"HAM_{i // 2:07d}" for i in range(len(oof))])
    oof.insert(2, "dx", [CLASSES[i] for i in labels])
    oof.insert(3, "fold", 1 + np.arange(len(oof)) % 5)
    oof.insert(4, "prediction", [CLASSES[i] for i in probabilities.argmax(axis=1)])
    oof.to_csv(tmp_path / "oof.csv", index=False)

    done = run_script("melanoma_operating_point", str(tmp_path), "--targets", "0.75", "--every-class")
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    figure = r"(\d+\.\d+)% \("
    argmax = re.findall(figure, rows["argmax"])
    assert float(argmax[0]) == pytest.approx(100 * balanced(labels, probabilities), abs=0.006)
    assert float(argmax[1]) < 60, "the synthetic melanomas are mostly missed at the argmax"
    weighted = re.findall(figure, rows["melanoma sensitivity 75%"])
    assert 72 <= float(weighted[1]) <= 80, "fitted on four folds for 75%, near it on the fifth"
    assert float(re.findall(figure, rows["balanced accuracy, a weight per class"])[0]) > float(argmax[0])

    assert run_script("melanoma_operating_point", str(tmp_path), "--test").returncode == 2  # no test predictions
    missing = run_script("melanoma_operating_point", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "oof.csv does not exist" in missing.stderr


def test_averaging_runs_scores_the_mean_of_their_probabilities(tmp_path):
    rng = np.random.default_rng(2)
    labels, _ = predictions(rng, 300, CLASSES.index("mel"))
    ids = [f"ISIC_{i:07d}" for i in range(len(labels))]
    runs, each = [tmp_path / "a", tmp_path / "b"], []
    for run in runs:
        _, probabilities = predictions(rng, len(labels), CLASSES.index("mel"))
        run.mkdir()
        table = pd.DataFrame(probabilities, columns=COLUMNS)
        table.insert(0, "image_id", ids)
        table.insert(1, "dx", [CLASSES[i] for i in labels])
        table.insert(2, "prediction", [CLASSES[i] for i in probabilities.argmax(axis=1)])
        table.sample(frac=1, random_state=0).to_csv(run / "predictions.csv", index=False)  # another order
        pd.DataFrame({"image_id": ids, "lesion_id": [f"HAM_{i:07d}" for i in range(len(ids))],
                      "split": "val"}).to_csv(run / "split.csv", index=False)
        each.append(probabilities)

    done = run_script("average_runs", *map(str, runs))
    assert done.returncode == 0, done.stderr
    mean = next(line for line in done.stdout.splitlines() if line.startswith("| mean of the 2"))
    assert float(re.search(r"(\d+\.\d+)% \(", mean)[1]) == pytest.approx(
        100 * balanced(labels, (each[0] + each[1]) / 2), abs=0.006)

    pd.read_csv(runs[1] / "predictions.csv").iloc[1:].to_csv(runs[1] / "predictions.csv", index=False)
    other = run_script("average_runs", *map(str, runs))
    assert other.returncode == 2 and "validated on other images" in other.stderr
