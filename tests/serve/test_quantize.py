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
