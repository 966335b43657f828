"""The evaluation end to end on a smoke run: external labels, temperature, TTA, pictures, HTML, compare."""

import json
import os
import shutil
import subprocess

import pandas as pd
import pytest
from PIL import Image

from helpers import REPO, make_ham_folder, write_image
from lesionkit import CLASSES
from lesionkit.cli import main
from lesionkit.data.labels import ISIC2018_COLUMNS

SMOKE = str(REPO / "configs" / "smoke.yaml")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PICTURES = ("confusion_matrix.png", "roc_curves.png", "pr_curves.png", "reliability.png")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    data = make_ham_folder(root / "ham", lesions_per_class=4)
    run = root / "run"
    assert main(["train", "--config", SMOKE, "--data-dir", str(data), "--out", str(run)]) == 0
    return data, run


@pytest.fixture(scope="module")
def external_set(smoke_run, tmp_path_factory):
    """A folder of the val images with ISIC 2018 one-hot labels, one labelled id without an image and one
    image without a label."""
    data, run = smoke_run
    folder = tmp_path_factory.mktemp("external")
    val = pd.read_csv(run / "split.csv").query("split == 'val'")
    for image_id in val["image_id"]:
        shutil.copy(next(data.rglob(f"{image_id}.jpg")), folder / f"{image_id}.jpg")
    write_image(folder / "ISIC_9999999.jpg", seed=3)  # nobody labelled it
    rows = [{"image": i, **{c: float(c.lower() == dx) for c in ISIC2018_COLUMNS}}
            for i, dx in zip(val["image_id"], val["dx"], strict=True)]
    rows.append({"image": "ISIC_8888888", **{c: float(c == "NV") for c in ISIC2018_COLUMNS}})  # no image file
    labels = folder.parent / "ISIC2018_Task3_Test_GroundTruth.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return folder, labels, len(val)


def test_training_fits_the_temperature_and_draws_the_curves(smoke_run):
    _, run = smoke_run
    entry = json.loads((run / "checkpoints" / "temperature.json").read_text())["best.ckpt"]
    assert entry["temperature"] > 0 and entry["nll_after"] <= entry["nll_before"] + 1e-9
    report = json.loads((run / "report.json").read_text())
    assert report["calibration"]["fitted_here"] and report["ece"]["after"] is not None
    for name in ("training_curves.png", "report.html", *PICTURES):
        assert (run / name).is_file(), name
    assert report["data"]["training_run_split"]["val"]["mel"] == report["per_class"]["mel"]["support"]


def test_evaluate_an_external_isic_2018_folder(external_set, smoke_run, tmp_path, capsys):
    folder, labels, n = external_set
    _, run = smoke_run
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    argv = ["evaluate", "--checkpoint", checkpoint, "--images", str(folder), "--labels", str(labels),
            "--out", str(tmp_path / "ext")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "ISIC_8888888" in err and "--allow-missing" in err

    assert main(argv + ["--allow-missing", "--bootstrap", "200"]) == 0
    captured = capsys.readouterr()
    assert "ISIC_9999999" in captured.err and "balanced accuracy" in captured.out
    out = tmp_path / "ext"
    for name in ("report.json", "report.md", "report.html", "predictions.csv", "training_curves.png", *PICTURES):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == n and report["data"]["label_format"].startswith("ISIC 2018")
    assert report["skipped_images"] == ["ISIC_8888888"] and report["unlabelled_images"] == ["ISIC_9999999"]
    low, high = report["intervals"]["balanced_accuracy"]
    assert low <= report["balanced_accuracy"] <= high
    assert report["bootstrap"]["resamples"] == 200 and report["bootstrap"]["unit"] == "image"
    assert report["ece"]["before"] >= 0 and report["ece"]["after"] >= 0 and report["calibration"]["temperature"] > 0
    assert {"sensitivity", "specificity", "average_precision"} <= set(report["per_class"]["mel"])
    assert set(report["melanoma_operating_points"]["sensitivity_at_specificity"]) == {"0.80", "0.90"}
    markdown = (out / "report.md").read_text()
    assert "ISIC_8888888" in markdown and "ISIC_9999999" in markdown and "![Reliability diagram]" in markdown
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and 'src="confusion_matrix.png"' not in html


def test_tta_and_fitting_the_temperature_on_validation_only(smoke_run, tmp_path, capsys):
    data, run = smoke_run
    base = ["evaluate", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--data-dir", str(data),
            "--split-file", str(run / "split.csv")]
    assert main(base + ["--split", "test", "--fit-temperature"]) == 1
    assert "validation images only" in capsys.readouterr().err
    assert main(base + ["--split", "val", "--tta", "--fit-temperature", "--out", str(tmp_path / "tta")]) == 0
    report = json.loads((tmp_path / "tta" / "report.json").read_text())
    assert report["settings"]["tta"] and len(report["settings"]["tta_views"]) == 8
    assert report["bootstrap"]["unit"] == "lesion" and "sex" in report["subgroups"]
    assert report["subgroups"]["sex"]["male"]["images"] == report["n_images"]
    assert "Temperature" in capsys.readouterr().out

    image = next(data.rglob("*.jpg"))
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--tta", "--format", "json",
                 str(image)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)

    assert main(["compare", str(run), str(tmp_path / "tta"), "--out", str(tmp_path / "cmp.csv")]) == 0
    table = pd.read_csv(tmp_path / "cmp.csv")
    assert list(table["TTA"]) == ["no", "yes"] and "[" in table["balanced accuracy"][0]


def test_report_html_renders_in_headless_chromium(smoke_run, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs it with apt-get when run as root")
    _, run = smoke_run
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
         (run / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        colours = image.convert("RGB").resize((300, 600)).getcolors(maxcolors=1 << 16)
    # A blank page has one colour; text, tables and the embedded plots give hundreds.
    assert colours is not None and len(colours) > 50


def test_help_for_every_new_flag(capsys):
    # In process: test_cli.py already runs the console script; each subprocess costs ~10 s of imports here.
    for command, flags in (("evaluate", ("--images", "--labels", "--tta", "--fit-temperature", "--bootstrap")),
                           ("predict", ("--tta",)), ("compare", ("--out", "RUN_OR_REPORT"))):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and out.startswith(f"usage: lesionkit {command}")
        assert all(flag in out for flag in flags), out


def test_data_section_counts_a_class_missing_from_a_part_as_zero(tmp_path):
    """A small run can leave a class out of validation; its report still counts every part."""
    from lesionkit.evaluate.evaluation import describe_images

    (tmp_path / "checkpoints").mkdir()
    pd.DataFrame({"image_id": ["a", "b", "c"], "lesion_id": ["l1", "l2", "l3"], "dx": ["nv", "mel", "nv"],
                  "split": ["train", "train", "val"]}).to_csv(tmp_path / "split.csv", index=False)
    frame = pd.DataFrame({"dx": ["nv"], "path": [str(write_image(tmp_path / "c.jpg", seed=1))]})
    data = describe_images(frame, list(CLASSES), tmp_path)
    assert data["training_run_split"]["val"]["mel"] == 0 and data["training_run_split"]["val"]["nv"] == 1
    assert data["training_run_split"]["train"]["mel"] == 1 and data["images_per_class"]["evaluated"]["nv"] == 1
