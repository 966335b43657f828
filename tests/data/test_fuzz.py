"""Fuzzing the image path: whatever bytes or small image arrive, ``load_image`` and ``predict`` either answer
or raise ``LesionkitError`` naming the file; nothing else escapes (no crash, no other exception type)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import fake_checkpoint
from lesionkit import LesionkitError
from lesionkit.data.images import MAX_ASPECT, load_image
from lesionkit.serve.torch_classifier import TorchClassifier
from lesionkit.serve.predict import predict_paths
from lesionkit.data.preprocessing import eval_array

# ~200 examples in all, ~10 s: enough to walk Pillow's header parsers past their magic numbers every run.
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "1", "I", "I;16", "F", "CMYK", "YCbCr", "HSV", "LAB"]
FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "PPM"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return TorchClassifier.load(fake_checkpoint(tmp_path_factory.mktemp("fuzz") / "model.ckpt"))


def loads_or_explains(path: Path) -> Image.Image | None:
    try:
        image = load_image(path)
    except LesionkitError as err:
        assert str(path) in str(err)
        return None
    assert image.mode == "RGB" and min(image.size) >= 1
    return image


@FUZZ
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=2048))
def test_random_bytes(tmp_path, magic, body):
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(magic + body)
    loads_or_explains(path)


@st.composite
def images(draw):
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    try:
        image = image.convert(mode)
        buffer = io.BytesIO()
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # a mode this format cannot store: not an input anyone can hand us
    try:  # Pillow 12 writes 1x1 YCbCr TIFFs it cannot read back itself: its round trip, not our loading
        with Image.open(io.BytesIO(buffer.getvalue())) as written:
            written.load()
    except OSError:
        assume(False)
    return buffer.getvalue(), (width, height), fmt


@FUZZ
@given(image=images())
def test_random_small_images_load_upright_rgb_and_predict(tmp_path, classifier, image):
    data, size, fmt = image
    path = tmp_path / f"fuzz.{fmt.lower()}"
    path.write_bytes(data)
    loaded = loads_or_explains(path)
    if max(size) > MAX_ASPECT * min(size):
        assert loaded is None  # refused, with a message naming the file
        return
    assert loaded is not None and loaded.size == size
    # The torch-free framing of predict --backend onnx gives the very same input, at every odd size and aspect.
    assert np.array_equal(eval_array(loaded, classifier.preprocessing), classifier.transform(loaded))
    results, errors = predict_paths(classifier, [path])
    assert not errors and len(results) == 1
    assert sum(results[0]["probabilities"].values()) == pytest.approx(1, abs=1e-5)


@FUZZ
@given(image=images(), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_damaged_images(tmp_path, classifier, image, flips):
    data, _, fmt = image
    data = bytearray(data)
    for position, value in flips:
        data[position % len(data)] = value
    path = tmp_path / f"fuzz.{fmt.lower()}"
    path.write_bytes(bytes(data))
    if loads_or_explains(path) is not None:
        results, errors = predict_paths(classifier, [path])
        assert len(results) + len(errors) == 1
