"""Bad inputs, one table: every hostile case is answered by a message that names the file, row or setting and
says what to do, with exit code 1 and no traceback; the inputs that are merely unusual (alpha, grayscale, 16-bit,
CMYK, EXIF rotation, BOM, blank age, extra columns) work. A sample of the cases (COMMAND_LINE) runs as the real
command line, ``python -m lesionkit`` in its own process; the rest through ``main(argv)`` in-process, with the
process's file descriptors captured. After every case, every file that existed before is still there, byte for
byte: nothing already written is lost. Cases whose message says no fix yet are listed in NO_FIX_YET.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from PIL import Image

from helpers import fake_checkpoint, make_ham_folder, write_image
from lesionkit.cli import main
from lesionkit.data.images import load_image

TINY = {"data": {"image_size": [48, 64], "batch_size": 8, "num_workers": 0}, "split": {"val_fraction": 0.25},
        "model": {"name": "test_efficientnet", "weights": "none"},
        "train": {"accelerator": "cpu", "phases": [{"name": "head", "epochs": 1, "lr": 1e-3}]}}


class Payload:
    """Pickles to ``open(marker, "w")``: a checkpoint holding it would create ``marker`` when unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name": Payload(marker)}}, path)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A ~70-byte PNG whose header claims ``width x height`` pixels: a decompression bomb's calling card."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 12  # 8-byte signature + 4-byte length, then b"IHDR"
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def exif_rotated(path: Path) -> Path:
    """60x40 stored, red top half, with EXIF orientation 6: shown upright it is 40x60, red on the right."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20] = (220, 20, 20)
    pixels[20:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def sixteen_bit(path: Path) -> Path:
    Image.fromarray(np.full((40, 60), 40000, np.uint16)).save(path)
    return path


def cmyk(path: Path) -> Path:
    Image.new("RGB", (60, 40), (200, 30, 30)).convert("CMYK").save(path, quality=95)
    return path


def alpha(path: Path) -> Path:
    Image.new("RGBA", (60, 40), (10, 200, 30, 255)).save(path)
    return path


# ---- the world each case starts from ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder, a checkpoint, a finished-looking run and a resumable run, built once and copied."""
    root = tmp_path_factory.mktemp("world")
    make_ham_folder(root / "ham", lesions_per_class=4)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    fake_checkpoint(root / "model.ckpt")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "data_dir": str(root / "ham")}}))
    (run / "metrics.csv").write_text("phase,epoch\nhead,0\n")
    shutil.copy(root / "model.ckpt", run / "checkpoints" / "last.ckpt")
    return root


def train(w: Path, *extra: str, out: str = "out") -> list[str]:
    return ["train", "--config", str(w / "tiny.yaml"), "--data-dir", str(w / "ham"), "--out", str(w / out), *extra]


def predict(w: Path, image: str, checkpoint: str = "model.ckpt") -> list[str]:
    return ["predict", "--checkpoint", str(w / checkpoint), "--format", "json", str(w / image)]


def check(w: Path) -> list[str]:
    return ["data", "check", "--data-dir", str(w / "ham")]


def metadata(w: Path, edit) -> None:
    path = w / "ham" / "HAM10000_metadata.csv"
    edit(pd.read_csv(path)).to_csv(path, index=False)


def first_image(w: Path) -> Path:
    return w / "ham" / "HAM10000_images_part_2" / "ISIC_0000000.jpg"


def split_file(w: Path, edit) -> str:
    frame = pd.read_csv(w / "ham" / "HAM10000_metadata.csv")[["image_id", "lesion_id", "dx"]]
    val = set(frame["lesion_id"].unique()[::4])
    frame["split"] = np.where(frame["lesion_id"].isin(val), "val", "train")
    edit(frame).to_csv(w / "split.csv", index=False)
    return str(w / "split.csv")


def put(path: Path, data: bytes | str, encoding: str = "utf-8") -> None:
    """Write a file and return None, so that ``put(...) or argv`` reads as "write this, then run that"."""
    path.write_bytes(data if isinstance(data, bytes) else data.encode(encoding))


def exported(w: Path) -> bool:
    return main(["export", "--checkpoint", str(w / "model.ckpt")]) == 0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(w: Path, text: str) -> str:
    (w / "bad.yaml").write_text(text)
    return str(w / "bad.yaml")


# id: (prepare the world and return argv, exit code, regular expressions that stderr (or stdout, for exit 0) must
# match). "{w}" stands for the case's folder: a message names the very file, then says what to do about it.
IMAGE_FIX = "; replace or remove the file"
CASES = {
    # images a user brings to predict
    "zero-byte jpeg": (lambda w: put(w / "x.jpg", b"") or predict(w, "x.jpg"), 1,
                       [r"cannot read image {w}/x\.jpg: .*" + IMAGE_FIX]),
    "truncated jpeg": (lambda w: put(w / "x.jpg", first_image(w).read_bytes()[:600]) or predict(w, "x.jpg"),
                       1, [r"cannot read image {w}/x\.jpg: .*" + IMAGE_FIX]),
    "corrupt jpeg": (lambda w: put(w / "x.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4) or predict(w, "x.jpg"),
                     1, [r"cannot read image {w}/x\.jpg: .*" + IMAGE_FIX]),
    "text named .jpg": (lambda w: put(w / "x.jpg", "<html>404 Not Found</html>") or predict(w, "x.jpg"),
                        1, [r"cannot read image {w}/x\.jpg: .*" + IMAGE_FIX]),
    "decompression bomb 30000x30000": (lambda w: png_claiming(w / "x.png", 30000, 30000) and predict(w, "x.png"),
                                       1, [r"image {w}/x\.png is too large to open safely \(a decompression bomb\?\)",
                                           r"900000000 pixels", r"Shrink it below 64,000,000 pixels"]),
    "decompression bomb 9000x9000": (lambda w: png_claiming(w / "x.png", 9000, 9000) and predict(w, "x.png"),
                                     1, [r"image {w}/x\.png claims 9000x9000 pixels, over the 64,000,000 pixel limit "
                                         r"\(a decompression bomb\?\): shrink it below that"]),
    "needle 2x400": (lambda w: write_image(w / "x.png", 1, size=(2, 400)) and predict(w, "x.png"),
                     1, [r"image {w}/x\.png is 2x400 pixels, more than 10:1: crop it to the lesion"]),
    "png with alpha works": (lambda w: alpha(w / "x.png") and predict(w, "x.png"), 0,
                             [r'"image": "{w}/x\.png"', r'"probabilities"']),
    "grayscale jpeg works": (lambda w: write_image(w / "x.jpg", 1, size=(60, 40), mode="L") and predict(w, "x.jpg"),
                             0, [r'"image": "{w}/x\.jpg"']),
    "16-bit png works": (lambda w: sixteen_bit(w / "x.png") and predict(w, "x.png"), 0, [r'"image": "{w}/x\.png"']),
    "cmyk jpeg works": (lambda w: cmyk(w / "x.jpg") and predict(w, "x.jpg"), 0, [r'"image": "{w}/x\.jpg"']),
    "exif-rotated jpeg works": (lambda w: exif_rotated(w / "x.jpg") and predict(w, "x.jpg"), 0,
                                [r'"image": "{w}/x\.jpg"']),
    # images in the training data
    "corrupt image in the data": (lambda w: put(first_image(w), b"\xff\xd8garbage") or train(w), 1,
                                  [r"ISIC_0000000: unreadable: .*'{w}/ham/HAM10000_images_part_2/ISIC_0000000\.jpg'",
                                   r"Fix the data folder, or pass --allow-missing to skip them"]),
    "bomb in the data": (lambda w: png_claiming(first_image(w).with_suffix(".png"), 30000, 30000) and
                         first_image(w).unlink() or train(w), 1,
                         [r"ISIC_0000000: unreadable: image {w}/ham/HAM10000_images_part_2/ISIC_0000000\.png is too "
                          r"large to open safely \(a decompression bomb\?\)",
                          r"Fix the data folder, or pass --allow-missing to skip them"]),
    # metadata
    "metadata missing column": (lambda w: metadata(w, lambda f: f.drop(columns="dx")) or train(w), 1,
                                [r"{w}/ham/HAM10000_metadata\.csv lacks column\(s\) dx; it has lesion_id, image_id, ",
                                 r"A comma-separated file with at least lesion_id, image_id, dx is needed"]),
    "metadata unknown label": (lambda w: metadata(w, lambda f: f.assign(dx=["melanoma"] + list(f["dx"][1:])))
                               or train(w), 1, [r"{w}/ham/HAM10000_metadata\.csv: unknown label\(s\) melanoma on "
                                                r"row\(s\) 2; dx must be one of akiec, bcc, bkl, df, mel, nv, vasc"]),
    "metadata duplicated image_id": (lambda w: metadata(w, lambda f: pd.concat([f, f.head(1)])) or train(w), 1,
                                     [r"{w}/ham/HAM10000_metadata\.csv: image_id listed more than once: ISIC_0000000 ",
                                      r"each image needs exactly one row"]),
    "metadata empty file": (lambda w: put(w / "ham" / "HAM10000_metadata.csv", "") or train(w), 1,
                            [r"{w}/ham/HAM10000_metadata\.csv is empty: it must hold a header with lesion_id, "
                             r"image_id, dx"]),
    "metadata header only": (lambda w: metadata(w, lambda f: f.head(0)) or train(w), 1,
                             [r"{w}/ham/HAM10000_metadata\.csv has a header but no rows: list one image per row"]),
    "metadata wrong delimiter": (lambda w: put(w / "ham" / "HAM10000_metadata.csv",
        pd.read_csv(w / "ham" / "HAM10000_metadata.csv").to_csv(sep=";", index=False)) or train(w), 1,
        [r"{w}/ham/HAM10000_metadata\.csv lacks column\(s\) lesion_id, image_id, dx; it has lesion_id;image_id;",
         r"A comma-separated file with at least lesion_id, image_id, dx is needed"]),
    "metadata blank lesion_id": (lambda w: metadata(w, lambda f: f.assign(lesion_id=[None] + list(f["lesion_id"][1:])))
                                 or train(w), 1,
                                 [r"{w}/ham/HAM10000_metadata\.csv: column lesion_id is blank on row\(s\) 2: ",
                                  r"fill in the lesion",
                                  r"no lesion lands in two parts"]),
    "metadata with too few lesions": (lambda w: metadata(w, lambda f: f.head(4)) or train(w), 1,
                                      [r"only 2 lesion\(s\) to split: holding out 25% needs at least 4",
                                       r"use more lesions \(data\.per_class_limit\) or a larger split\.val_fraction"]),
    "metadata with BOM works": (lambda w: put(w / "ham" / "HAM10000_metadata.csv",
        (w / "ham" / "HAM10000_metadata.csv").read_text(), encoding="utf-8-sig") or check(w), 0, [r"\bOK\b"]),
    "metadata NaN age works": (lambda w: metadata(w, lambda f: f.assign(age=np.nan)) or check(w), 0, [r"\bOK\b"]),
    "metadata extra columns work": (lambda w: metadata(w, lambda f: f.assign(extra=1, notes="x")) or check(w), 0,
                                    [r"\bOK\b"]),
    # split files
    "split from other data": (lambda w: train(w, "--split-file", split_file(
        w, lambda f: f.assign(image_id=f["image_id"].str.replace("ISIC", "OTHER")))), 1,
        [r"{w}/split\.csv lists 56 image\(s\) the metadata does not: OTHER_0000000, ",
         r"was it made for another data folder\? Check --data-dir, or give the split of a run on this folder ",
         r"\(--split-file, or split\.split_file in the config\)"]),
    "split with a lesion in two parts": (lambda w: train(w, "--split-file", split_file(
        w, lambda f: f.assign(split=["val"] + ["train"] * (len(f) - 1)))), 1,
        [r"{w}/split\.csv puts lesion\(s\) HAM_0000000 in more than one part", r"all images of a lesion must share "
                                                                             r"a part"]),
    "split lists an image twice": (lambda w: train(w, "--split-file",
                                                   split_file(w, lambda f: pd.concat([f, f.tail(1)]))), 1,
                                   [r"{w}/split\.csv lists image\(s\) ISIC_0000055 more than once",
                                    r"each image belongs to exactly one part"]),
    "split empty file": (lambda w: put(w / "split.csv", "") or train(w, "--split-file", str(w / "split.csv")),
                         1, [r"split file {w}/split\.csv is empty: it needs a header image_id, lesion_id, dx, split"]),
    # checkpoints
    "checkpoint missing": (lambda w: predict(w, "ham", "nowhere.ckpt"), 1,
                           [r"checkpoint {w}/nowhere\.ckpt does not exist: check --checkpoint"]),
    "checkpoint garbage": (lambda w: put(w / "g.ckpt", b"garbage") or predict(w, "ham", "g.ckpt"), 1,
                           [r"cannot load checkpoint {w}/g\.ckpt: it is not a file torch\.save writes \(a zip "
                            r"archive or a pickle\); use a checkpoint written by `lesionkit train`"]),
    "checkpoint that is an image": (lambda w: predict(w, "ham", "ham/HAM10000_images_part_2/ISIC_0000000.jpg"), 1,
                                    [r"cannot load checkpoint {w}/ham/.*ISIC_0000000\.jpg: it is not a file "
                                     r"torch\.save writes"]),
    "weights file that is an image": (lambda w: train(w, "--weights", str(first_image(w))), 1,
                                      [r"model\.weights: {w}/ham/.*ISIC_0000000\.jpg is not a weights file \(a "
                                       r"\.safetensors file, or a \.pth or \.bin that torch\.save wrote\)"]),
    "checkpoint with a pickled payload": (lambda w: malicious_checkpoint(w / "evil.ckpt", w / "PWNED") and
                                          predict(w, "ham", "evil.ckpt"), 1,
                                          [r"cannot load checkpoint {w}/evil\.ckpt safely", r"could run arbitrary code",
                                           r"Refused; use a checkpoint written by `lesionkit train`"]),
    "checkpoint of another architecture": (lambda w: fake_checkpoint(w / "o.ckpt", weights_of="test_resnet") and
                                           predict(w, "ham", "o.ckpt"), 1,
                                           [r"{w}/o\.ckpt: its weights do not fit the test_efficientnet with 7 classes",
                                            r"another architecture",
                                            r"use a checkpoint as `lesionkit train` wrote it"]),
    "checkpoint with another class count": (lambda w: fake_checkpoint(w / "o.ckpt", num_classes=5) and
                                            predict(w, "ham", "o.ckpt"), 1,
                                            [r"{w}/o\.ckpt: its weights do not fit the test_efficientnet with 7 "
                                             r"classes", r"class count",
                                             r"use a checkpoint as `lesionkit train` wrote it"]),
    "checkpoint from a newer lesionkit": (lambda w: fake_checkpoint(w / "o.ckpt", version="7.0.0") and
                                          predict(w, "ham", "o.ckpt"), 1,
                                          [r"{w}/o\.ckpt was written by lesionkit 7\.0\.0, a newer major version",
                                           r"upgrade lesionkit to read it"]),
    "checkpoint that is a bare state_dict": (lambda w: torch.save(timm.create_model("test_efficientnet").state_dict(),
                                                                  w / "o.ckpt") or predict(w, "ham", "o.ckpt"), 1,
                                             [r"{w}/o\.ckpt is not a lesionkit checkpoint",
                                              r"use one written by `lesionkit train`"]),
    "checkpoint that is an ONNX export": (lambda w: put(w / "m.onnx", b"onnx") or [
        "predict", "--checkpoint", str(w / "m.onnx"), "--backend", "torch", str(w / "ham")], 1,
        [r"{w}/m\.onnx is an ONNX export, not a checkpoint: serve it with `lesionkit predict --backend onnx`, or pass "
         r"the \.ckpt it was exported from"]),
    "ONNX backend before any export": (lambda w: predict(w, "ham") + ["--backend", "onnx"], 1,
                                       [r"ONNX file {w}/model\.onnx does not exist: write it with `lesionkit export "
                                        r"--checkpoint {w}/model\.ckpt`"]),
    "ONNX export older than its checkpoint": (lambda w: exported(w)
                                               and put(w / "model.ckpt", (w / "model.ckpt").read_bytes() + b"!")
                                               or predict(w, "ham") + ["--backend", "onnx"], 1,
        [r"{w}/model\.onnx was exported from another model\.ckpt than {w}/model\.ckpt holds now \(retrained or "
         r"replaced\): export it again with `lesionkit export --checkpoint {w}/model\.ckpt`"]),
    "ONNX export named directly, older than the checkpoint beside it": (lambda w: exported(w) and put(
        w / "model.ckpt", (w / "model.ckpt").read_bytes() + b"!") or predict(w, "ham", "model.onnx"), 1,
        [r"{w}/model\.onnx was exported from another model\.ckpt than {w}/model\.ckpt holds now \(retrained or "
         r"replaced\): export it again with `lesionkit export --checkpoint {w}/model\.ckpt`"]),
    "evaluating an ONNX export older than its checkpoint": (lambda w: exported(w) and put(
        w / "model.ckpt", (w / "model.ckpt").read_bytes() + b"!") or [
        "evaluate", "--checkpoint", str(w / "model.onnx"), "--data-dir", str(w / "ham")], 1,
        [r"{w}/model\.onnx was exported from another model\.ckpt .*: export it again with `lesionkit export "
         r"--checkpoint {w}/model\.ckpt`"]),
    "ONNX export from before its checkpoint's record was fitted again": (lambda w: exported(w) and put(
        w / "temperature.json", json.dumps({"model.ckpt": {"sha256": sha256(w / "model.ckpt"), "temperature": 1.5}}))
        or predict(w, "ham") + ["--backend", "onnx"], 1,
        [r"{w}/model\.onnx was exported from another model\.ckpt than {w}/model\.ckpt holds now \(its record "
         r"fitted again since\): export it again with `lesionkit export --checkpoint {w}/model\.ckpt`"]),
    "TTA on a non-square ONNX export": (lambda w: exported(w) and [
        "predict", "--tta", "--checkpoint", str(w / "model.onnx"), str(w / "ham")], 1,
        [r"--tta turns images by 90 degrees, from 48x64 to 64x48, and this export serves 48x64 only: export it with "
         r"`lesionkit export --tta`, or predict with PyTorch \(--backend torch and the \.ckpt\)"]),
    "coverage outside (0, 1)": (lambda w: predict(w, "ham") + ["--coverage", "1.5"], 1,
                                [r"--coverage 1\.5: must be between 0 and 1 \(exclusive\), e\.g\. 0\.9"]),
    "coverage without conformal scores": (lambda w: predict(w, "ham") + ["--coverage", "0.9"], 1,
        [r"{w}/model\.ckpt has no conformal scores to build prediction sets from: refit with `lesionkit evaluate "
         r"--checkpoint {w}/model\.ckpt --data-dir DATA --split-file RUN/split\.csv --split val --fit-temperature`"]),
    "melanoma sensitivity fitted on test": (lambda w: [
        "evaluate", "--checkpoint", str(w / "model.ckpt"), "--data-dir", str(w / "ham"), "--split", "test",
        "--melanoma-sensitivity", "0.95"], 1,
        [r"--melanoma-sensitivity fits on validation images only: add --split-file RUN/split\.csv --split val"]),
    "export checked on a path that does not exist": (lambda w: [
        "export", "--checkpoint", str(w / "model.ckpt"), "--check", str(w / "nowhere")], 1,
        [r"{w}/nowhere does not exist: give image files or folders"]),
    "export checked on an unreadable image": (lambda w: put(w / "bad.jpg", b"not a JPEG") or [
        "export", "--checkpoint", str(w / "model.ckpt"), "--check", str(w / "bad.jpg")], 1,
        [r"cannot read image {w}/bad\.jpg: .*" + IMAGE_FIX]),
    "weights file with a pickled payload": (lambda w: malicious_checkpoint(w / "evil.pth", w / "PWNED") and
                                            train(w, "--weights", str(w / "evil.pth")), 1,
                                            [r"cannot load weights file {w}/evil\.pth safely \(tensors only, never "
                                             r"pickled code\)"]),
    "resume from a pickled payload": (lambda w: malicious_checkpoint(w / "run" / "checkpoints" / "last.ckpt",
                                                                     w / "PWNED")
                                      and ["train", "--out", str(w / "run"), "--resume"], 1,
                                      [r"cannot load checkpoint {w}/run/checkpoints/last\.ckpt safely",
                                       r"could run arbitrary code",
                                       r"Refused; use a checkpoint written by `lesionkit train`"]),
    "resume from another architecture": (lambda w: fake_checkpoint(w / "run" / "checkpoints" / "last.ckpt",
                                                                   "test_resnet")
                                         and ["train", "--out", str(w / "run"), "--resume"], 1,
                                         [r"{w}/run/checkpoints/last\.ckpt holds a test_resnet model, but the run is "
                                          r"configured for test_efficientnet: resume with the config the checkpoint "
                                          r"was trained with"]),
    # configs
    "config unknown key": (lambda w: train(w, "--config", write_config(w, "train: {epochs: 3}")), 1,
                           [r"{w}/bad\.yaml: unknown setting train\.epochs; known in train: seed, .*\bphases\b"]),
    "config wrong type": (lambda w: train(w, "--config", write_config(w, "data: {batch_size: many}")), 1,
                          [r"{w}/bad\.yaml: setting data\.batch_size must be int, got 'many'"]),
    "config negative epochs": (lambda w: train(w, "--set", "train.phases.0.epochs=-2"), 1,
                               [r"phase 'head': epochs must be at least 1, got -2"]),
    "config not yaml": (lambda w: train(w, "--config", write_config(w, "train: [1, 2\n")), 1,
                        [r"{w}/bad\.yaml is not valid YAML", r"line 1, column 8"]),
    "config missing": (lambda w: train(w, "--config", str(w / "nope.yaml")), 1,
                       [r"config file {w}/nope\.yaml does not exist: check --config"]),
    # run and data folders
    "out holds another run": (lambda w: train(w, out="run"), 1,
                              [r"{w}/run already holds a run: pass --resume to continue it, or choose another --out"]),
    "out holds files of its own": (lambda w: (w / "mine").mkdir() or put(w / "mine" / "report.md", "notes")
                                   or train(w, out="mine"), 1,
                                   [r"--out {w}/mine already holds other files \(report\.md\): choose a new or empty "
                                    r"folder"]),
    "cross-validation into a folder with files of its own": (lambda w: (w / "mine").mkdir() or put(
        w / "mine" / "cv.json", "{}") or train(w, "--folds", "2", out="mine"), 1,
        [r"--out {w}/mine already holds other files \(cv\.json\)"]),
    "one fold": (lambda w: train(w, "--folds", "1"), 1,
                 [r"--folds 1: cross-validation needs at least 2 folds \(5 is usual\)"]),
    "resume that changes the recipe": (lambda w: ["train", "--out", str(w / "run"), "--resume", "--set",
                                                  "train.seed=3", "--set", "data.batch_size=4"], 1,
        [r"--resume continues {w}/run with the settings it started with \({w}/run/config\.yaml\), and the command "
         r"line changes data\.batch_size, train\.seed: drop those, or train anew with another --out \(only "
         r"train\.accelerator, .* may change on resuming\)"]),
    "hardware this machine cannot run": (lambda w: train(w, "--strategy", "bogus"), 1,
        [r"train\.accelerator=cpu, train\.devices=auto, train\.strategy=bogus, train\.precision=auto: .*bogus.* "
         r"\(change the setting it names; --accelerator auto takes a GPU where there is one, else the CPU\)"]),
    "devices the CPU accelerator cannot take": (lambda w: train(w, "--devices", "0,1"), 1,
                                                [r"train\.accelerator=cpu, train\.devices=0,1, .*: `devices` selected "
                                                 r"with `CPUAccelerator` should be an int > 0"]),
    "out is a file": (lambda w: put(w / "file", "mine") or train(w, out="file"), 1,
                      [r"--out {w}/file is a file, not a folder: choose another --out"]),
    "data folder missing": (lambda w: train(w, "--data-dir", str(w / "nowhere")), 1,
                            [r"data folder {w}/nowhere does not exist: check --data-dir"]),
    "data folder missing, weights unloadable too": (lambda w: put(w / "wrong.pth", b"no weights") or train(
        w, "--data-dir", str(w / "nowhere"), "--weights", str(w / "wrong.pth")), 1,
        [r"data folder {w}/nowhere does not exist: check --data-dir"]),
    "data folder is a file": (lambda w: train(w, "--data-dir", str(w / "tiny.yaml")), 1,
                              [r"data folder {w}/tiny\.yaml is a file, not a folder: check --data-dir"]),
    "data folder without metadata": (lambda w: (w / "empty").mkdir() or train(w, "--data-dir", str(w / "empty")), 1,
                                     [r"no HAM10000_metadata\.csv under {w}/empty: point --data-dir at the HAM10000 "
                                      r"folder", r"`lesionkit download --to DIR`"]),
}

# Cases whose message names the file but says nothing the user can do about it; the pattern is what the message
# is expected to say once it does. Marked strict xfail (raising NoFixGiven only), so every other check of the case
# still has to pass, and the day the message gains its fix the case turns red until it moves into CASES.
NO_FIX_YET: dict[str, str] = {}

# A sample run as a user runs it, `python -m lesionkit ...` in a process of its own: exit status, stderr and
# tracebacks as the shell sees them (the rest runs in-process through main(), ~5 s of imports saved each).
COMMAND_LINE = ("data folder missing", "metadata missing column", "metadata unknown label", "config negative epochs",
                "checkpoint garbage", "checkpoint with a pickled payload", "text named .jpg")


class NoFixGiven(AssertionError):
    """The message names the file or flag but not what to do."""


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def command_line(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "lesionkit", *argv], capture_output=True, text=True, cwd=cwd,
                            timeout=300)
    return result.returncode, result.stdout, result.stderr


def cases():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, raises=NoFixGiven, reason=f"the message names no fix yet: "
                                   f"{NO_FIX_YET[case]!r}")] if case in NO_FIX_YET else []
        yield pytest.param(case, marks=marks, id=case + (" (command line)" if case in COMMAND_LINE else ""))


@pytest.mark.parametrize("case", list(cases()))
def test_bad_input_is_answered_clearly_and_loses_nothing(case, world, tmp_path, capfd):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    prepare, code, messages = CASES[case]
    argv = prepare(w)
    before = snapshot(w)
    capfd.readouterr()
    if case in COMMAND_LINE:
        got, out, err = command_line(argv, tmp_path)
    else:
        got = main(argv)
        out, err = capfd.readouterr()
    assert got == code, f"{case}: exit {got}, not {code}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    said = err if code else out
    if code:
        assert err.startswith("error:") or "\nerror:" in err, err[-3000:]
    after = snapshot(w)
    lost = {name for name, digest in before.items() if after.get(name) != digest}
    assert not lost, f"{case}: changed or lost {lost}"
    assert not (w / "PWNED").exists(), "a pickled payload ran"
    for message in messages:
        pattern = message.replace("{w}", re.escape(str(w)))
        assert re.search(pattern, said), f"{case}: {pattern!r} not in\n{said}"
    if case in NO_FIX_YET and not re.search(NO_FIX_YET[case], said):
        raise NoFixGiven(f"{case}: names no fix: {said.strip()[:500]}")


def test_the_sample_and_the_exceptions_are_cases_of_the_table():
    assert set(COMMAND_LINE) <= set(CASES) and set(NO_FIX_YET) <= set(CASES)
    assert all(CASES[case][1] == 1 for case in (*COMMAND_LINE, *NO_FIX_YET))


def test_weights_that_cannot_load_leave_the_run_folder_free_for_the_next_try(world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    put(w / "wrong.pth", b"not a weights file")
    assert main(train(w, "--weights", str(w / "wrong.pth"))) == 1
    assert "wrong.pth" in capsys.readouterr().err
    assert main(train(w)) == 0, capsys.readouterr().err  # the same --out: not "already holds a run"


def test_settings_this_machine_cannot_run_leave_the_run_folder_free_for_the_next_try(world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    assert main(train(w, "--strategy", "bogus")) == 1
    assert "train.strategy=bogus" in capsys.readouterr().err
    assert main(train(w)) == 0, capsys.readouterr().err


def test_a_cross_validation_refused_for_its_hardware_writes_nothing_and_resumes_on_other_hardware(world, tmp_path,
                                                                                                  capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    assert main(train(w, "--folds", "2", "--strategy", "bogus")) == 1
    assert sorted(p.name for p in (w / "out").iterdir()) == [".lock"]
    assert main(train(w, "--folds", "2")) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(train(w, "--folds", "2", "--resume", "--accelerator", "auto", "--set", "data.num_workers=1")) == 0
    assert "Fold 2/2: finished" in capsys.readouterr().out
    assert main(train(w, "--folds", "2", "--resume", "--set", "train.seed=3")) == 1
    assert "the command line changes train.seed" in capsys.readouterr().err


def test_resume_takes_the_hardware_given_and_the_same_command_again(world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    assert main(train(w, "--set", "train.phases.0.epochs=2")) == 0
    assert main(train(w, "--set", "train.phases.0.epochs=2", "--resume", "--accelerator", "cpu", "--set",
                      "data.num_workers=1")) == 0, capsys.readouterr().err
    assert "--resume continues" not in capsys.readouterr().err


def test_evaluate_minds_the_missing_images_of_the_part_it_scores_only(world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    split = pd.read_csv(split_file(w, lambda frame: frame))
    missing = first_image(w)
    missing.unlink()
    part = split.loc[split["image_id"] == missing.stem, "split"].item()
    other = "train" if part == "val" else "val"

    def evaluate(name: str) -> int:
        return main(["evaluate", "--checkpoint", str(w / "model.ckpt"), "--data-dir", str(w / "ham"), "--split-file",
                     str(w / "split.csv"), "--split", name, "--out", str(w / name), "--bootstrap", "0"])
    assert evaluate(other) == 0, capsys.readouterr().err
    assert evaluate(part) == 1
    assert (f"1 listed image(s) are missing or unreadable:\n  {missing.stem}: " in capsys.readouterr().err)


def test_a_cache_without_room_leaves_the_run_folder_free_for_the_next_try(world, tmp_path, capsys, monkeypatch):
    w = tmp_path / "w"
    shutil.copytree(world, w)

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("lesionkit.data.cache.os.posix_fallocate", full_disk)
    assert main(train(w, "--set", f"data.cache_dir={w / 'cache'}")) == 1
    assert "no room for the image cache" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(train(w, "--set", f"data.cache_dir={w / 'cache'}")) == 0, capsys.readouterr().err


def test_an_export_that_meets_a_full_disk_leaves_the_earlier_export_whole(world, tmp_path, capsys, monkeypatch):
    import onnx

    w = tmp_path / "w"
    shutil.copytree(world, w)
    assert main(["export", "--checkpoint", str(w / "model.ckpt")]) == 0
    earlier = (w / "model.onnx").read_bytes()
    real_save = onnx.save

    def save_half(proto, path):
        real_save(proto, path)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(onnx, "save", save_half)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(w / "model.ckpt"), "--tta"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "model.onnx" in err and "Traceback" not in err
    assert (w / "model.onnx").read_bytes() == earlier and not list(w.glob(".model.onnx.*"))


def test_the_table_is_wide():
    assert len(CASES) >= 25


def test_the_payload_is_live_so_refusing_it_means_something(tmp_path):
    marker = tmp_path / "PWNED"
    malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_unusual_images_come_out_upright_and_in_their_colours(tmp_path):
    rotated = load_image(exif_rotated(tmp_path / "r.jpg"))
    assert rotated.size == (40, 60)  # shown upright: portrait
    pixels = np.asarray(rotated).astype(int)
    assert pixels[30, 35, 0] > 150 and pixels[30, 5, 2] > 150  # the red top now on the right, blue on the left
    assert np.asarray(load_image(sixteen_bit(tmp_path / "s.png")))[5, 5].tolist() == [156] * 3  # 40000/256
    assert np.abs(np.asarray(load_image(cmyk(tmp_path / "c.jpg")))[5, 5].astype(int) - [200, 30, 30]).max() < 12
    assert np.asarray(load_image(alpha(tmp_path / "a.png")))[5, 5].tolist() == [10, 200, 30]


def test_predict_answers_the_good_images_beside_a_bad_one(world, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    exif_rotated(folder / "a.jpg")
    cmyk(folder / "b.jpg")
    (folder / "c.jpg").write_bytes(b"")
    assert main(["predict", "--checkpoint", str(world / "model.ckpt"), "--format", "json", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert [Path(r["image"]).name for r in json.loads(out)] == ["a.jpg", "b.jpg"] and "c.jpg" in err
