"""int8 quantisation of an export with onnxruntime's static quantiser: weights per output channel, activations
scaled from their ranges on real images (QDQ format, which onnxruntime's CPU kernels fuse into integer
convolutions). EfficientNet-Lite was designed for this: ReLU6 and no squeeze-and-excitation keep activation
ranges narrow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from lesionkit import LesionkitError
from lesionkit.files import atomic_write
from lesionkit.serve.onnx_classifier import METADATA_KEY


class _Batches:
    """onnxruntime's calibration reader protocol over batches of network inputs."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": np.ascontiguousarray(batch, dtype=np.float32)}


def quantize_int8(source: Path, out: Path, batches: Iterable[np.ndarray]) -> Path:
    """Write ``source`` (an export of ``lesionkit export``) to ``out`` with int8 weights and activations, the
    activation ranges taken from ``batches`` of real, framed images; the lesionkit metadata is carried over."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load(str(source))
    meta = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in meta:
        raise LesionkitError(f"{source} carries no lesionkit metadata: export it with `lesionkit export` first")
    if json.loads(meta[METADATA_KEY]).get("turned"):
        raise LesionkitError(f"{source} holds two graphs (`lesionkit export --tta`): quantise a plain export")
    reader = type("Reader", (_Batches, CalibrationDataReader), {})(batches)
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = work / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantized = work / "int8.onnx"
        quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        result = onnx.load(str(quantized))
        del result.metadata_props[:]
        for key, value in meta.items():
            entry = result.metadata_props.add()
            entry.key, entry.value = key, (json.dumps({**json.loads(value), "quantized": "int8"})
                                           if key == METADATA_KEY else value)
        atomic_write(out, lambda tmp: onnx.save(result, str(tmp)), "quantised export")
    finally:
        for path in work.glob("*"):
            path.unlink()
        work.rmdir()
    return out
