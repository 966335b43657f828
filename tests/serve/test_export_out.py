"""Where ``lesionkit export`` writes: never over the shipped model's own export unasked, and a clear refusal of an
``--out`` that is a folder; both before anything loads, leaving every file as it was."""

from __future__ import annotations

from helpers import fake_checkpoint

import lesionkit.model.shipped as shipped
from lesionkit.cli import main


def test_export_refuses_an_out_that_is_a_folder(tmp_path, capsys):
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    folder = tmp_path / "five"
    folder.mkdir()
    (folder / "keep.onnx").write_bytes(b"an earlier export")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"error: --out {folder} is a folder: give the file to write, e.g. --out {folder / 'model.onnx'}" in err
    assert "Traceback" not in err
    assert [p.name for p in folder.iterdir()] == ["keep.onnx"]
    assert (folder / "keep.onnx").read_bytes() == b"an earlier export"
    assert not checkpoint.with_suffix(".onnx").exists()


def test_export_of_the_shipped_model_without_out_leaves_its_export_alone(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    checkpoint = fake_checkpoint(models / "lesionkit-lite1.ckpt")
    (models / "lesionkit-lite1.onnx").write_bytes(b"the shipped float16 export")
    monkeypatch.setattr(shipped, "CHECKPOINT", checkpoint)
    monkeypatch.chdir(tmp_path)
    for given in (["--checkpoint", "models/../models/lesionkit-lite1.ckpt"], ["--checkpoint", str(checkpoint)]):
        assert main(["export", *given]) == 1
        err = capsys.readouterr().err
        assert "is the model shipped with lesionkit" in err and "pass --out FILE.onnx" in err, given
        assert (models / "lesionkit-lite1.onnx").read_bytes() == b"the shipped float16 export"
    # With --out it exports, elsewhere.
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "mine.onnx")]) == 0
    assert (tmp_path / "mine.onnx").stat().st_size > 1000
    assert (models / "lesionkit-lite1.onnx").read_bytes() == b"the shipped float16 export"
    assert sorted(p.name for p in models.iterdir()) == ["lesionkit-lite1.ckpt", "lesionkit-lite1.onnx"]
