"""The evaluation end to end on a smoke run: external labels, temperature, TTA, pictures, HTML, compare."""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers import REPO, assert_no_lesion_leak, make_ham_folder, write_image
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
    data, run = smoke_run
    assert_no_lesion_leak(run / "split.csv", data / "HAM10000_metadata.csv")
    entry = json.loads((run / "checkpoints" / "temperature.json").read_text())["best.ckpt"]
    assert entry["temperature"] > 0 and entry["nll_after"] <= entry["nll_before"] + 1e-9
    report = json.loads((run / "report.json").read_text())
    assert report["calibration"]["fitted_here"] and report["ece"]["after"] is not None
    for name in ("training_curves.png", "report.html", *PICTURES):
        assert (run / name).is_file(), name
    assert report["data"]["training_run_split"]["val"]["mel"] == report["per_class"]["mel"]["support"]
    # The run's lesions are known, so the report gives the lesion level beside the image level.
    lesions = pd.read_csv(run / "split.csv").query("split == 'val'")["lesion_id"].nunique()
    assert report["lesion_level"]["lesions"] == lesions and 0 <= report["lesion_level"]["balanced_accuracy"] <= 1
    assert "## Lesion level" in (run / "report.md").read_text()


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
    gallery = sum(len(kinds) for kinds in report["gallery"]["images"].values())  # Grad-CAM maps, embedded too
    assert gallery >= 1 and html.count("data:image/png;base64,") == 5 + gallery
    assert 'src="confusion_matrix.png"' not in html


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


# Appended to a copy of report.html: once the page and its pictures have loaded, it writes into the page what
# Chromium made of it, for --dump-dom to hand back.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const probe = document.createElement("pre");
  probe.id = "lesionkit-probe";
  probe.textContent = JSON.stringify({
    title: document.title, heading: (document.querySelector("h1") || {}).textContent || null,
    images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    widths: images.map(i => i.naturalWidth)});
  document.body.appendChild(probe);
});
</script>
"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"Chromium exited with {result.returncode}: {result.stderr[-2000:]}"
    return result


def test_report_html_renders_in_headless_chromium(smoke_run, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make test` installs it with apt-get when run as root")
    _, run = smoke_run
    page = (run / "report.html").read_text()
    expected = page.count("<img ")
    gallery = json.loads((run / "report.json").read_text())["gallery"]["images"]
    maps = sum(len(kinds) for kinds in gallery.values())
    assert maps >= 1 and expected == len(PICTURES) + 1 + maps, "the pictures, training curves and maps, embedded"
    probe = tmp_path / "report.html"  # a copy: the run's own file stays as written
    assert page.count("</body>") == 1
    probe.write_text(page.replace("</body>", PROBE + "</body>"))

    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="lesionkit-probe">(.*?)</pre>', dom, re.S)
    assert found, f"the page never finished loading, or is not the report: {dom[:2000]}"
    seen = json.loads(html.unescape(found.group(1)))
    title = "val part of run"  # the run's report: its validation part (lesionkit.train.loop.report_parts)
    assert seen["title"] == title and seen["heading"] == title, seen
    assert seen["images"] == expected and seen["decoded"] == expected, f"pictures that did not decode: {seen}"
    assert all(width >= 100 for width in seen["widths"]), seen

    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", probe.as_uri())
    assert shot.is_file()
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
