"""Bad inputs, one table: every hostile case goes through the real command line and is answered by a message
that names the file, row or setting and says what to do, with exit code 1 and no traceback; the inputs that
are merely unusual (alpha, grayscale, 16-bit, CMYK, EXIF rotation, BOM, blank age, extra columns) work. After
every case, every file that existed before is still there, byte for byte: nothing already written is lost.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import struct
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


def write_config(w: Path, text: str) -> str:
    (w / "bad.yaml").write_text(text)
    return str(w / "bad.yaml")


# id: (prepare the world and return argv, exit code, what stderr (or stdout, for exit 0) must say)
CASES = {
    # images a user brings to predict
    "zero-byte jpeg": (lambda w: put(w / "x.jpg", b"") or predict(w, "x.jpg"), 1, ["x.jpg", "cannot read image"]),
    "truncated jpeg": (lambda w: put(w / "x.jpg", first_image(w).read_bytes()[:600]) or predict(w, "x.jpg"),
                       1, ["x.jpg", "cannot read image"]),
    "corrupt jpeg": (lambda w: put(w / "x.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4) or predict(w, "x.jpg"),
                     1, ["x.jpg", "cannot read image"]),
    "text named .jpg": (lambda w: put(w / "x.jpg", "<html>404 Not Found</html>") or predict(w, "x.jpg"),
                        1, ["x.jpg", "cannot read image", "replace or remove"]),
    "decompression bomb 30000x30000": (lambda w: png_claiming(w / "x.png", 30000, 30000) and predict(w, "x.png"),
                                       1, ["x.png", "900000000 pixels", "decompression bomb"]),
    "decompression bomb 9000x9000": (lambda w: png_claiming(w / "x.png", 9000, 9000) and predict(w, "x.png"),
                                     1, ["x.png", "9000x9000", "decompression bomb"]),
    "needle 2x400": (lambda w: write_image(w / "x.png", 1, size=(2, 400)) and predict(w, "x.png"),
                     1, ["x.png", "2x400", "crop it"]),
    "png with alpha works": (lambda w: alpha(w / "x.png") and predict(w, "x.png"), 0, ["x.png", "probabilities"]),
    "grayscale jpeg works": (lambda w: write_image(w / "x.jpg", 1, size=(60, 40), mode="L") and predict(w, "x.jpg"),
                             0, ["x.jpg"]),
    "16-bit png works": (lambda w: sixteen_bit(w / "x.png") and predict(w, "x.png"), 0, ["x.png"]),
    "cmyk jpeg works": (lambda w: cmyk(w / "x.jpg") and predict(w, "x.jpg"), 0, ["x.jpg"]),
    "exif-rotated jpeg works": (lambda w: exif_rotated(w / "x.jpg") and predict(w, "x.jpg"), 0, ["x.jpg"]),
    # images in the training data
    "corrupt image in the data": (lambda w: put(first_image(w), b"\xff\xd8garbage") or train(w), 1,
                                  ["ISIC_0000000", "unreadable", "--allow-missing"]),
    "bomb in the data": (lambda w: png_claiming(first_image(w).with_suffix(".png"), 30000, 30000) and
                         first_image(w).unlink() or train(w), 1, ["ISIC_0000000", "decompression bomb"]),
    # metadata
    "metadata missing column": (lambda w: metadata(w, lambda f: f.drop(columns="dx")) or train(w), 1,
                                ["HAM10000_metadata.csv", "lacks column(s) dx"]),
    "metadata unknown label": (lambda w: metadata(w, lambda f: f.assign(dx=["melanoma"] + list(f["dx"][1:])))
                               or train(w), 1, ["unknown label(s) melanoma on row(s) 2", "dx must be one of"]),
    "metadata duplicated image_id": (lambda w: metadata(w, lambda f: pd.concat([f, f.head(1)])) or train(w), 1,
                                     ["image_id listed more than once: ISIC_0000000"]),
    "metadata empty file": (lambda w: put(w / "ham" / "HAM10000_metadata.csv", "") or train(w), 1,
                            ["HAM10000_metadata.csv is empty"]),
    "metadata header only": (lambda w: metadata(w, lambda f: f.head(0)) or train(w), 1, ["header but no rows"]),
    "metadata wrong delimiter": (lambda w: put(w / "ham" / "HAM10000_metadata.csv",
        pd.read_csv(w / "ham" / "HAM10000_metadata.csv").to_csv(sep=";", index=False)) or train(w), 1,
        ["lacks column(s)", "comma-separated"]),
    "metadata blank lesion_id": (lambda w: metadata(w, lambda f: f.assign(lesion_id=[None] + list(f["lesion_id"][1:])))
                                 or train(w), 1, ["column lesion_id is blank on row(s) 2"]),
    "metadata with too few lesions": (lambda w: metadata(w, lambda f: f.head(4)) or train(w), 1,
                                      ["only 2 lesion(s) to split", "split.val_fraction"]),
    "metadata with BOM works": (lambda w: put(w / "ham" / "HAM10000_metadata.csv",
        (w / "ham" / "HAM10000_metadata.csv").read_text(), encoding="utf-8-sig") or check(w), 0, ["OK"]),
    "metadata NaN age works": (lambda w: metadata(w, lambda f: f.assign(age=np.nan)) or check(w), 0, ["OK"]),
    "metadata extra columns work": (lambda w: metadata(w, lambda f: f.assign(extra=1, notes="x")) or check(w), 0,
                                    ["OK"]),
    # split files
    "split from other data": (lambda w: train(w, "--split-file", split_file(
        w, lambda f: f.assign(image_id=f["image_id"].str.replace("ISIC", "OTHER")))), 1,
        ["split.csv lists 56 image(s) the metadata does not", "another data folder"]),
    "split with a lesion in two parts": (lambda w: train(w, "--split-file", split_file(
        w, lambda f: f.assign(split=["val"] + ["train"] * (len(f) - 1)))), 1,
        ["puts lesion(s) HAM_0000000 in more than one part"]),
    "split lists an image twice": (lambda w: train(w, "--split-file",
                                                   split_file(w, lambda f: pd.concat([f, f.tail(1)]))),
                                   1, ["split.csv lists image(s) ISIC_0000055 more than once"]),
    "split empty file": (lambda w: put(w / "split.csv", "") or train(w, "--split-file", str(w / "split.csv")),
                         1, ["split file", "is empty"]),
    # checkpoints
    "checkpoint missing": (lambda w: predict(w, "ham", "nowhere.ckpt"), 1, ["nowhere.ckpt does not exist"]),
    "checkpoint garbage": (lambda w: put(w / "g.ckpt", b"garbage") or predict(w, "ham", "g.ckpt"), 1,
                           ["cannot load checkpoint", "g.ckpt"]),
    "checkpoint with a pickled payload": (lambda w: malicious_checkpoint(w / "evil.ckpt", w / "PWNED") and
                                          predict(w, "ham", "evil.ckpt"), 1,
                                          ["evil.ckpt", "could run arbitrary code", "Refused"]),
    "checkpoint of another architecture": (lambda w: fake_checkpoint(w / "o.ckpt", weights_of="test_resnet") and
                                           predict(w, "ham", "o.ckpt"), 1, ["o.ckpt", "another architecture"]),
    "checkpoint with another class count": (lambda w: fake_checkpoint(w / "o.ckpt", num_classes=5) and
                                            predict(w, "ham", "o.ckpt"), 1, ["o.ckpt", "class count"]),
    "checkpoint from a newer lesionkit": (lambda w: fake_checkpoint(w / "o.ckpt", version="7.0.0") and
                                          predict(w, "ham", "o.ckpt"), 1, ["lesionkit 7.0.0", "upgrade lesionkit"]),
    "checkpoint that is a bare state_dict": (lambda w: torch.save(timm.create_model("test_efficientnet").state_dict(),
                                                                  w / "o.ckpt") or predict(w, "ham", "o.ckpt"), 1,
                                             ["not a lesionkit checkpoint"]),
    "checkpoint that is an ONNX export": (lambda w: put(w / "m.onnx", b"onnx") or [
        "predict", "--checkpoint", str(w / "m.onnx"), "--backend", "torch", str(w / "ham")], 1,
        ["m.onnx is an ONNX export", "--backend onnx", "the .ckpt"]),
    "TTA on a non-square ONNX export": (lambda w: main(["export", "--checkpoint", str(w / "model.ckpt")]) == 0 and [
        "predict", "--tta", "--checkpoint", str(w / "model.onnx"), str(w / "ham")], 1,
        ["--tta turns images by 90 degrees", "lesionkit export --tta", "--backend torch"]),
    "export checked on a path that does not exist": (lambda w: [
        "export", "--checkpoint", str(w / "model.ckpt"), "--check", str(w / "nowhere")], 1,
        ["nowhere does not exist", "give image files or folders"]),
    "export checked on an unreadable image": (lambda w: put(w / "bad.jpg", b"not a JPEG") or [
        "export", "--checkpoint", str(w / "model.ckpt"), "--check", str(w / "bad.jpg")], 1,
        ["bad.jpg", "replace or remove the file"]),
    "weights file with a pickled payload": (lambda w: malicious_checkpoint(w / "evil.pth", w / "PWNED") and
                                            train(w, "--weights", str(w / "evil.pth")), 1,
                                            ["cannot load weights file", "evil.pth", "never pickled code"]),
    "resume from a pickled payload": (lambda w: malicious_checkpoint(w / "run" / "checkpoints" / "last.ckpt",
                                                                     w / "PWNED")
                                      and ["train", "--out", str(w / "run"), "--resume"], 1,
                                      ["last.ckpt", "could run arbitrary code"]),
    "resume from another architecture": (lambda w: fake_checkpoint(w / "run" / "checkpoints" / "last.ckpt",
                                                                   "test_resnet")
                                         and ["train", "--out", str(w / "run"), "--resume"], 1,
                                         ["holds a test_resnet model", "configured for test_efficientnet"]),
    # configs
    "config unknown key": (lambda w: train(w, "--config", write_config(w, "train: {epochs: 3}")), 1,
                           ["unknown setting train.epochs", "known in train"]),
    "config wrong type": (lambda w: train(w, "--config", write_config(w, "data: {batch_size: many}")), 1,
                          ["data.batch_size must be int", "'many'"]),
    "config negative epochs": (lambda w: train(w, "--set", "train.phases.0.epochs=-2"), 1,
                               ["phase 'head': epochs must be at least 1, got -2"]),
    "config not yaml": (lambda w: train(w, "--config", write_config(w, "train: [1, 2\n")), 1, ["not valid YAML"]),
    "config missing": (lambda w: train(w, "--config", str(w / "nope.yaml")), 1, ["nope.yaml does not exist"]),
    # run and data folders
    "out holds another run": (lambda w: train(w, out="run"), 1, ["already holds a run", "--resume"]),
    "out is a file": (lambda w: put(w / "file", "mine") or train(w, out="file"), 1, ["is a file, not a folder"]),
    "data folder missing": (lambda w: train(w, "--data-dir", str(w / "nowhere")), 1,
                            ["nowhere does not exist: check --data-dir"]),
    "data folder missing, weights unloadable too": (lambda w: put(w / "wrong.pth", b"no weights") or train(
        w, "--data-dir", str(w / "nowhere"), "--weights", str(w / "wrong.pth")), 1, ["nowhere does not exist"]),
    "data folder is a file": (lambda w: train(w, "--data-dir", str(w / "tiny.yaml")), 1, ["is a file, not a folder"]),
    "data folder without metadata": (lambda w: (w / "empty").mkdir() or train(w, "--data-dir", str(w / "empty")), 1,
                                     ["no HAM10000_metadata.csv under", "lesionkit download"]),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_answered_clearly_and_loses_nothing(case, world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    prepare, code, messages = CASES[case]
    argv = prepare(w)
    before = snapshot(w)
    capsys.readouterr()
    assert main(argv) == code
    out, err = capsys.readouterr()
    said = err if code else out
    for message in messages:
        assert message in said, f"{case}: {message!r} not in\n{said}"
    assert "Traceback" not in err
    if code:
        assert err.startswith("error:") or "\nerror:" in err
    after = snapshot(w)
    lost = {name for name, digest in before.items() if after.get(name) != digest}
    assert not lost, f"{case}: changed or lost {lost}"
    assert not (w / "PWNED").exists(), "a pickled payload ran"


def test_weights_that_cannot_load_leave_the_run_folder_free_for_the_next_try(world, tmp_path, capsys):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    put(w / "wrong.pth", b"not a weights file")
    assert main(train(w, "--weights", str(w / "wrong.pth"))) == 1
    assert "wrong.pth" in capsys.readouterr().err
    assert main(train(w)) == 0, capsys.readouterr().err  # the same --out: not "already holds a run"


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
