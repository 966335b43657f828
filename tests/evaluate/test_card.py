"""The model card says what the run folder holds, and only that."""

from __future__ import annotations

import shutil

import pytest
from helpers import REPO

from lesionkit.cli import main

SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, real_data):
    run = tmp_path_factory.mktemp("card") / "run"
    assert main(["train", "--config", SMOKE, "--data-dir", str(real_data), "--out", str(run), "--allow-missing",
                 "--set", "split.test_fraction=0.2"]) == 0
    return run


def test_card_of_a_real_run_has_every_section_and_the_runs_figures(smoke_run, capsys):
    import json

    assert main(["card", str(smoke_run)]) == 0
    card = (smoke_run / "MODEL_CARD.md").read_text()
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Training and evaluation data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"):
        assert f"## {section}" in card
    assert "not a medical device" in card and "CC BY-NC 4.0" in card and "dermoscopy" in card.lower()
    assert "histopathology" in card, "dx_type from the metadata the run recorded"
    assert "grouped by `lesion_id`" in card
    provenance = json.loads((smoke_run / "provenance.json").read_text())
    assert f"trained on {provenance['hardware']['processor']}." in card
    report = json.loads((smoke_run / "report.json").read_text())
    assert f"{100 * report['balanced_accuracy']:.1f}%" in card, "the validation figure, as measured"
    test = json.loads((smoke_run / "test" / "report.json").read_text())
    assert f"{100 * test['balanced_accuracy']:.1f}%" in card and "measured once" in card
    assert "By sex" in card and "By age band" in card
    # Training fitted the record, so the card gives how its safeguards fared, in the report's own figures.
    sets = report["conformal"]
    assert f"{100 * sets['coverage']:.1f}% of these images with {sets['mean_set_size']:.2f} classes" in card
    assert f"{100 * report['out_of_distribution']['validation_flagged']:.1f}% of validation images flagged" in card
    assert f"p(mel) >= {report['referral']['threshold']:.4f}" in card and "not fitted" not in card


def test_card_refuses_a_folder_without_a_report(tmp_path, smoke_run, capsys):
    assert main(["card", str(tmp_path)]) == 1
    assert "holds no report.json" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(smoke_run, partial, ignore=shutil.ignore_patterns("provenance.json", "split.csv", "test"))
    assert main(["card", str(partial), "--out", str(tmp_path / "card.md")]) == 0
    card = (tmp_path / "card.md").read_text()
    assert "No held-out test part was measured" in card and "`dx_type` counts are not given" in card
