"""Grad-CAM explanations: the map follows a lesion the network learnt to see, each class gets its own map, the
network is left as it was, the target layer is found on two architectures, ``lesionkit explain`` end to end, and
the report's gallery."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

from helpers import fake_checkpoint, write_image
from lesionkit import CLASSES, LesionkitError
from lesionkit.cli import main
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.evaluate.evaluation import EvalSettings, Images, evaluate_frame
from lesionkit.evaluate.gallery import write_gallery
from lesionkit.evaluate.render import render_markdown
from lesionkit.serve.classifier import softmax
from lesionkit.serve.explain import explain, target_layer
from lesionkit.serve.torch_classifier import TorchClassifier

SIZE = (120, 160)  # the network's input: maps of 4x5 cells at test_efficientnet's reduction of 32


def lesion(rng: np.random.Generator, blob: bool = True, centre: tuple[float, float] | None = None) -> Image.Image:
    """A 240x320 light skin-coloured picture, with a dark round blob at ``centre`` (default: anywhere but the
    rim)."""
    height, width = 240, 320
    pixels = np.array([225, 180, 160], np.float32) + rng.normal(0, 8, (height, width, 3))
    if blob:
        cy, cx = centre or (rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width)
        radius = rng.uniform(0.12, 0.2) * height
        yy, xx = np.mgrid[:height, :width]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        pixels[inside] = np.array([80, 50, 40]) + rng.normal(0, 8, (inside.sum(), 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def blob_classifier() -> TorchClassifier:
    """test_efficientnet fine-tuned to tell a blob from clear skin, blobs anywhere, so that it must find the blob:
    30 steps of 16 images, 5 to 15 s on two cores. An untrained network's map means little, so this one can fail."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = timm.create_model("test_efficientnet", num_classes=2).to(memory_format=torch.channels_last)
    classifier = TorchClassifier(model, Preprocessing(*SIZE, (0.5,) * 3, (0.5,) * 3),
                                 {"model_name": "test_efficientnet", "classes": ["blob", "clear"]})
    classifier.temperature = 2.0  # as if fitted: the probabilities explained must be the calibrated ones
    images = np.stack([classifier.transform(lesion(rng, blob=i % 2 == 0)) for i in range(64)])
    x, y = torch.from_numpy(images).contiguous(memory_format=torch.channels_last), torch.arange(64) % 2
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small gains nothing from threads, and 2 shared cores lose a lot
    try:
        # BatchNorm stays in eval mode, as in the fine-tuning recipe: statistics of 30 batches of a random
        # network would not be those the single explained image meets.
        model.eval()
        for _ in range(30):
            batch = torch.from_numpy(rng.choice(64, 16, replace=False))
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return classifier


def inside_over_outside(heatmap: np.ndarray, rows: slice, cols: slice) -> float:
    """Mean heat inside the box over mean heat outside it."""
    inside = np.zeros(heatmap.shape, bool)
    inside[rows, cols] = True
    return heatmap[inside].mean() / max(heatmap[~inside].mean(), 1e-6)


MIDDLE = (slice(SIZE[0] // 4, 3 * SIZE[0] // 4), slice(SIZE[1] // 4, 3 * SIZE[1] // 4))  # half of each side
TOP_LEFT = (slice(0, SIZE[0] // 2), slice(0, SIZE[1] // 2))


@pytest.mark.parametrize("method, centre, box", [("gradcam", (120, 160), MIDDLE), ("gradcam++", (120, 160), MIDDLE),
                                                 ("gradcam", (70, 90), TOP_LEFT)])
def test_the_map_follows_the_lesion(blob_classifier, method, centre, box):
    explanation = explain(blob_classifier, lesion(np.random.default_rng(99), centre=centre), method, "blob")
    assert explanation.probability > 0.9, "the fine-tuned network should see the blob"
    ratio = inside_over_outside(explanation.heatmap, *box)
    assert ratio > 2, f"{method}: the heat around the blob is only {ratio:.2f}x that of the skin around it"


def test_a_map_is_at_the_input_size_and_leaves_the_network_as_it_was(blob_classifier):
    model = blob_classifier.model
    model.conv_stem.weight.requires_grad_(False)  # a mix of frozen and trainable parameters, restored as found
    flags = [p.requires_grad for p in model.parameters()]
    image = lesion(np.random.default_rng(1))
    try:
        with torch.inference_mode():  # as a server might call it
            explanation = explain(blob_classifier, image)
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.conv_stem.weight.requires_grad_(True)
    assert all(p.grad is None for p in model.parameters())
    assert model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last) and not model.training
    logits = blob_classifier.logits(blob_classifier.transform(image)[None])[0]  # serves on right after
    probabilities = softmax(logits, blob_classifier.temperature)
    assert explanation.class_name == blob_classifier.classes[int(logits.argmax())]  # the prediction by default
    assert explanation.probability == pytest.approx(probabilities.max(), abs=1e-5)  # calibrated, at T = 2
    assert explanation.heatmap.shape == SIZE and explanation.heatmap.dtype == np.float32
    assert 0 <= explanation.heatmap.min() and explanation.heatmap.max() <= 1
    assert explanation.overlay.shape == explanation.framed.shape == (*SIZE, 3)
    assert explanation.overlay.dtype == np.uint8 and explanation.layer == "blocks.4"
    assert np.isfinite(explanation.faithfulness) and "1 - map" in explanation.faithfulness_metric


def test_another_class_gets_another_map(blob_classifier):
    image = lesion(np.random.default_rng(2), centre=(120, 160))
    blob, clear = (explain(blob_classifier, image, "gradcam", name) for name in ("blob", "clear"))
    assert (blob.class_name, clear.class_name) == ("blob", "clear")
    assert blob.probability + clear.probability == pytest.approx(1)
    assert not np.allclose(blob.heatmap, clear.heatmap, atol=0.05)
    # EigenCAM needs no class: the same map for either.
    np.testing.assert_allclose(*(explain(blob_classifier, image, "eigencam", n).heatmap for n in ("blob", "clear")))
    with pytest.raises(LesionkitError, match="blob, clear"):
        explain(blob_classifier, image, "gradcam", "mel")
    with pytest.raises(LesionkitError, match="gradcam, gradcam\\+\\+, eigencam"):
        explain(blob_classifier, image, "scorecam")


@pytest.mark.parametrize("name, layer, fallback", [("tf_efficientnet_lite1", "blocks.6", "bn2"),
                                                   ("resnet18", "layer4", "layer4")])
def test_target_layer_is_the_last_feature_stage(name, layer, fallback):
    model = timm.create_model(name, pretrained=False, num_classes=7).eval()
    assert target_layer(model) == layer
    seen = []
    model.get_submodule(layer).register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 96))
    assert seen == [(1, model.feature_info[-1]["num_chs"], 2, 3)], "a map at 1/32 of the input"
    del model.feature_info  # a model without timm's feature_info: the last module before the global pooling
    assert target_layer(model) == fallback
    with pytest.raises(LesionkitError, match="last feature stage"):
        target_layer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()))


def test_explain_command_writes_pictures_and_lines_and_names_what_is_wrong(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    folder = tmp_path / "images"
    folder.mkdir()
    lesion(np.random.default_rng(3)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    out = tmp_path / "out"
    assert main(["explain", "--checkpoint", str(checkpoint), str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 of 2" in err
    (line,) = (out / "explanations.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record.keys() >= {"image", "class", "probability", "method", "faithfulness_metric", "faithfulness",
                             "overlay"}
    assert record["image"].endswith("good.png") and record["method"] == "gradcam" and record["class"] in CLASSES
    assert record["overlay"] == f"good_gradcam_{record['class']}.png"
    with Image.open(out / record["overlay"]) as picture:  # the framed image and the overlay side by side
        assert picture.format == "PNG" and picture.size == (2 * 64 + 4, 48)

    assert main(["explain", "--checkpoint", str(checkpoint), str(folder / "good.png"), "--out", str(out),
                 "--class", "mel", "--method", "gradcam++"]) == 0
    first, record = map(json.loads, (out / "explanations.jsonl").read_text().splitlines())  # the first run's kept
    assert first["method"] == "gradcam" and first["image"].endswith("good.png")
    assert (record["class"], record["overlay"]) == ("mel", "good_gradcam++_mel.png")
    assert (out / "good_gradcam++_mel.png").is_file()

    assert main(["explain", "--checkpoint", str(checkpoint), str(folder), "--out", str(out),
                 "--class", "melanoma"]) == 1
    assert "--class melanoma" in (err := capsys.readouterr().err) and ", ".join(CLASSES) in err


def explain_into(out, *images, checkpoint, extra=()) -> int:
    return main(["explain", "--checkpoint", str(checkpoint), *map(str, images), "--out", str(out), *extra])


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_explaining_into_an_earlier_runs_folder_keeps_its_entries_and_replaces_only_those_explained_again(
        tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = lesion(np.random.default_rng(4)), lesion(np.random.default_rng(5))
    one.save(tmp_path / "a" / "one.png")
    two.save(tmp_path / "a" / "two.png")
    out = tmp_path / "out"
    assert explain_into(out, tmp_path / "a", checkpoint=checkpoint, extra=["--class", "mel"]) == 0
    earlier = snapshot(out)
    lines = (out / "explanations.jsonl").read_text().splitlines()
    assert set(earlier) == {"explanations.jsonl", "one_gradcam_mel.png", "two_gradcam_mel.png"}

    # A run that explains nothing (an unreadable image) changes nothing, and leaves no empty file.
    (tmp_path / "fake.jpg").write_bytes(b"not a JPEG")
    assert explain_into(out, tmp_path / "fake.jpg", checkpoint=checkpoint) == 1
    assert "fake.jpg" in capsys.readouterr().err and snapshot(out) == earlier
    assert explain_into(tmp_path / "new", tmp_path / "fake.jpg", checkpoint=checkpoint) == 1
    assert not (tmp_path / "new").exists()

    # two.png explained again for mel replaces its entry and picture; one.png's stay; another class is added;
    # another one.png, in another folder, gets a picture of its own instead of overwriting the earlier one's.
    two.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "a" / "two.png")
    one.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(tmp_path / "b" / "one.png")
    assert explain_into(out, tmp_path / "a" / "two.png", tmp_path / "b" / "one.png", checkpoint=checkpoint,
                        extra=["--class", "mel"]) == 0
    assert explain_into(out, tmp_path / "a" / "two.png", checkpoint=checkpoint, extra=["--class", "nv"]) == 0
    now = (out / "explanations.jsonl").read_text().splitlines()
    assert now[0] == lines[0] and json.loads(lines[0])["image"].endswith("one.png"), "one.png's entry, unchanged"
    records = [json.loads(line) for line in now[1:]]
    assert [(r["image"][len(str(tmp_path)):], r["class"], r["overlay"]) for r in records] == [
        ("/a/two.png", "mel", "two_gradcam_mel.png"), ("/b/one.png", "mel", "one_gradcam_mel-2.png"),
        ("/a/two.png", "nv", "two_gradcam_nv.png")]
    assert (out / "one_gradcam_mel.png").read_bytes() == earlier["one_gradcam_mel.png"]
    assert (out / "two_gradcam_mel.png").read_bytes() != earlier["two_gradcam_mel.png"], "the new map replaced it"
    assert not list(out.glob(".*.tmp"))


def test_an_interrupted_explain_run_keeps_the_entries_it_finished_and_the_earlier_ones(tmp_path, monkeypatch):
    import lesionkit.commands.explain as command

    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    images = [write_image(tmp_path / "images" / f"{name}.jpg", seed=i) for i, name in enumerate("abc")]
    out = tmp_path / "out"
    assert explain_into(out, images[0], checkpoint=checkpoint) == 0
    (earlier,) = (out / "explanations.jsonl").read_text().splitlines()
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return explain(*args, **kwargs)

    monkeypatch.setattr(command, "explain", interrupted)
    assert explain_into(out, *images[1:], images[0], checkpoint=checkpoint) == 130  # Ctrl-C at the third image
    lines = (out / "explanations.jsonl").read_text().splitlines()
    assert lines[0] == earlier and [json.loads(line)["image"] for line in lines[1:]] == list(map(str, images[1:]))


def test_explain_out_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    picture = write_image(tmp_path / "x.jpg", seed=0)
    before = picture.read_bytes()
    # No checkpoint there: the --out message comes first, so it comes before anything loads.
    assert explain_into(picture, picture, checkpoint=tmp_path / "nowhere.ckpt") == 1
    err = capsys.readouterr().err
    assert f"error: --out {picture} is a file: give a folder" in err and "Traceback" not in err
    assert picture.read_bytes() == before
    assert explain_into(picture / "maps", picture, checkpoint=tmp_path / "nowhere.ckpt") == 1
    assert f"{picture} is a file" in capsys.readouterr().err


def test_gallery_shows_the_most_confident_right_and_wrong_call_of_each_class(tmp_path):
    classifier = TorchClassifier.load(fake_checkpoint(tmp_path / "model.ckpt"))
    paths = [write_image(tmp_path / f"ISIC_{i}.jpg", seed=i) for i in range(4)]
    frame = pd.DataFrame({"image_id": [p.stem for p in paths], "path": map(str, paths),
                          "dx": ["mel", "mel", "nv", "nv"]})
    probabilities = np.full((4, 7), 0.02)
    mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
    probabilities[[0, 1, 2, 3], [mel, mel, mel, nv]] = [0.6, 0.8, 0.7, 0.9]  # ISIC_2, an nv, called mel
    gallery = write_gallery(classifier, frame, probabilities, tmp_path)
    images = gallery["images"]
    assert set(images) == {"mel", "nv"} and set(images["nv"]) == {"right"}
    assert images["mel"]["right"]["image_id"] == "ISIC_1" and images["mel"]["right"]["probability"] == 0.8
    assert (images["mel"]["wrong"]["image_id"], images["mel"]["wrong"]["true"]) == ("ISIC_2", "nv")
    assert (tmp_path / "gallery_mel_wrong.png").is_file() and (tmp_path / "gallery_nv_right.png").is_file()


def test_the_report_embeds_the_gallery_unless_told_not_to(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    checkpoint = fake_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    paths = [write_image(tmp_path / "images" / f"ISIC_{i}.jpg", seed=i) for i in range(14)]
    frame = pd.DataFrame({"image_id": [p.stem for p in paths], "path": map(str, paths),
                          "dx": [CLASSES[i % 7] for i in range(14)]})
    settings = EvalSettings(batch_size=8, workers=0, bootstrap=None)
    report = evaluate_frame(checkpoint, Images(frame, "gallery test"), tmp_path / "report", settings)
    entries = [e for kinds in report.gallery["images"].values() for e in kinds.values()]
    assert 1 <= len(entries) <= 14 and all((tmp_path / "report" / e["file"]).is_file() for e in entries)
    assert "Where the network looked" in render_markdown(report, "t")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "gallery_" not in page and page.count("data:image/png") >= len(entries), "pictures embedded in the page"
    quick = evaluate_frame(checkpoint, Images(frame, "no gallery"), tmp_path / "quick",
                           EvalSettings(batch_size=8, workers=0, bootstrap=None, gallery=False))
    assert quick.gallery == {} and not list((tmp_path / "quick").glob("gallery_*.png"))
