"""Smaller exports with onnxruntime's own tools, the lesionkit metadata (and so the calibration record) carried
over:

- :func:`quantize_fp16`: the whole graph in float16 (``onnxruntime.transformers.float16``), inputs and outputs
  kept float32; half the file, and the answers of the float32 export within rounding (``docs/shipped-model.md``).
- :func:`quantize_int8`: the static quantiser, weights per output channel, activations scaled from their ranges
  on real images (QDQ format, which onnxruntime's CPU kernels fuse into integer convolutions); a quarter of the
  file, faster, but it costs accuracy on a Lite1 (``docs/speed.md``).
"""

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

    meta = _lesionkit_metadata(source)
    reader = type("Reader", (_Batches, CalibrationDataReader), {})(batches)
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        prepared = work / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantized = work / "int8.onnx"
        quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        _save_with_metadata(onnx.load(str(quantized)), meta, "int8", out)
    finally:
        for path in work.glob("*"):
            path.unlink()
        work.rmdir()
    return out


def quantize_fp16(source: Path, out: Path) -> Path:
    """Write ``source`` (an export of ``lesionkit export``) to ``out`` computing in float16, its inputs and
    outputs still float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    meta = _lesionkit_metadata(source)
    _save_with_metadata(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), meta, "fp16", out)
    return out


def _lesionkit_metadata(source: Path) -> dict[str, str]:
    """The metadata of a plain lesionkit export, which quantisation must carry over."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    if METADATA_KEY not in meta:
        raise LesionkitError(f"{source} carries no lesionkit metadata: export it with `lesionkit export` first")
    if json.loads(meta[METADATA_KEY]).get("turned"):
        raise LesionkitError(f"{source} holds two graphs (`lesionkit export --tta`): quantise a plain export")
    return meta


def _save_with_metadata(model, meta: dict[str, str], quantized: str, out: Path) -> None:
    """Save ``model`` to ``out`` atomically with ``meta``, the lesionkit entry marked ``quantized``."""
    import onnx

    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, (json.dumps({**json.loads(value), "quantized": quantized})
                                       if key == METADATA_KEY else value)
    atomic_write(out, lambda tmp: onnx.save(model, str(tmp)), "quantised export")
