"""int8 quantisation keeps the export servable: its metadata, its classes, integer weights, and answers close to
the float export's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import fake_checkpoint

from lesionkit import LesionkitError
from lesionkit.serve.export import export_classifier
from lesionkit.serve.onnx_classifier import OnnxClassifier
from lesionkit.serve.quantize import quantize_int8
from lesionkit.serve.torch_classifier import TorchClassifier


def test_int8_export_serves_with_its_metadata_and_integer_weights(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    fp32 = export_classifier(TorchClassifier.load(checkpoint), checkpoint, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(4, 3, 48, 64)).astype(np.float32) for _ in range(4)]
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", batches)
    graph = onnx.load(str(int8)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    served, plain = OnnxClassifier(int8), OnnxClassifier(fp32)
    assert served.meta["quantized"] == "int8" and served.classes == plain.classes
    logits = served.logits(batches[0])
    assert logits.shape == (4, 7) and np.isfinite(logits).all()
    with pytest.raises(LesionkitError, match="no lesionkit metadata"):
        bare = onnx.load(str(fp32))
        del bare.metadata_props[:]
        onnx.save(bare, str(tmp_path / "bare.onnx"))
        quantize_int8(tmp_path / "bare.onnx", tmp_path / "bare.int8.onnx", batches)


def test_fp16_export_halves_the_file_and_keeps_the_answers(tmp_path, capsys):
    from lesionkit.cli import main

    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    fp32 = export_classifier(TorchClassifier.load(checkpoint), checkpoint, tmp_path / "float32.onnx")
    assert main(["export", "--checkpoint", str(checkpoint), "--quantize", "fp16"]) == 0
    assert "Quantised to fp16" in capsys.readouterr().out
    fp16 = checkpoint.with_suffix(".onnx")
    graph = onnx.load(str(fp16)).graph
    assert all(init.data_type != onnx.TensorProto.FLOAT for init in graph.initializer)
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    served, plain = OnnxClassifier(fp16), OnnxClassifier(fp32)
    assert served.meta["quantized"] == "fp16" and served.classes == plain.classes
    batch = np.random.default_rng(0).normal(size=(4, 3, 48, 64)).astype(np.float32)
    logits, reference = served.logits(batch), plain.logits(batch)
    assert logits.dtype == np.float32
    assert np.abs(logits - reference).max() <= 0.01 * np.abs(reference).max() + 1e-3


def test_export_refuses_int8_without_calibration_images_and_a_quantised_tta_export(tmp_path, capsys):
    from lesionkit.cli import main

    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    assert main(["export", "--checkpoint", str(checkpoint), "--quantize", "int8"]) == 1
    assert "--quantize int8 needs --calibrate" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--quantize", "fp16", "--tta"]) == 1
    assert "drop --tta" in capsys.readouterr().err
    assert not checkpoint.with_suffix(".onnx").exists()
