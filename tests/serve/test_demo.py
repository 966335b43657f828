"""The web demo, tested twice: through its API with gradio_client, and in a real headless Chromium (Playwright
with the system's browser), uploading real images; bad uploads get a message on the page and the server goes on."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
from helpers import FULLRES, REAL_DATA, fake_checkpoint

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_image() -> Path:
    folder = FULLRES if FULLRES.is_dir() else REAL_DATA
    found = sorted(folder.rglob("*.jpg"))
    if not found:
        pytest.skip(f"no real HAM10000 image under {folder} (set LESIONKIT_DATA)")
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lesionkit.serve.demo import serve
    from lesionkit.serve.torch_classifier import TorchClassifier

    checkpoint = fake_checkpoint(tmp_path_factory.mktemp("demo") / "model.ckpt")
    port = free_port()
    demo = serve(TorchClassifier.load(checkpoint), str(checkpoint), "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape), with no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_the_api_classifies_a_real_image_and_explains_bad_uploads(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    status, label, overlay = client.predict(handle_file(str(real_image())), api_name="/classify")
    predicted = label["label"]
    assert predicted in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc") and f"### {predicted}" in status
    assert len(label["confidences"]) == 7 and overlay, "probabilities for every class, and the Grad-CAM overlay"
    assert "model.ckpt" in status, "the answer names the model that gave it"
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture at all")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(real_image().read_bytes()[:400])
    for bad, message in ((text, "Could not use this upload"), (truncated, "Could not use this upload"),
                         (png_claiming(tmp_path / "bomb.png", 30000, 30000), "decompression bomb"),
                         (png_claiming(tmp_path / "large.png", 9000, 9000), "pixel limit")):
        status, label, overlay = client.predict(handle_file(str(bad)), api_name="/classify")
        assert message in status and bad.name in status and "Traceback" not in status
        assert not label and not overlay, "no answer shown for a bad upload"
    big = tmp_path / "big.jpg"
    big.write_bytes(real_image().read_bytes() + os.urandom(21 * 2**20))
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        client.predict(handle_file(str(big)), api_name="/classify")
    status, label, _ = client.predict(handle_file(str(real_image())), api_name="/classify")
    assert label["label"] == predicted, "the server still serves, with the same answer"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (make test installs it where it can)")
def test_the_page_shows_the_predicted_class_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    image = real_image()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto(server, wait_until="networkidle")
            assert "not a medical device" in page.inner_text("body")
            page.set_input_files("#upload input[type=file]", str(image))
            page.click("#classify")
            page.wait_for_selector("#status h3", timeout=60_000)
            heading = page.inner_text("#status h3")
            assert heading.split()[0] in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
            page.wait_for_selector("#overlay img", timeout=30_000)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            keep = os.environ.get("LESIONKIT_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (make test installs it where it can)")
def test_the_page_sends_only_the_clinical_fields_a_user_fills():
    """With the shipped model, which reads age, sex and body site: a field left empty is unknown to the model (an
    empty age box must not reach it as 0 years), and filled ones are used."""
    from playwright.sync_api import expect, sync_playwright

    from lesionkit.model.shipped import CHECKPOINT
    from lesionkit.serve.demo import serve
    from lesionkit.serve.torch_classifier import TorchClassifier

    if not CHECKPOINT.is_file():
        pytest.skip(f"no shipped model at {CHECKPOINT}")
    port = free_port()
    demo = serve(TorchClassifier.load(CHECKPOINT), str(CHECKPOINT), "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            assert page.locator("#age input").first.input_value() == ""
            page.set_input_files("#upload input[type=file]", str(real_image()))
            page.click("#classify")
            status = page.locator("#status")
            expect(status).to_contain_text("Clinical metadata used: none", timeout=60_000)
            page.locator("#age input").first.fill("55")
            for field, value in (("sex", "male"), ("localization", "back")):
                page.locator(f"#{field} input").first.fill(value)
                page.get_by_role("option", name=value, exact=True).click()
            page.click("#classify")
            expect(status).to_contain_text("Clinical metadata used: age 55, sex male, localization back",
                                           timeout=60_000)
            browser.close()
    finally:
        demo.close()


def test_the_status_says_how_the_out_of_distribution_check_went():
    from lesionkit.serve.demo import describe

    answer = {"prediction": "nv", "probabilities": {"nv": 0.9, "mel": 0.1}, "prediction_set": ["nv"],
              "refer": False, "refer_threshold": 0.1, "refer_sensitivity": 0.9}
    passed = describe({**answer, "out_of_distribution": False, "ood_score": 0.42}, 1.0, "m.ckpt")
    flagged = describe({**answer, "out_of_distribution": True, "ood_score": 2.1}, 1.0, "m.ckpt")
    unknown = describe({**answer, "out_of_distribution": None, "ood_score": None}, None, "m.ckpt",
                       ["no out-of-distribution detector"])
    assert "score 0.42; flagged above 1.0" in passed and "Warning" not in passed
    assert "does not look like a dermoscopic image" in flagged and "score 2.1" in flagged
    assert "Looks like" not in unknown and "no out-of-distribution detector" in unknown


def test_a_taken_port_is_named_before_the_model_loads(capsys):
    from lesionkit.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", "nowhere.ckpt", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use: pass another --port, e.g. --port {port + 1}" in err
    assert "GRADIO_SERVER_PORT" not in err and "nowhere.ckpt" not in err  # said before the checkpoint is looked at


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port 99999: must be between 1 and 65535 (e.g. 7860)"),
    (["--port", "0"], "--port 0: must be between 1 and 65535"),
    (["--host", "999.1.1.1"], "--host 999.1.1.1: not an address or name this machine knows; give an address of "
                              "this machine, e.g. --host 127.0.0.1"),
])
def test_a_bad_address_is_named_with_its_flag(capsys, flags, message):
    from lesionkit.cli import main

    assert main(["serve", "--checkpoint", "nowhere.ckpt", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_prints_its_address_only_and_names_a_port_taken_since_the_check(tmp_path, capfd):
    """Gradio's own lines advise `share=True` in launch(), which a command-line user cannot act on; and when the
    port goes between the command's check and the launch, Gradio's advice names GRADIO_SERVER_PORT, not --port."""
    from lesionkit import LesionkitError
    from lesionkit.serve.demo import serve
    from lesionkit.serve.torch_classifier import TorchClassifier

    checkpoint = fake_checkpoint(tmp_path / "model.ckpt")
    classifier, port = TorchClassifier.load(checkpoint), free_port()
    demo = serve(classifier, str(checkpoint), "127.0.0.1", port, block=False)
    try:
        out = capfd.readouterr().out
        assert f"Serving {checkpoint} on http://127.0.0.1:{port}/ (Ctrl-C stops)" in out
        assert "share=True" not in out
        with pytest.raises(LesionkitError, match=f"port {port} on 127.0.0.1 is in use: pass another --port"):
            serve(classifier, str(checkpoint), "127.0.0.1", port, block=False)
    finally:
        demo.close()
