"""lesionkit.data.download against a small fake Dataverse served on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from lesionkit.commands.download import add_arguments, run
from lesionkit.data.download import DOI, DownloadError, download_ham10000

IMAGE_IDS = ("ISIC_0024306", "ISIC_0024307", "ISIC_0024308")
TEST_IDS = ("ISIC_0034524", "ISIC_0034525")
METADATA = "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n" + "".join(
    f"HAM_000{i},{image_id},nv,follow_up,45.0,male,back,vidir_modern\n" for i, image_id in enumerate(IMAGE_IDS)
)
GROUND_TRUTH = "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n" + "".join(f"{i},0,1,0,0,0,0,0\n" for i in TEST_IDS)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    # Noise-free but non-uniform pixels so each JPEG is a few KB: big enough to split for the resume test.
    Image.frombytes("RGB", (64, 48), bytes((seed * 7 + i) % 251 for i in range(64 * 48 * 3))).save(buf, "JPEG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeDataverse:
    """The listing and access endpoints of a Dataverse holding a miniature HAM10000 record."""

    def __init__(self) -> None:
        part_1 = _zip({f"{IMAGE_IDS[0]}.jpg": _jpeg(0), f"{IMAGE_IDS[1]}.jpg": _jpeg(1)})
        # An extra top folder and macOS junk: the unpacked layout must come out the same anyway.
        part_2 = _zip({f"HAM10000_images_part_2/{IMAGE_IDS[2]}.jpg": _jpeg(2), "__MACOSX/._x.jpg": b"junk"})
        test_zip = _zip({f"ISIC2018_Task3_Test_Input/{i}.jpg": _jpeg(9 + n) for n, i in enumerate(TEST_IDS)}
                        | {"ISIC2018_Task3_Test_Input/LICENSE.txt": b"CC-BY-NC"})
        # id -> (filename, served bytes, original bytes or None when not an ingested tabular file)
        self.files: dict[int, tuple[str, bytes, bytes | None]] = {
            101: ("HAM10000_images_part_1.zip", part_1, None),
            102: ("HAM10000_images_part_2.zip", part_2, None),
            103: ("HAM10000_metadata.tab", METADATA.replace(",", "\t").encode(), METADATA.encode()),
            104: ("HAM10000_segmentations_lesion_tschandl.zip", _zip({"x.png": b"png"}), None),
            105: ("ISIC2018_Task3_Test_Images.zip", test_zip, None),
            106: ("ISIC2018_Task3_Test_GroundTruth.tab", b"tab", GROUND_TRUTH.encode()),
            107: ("ISIC2018_Task3_Test_NatureMedicine_AI_Interaction_Benefit.tab", b"tab", b"a,b\n1,2\n"),
        }
        self.wrong_md5: set[int] = set()
        self.honour_range = True
        self.requests: list[tuple[str, str | None]] = []  # (path with query, Range header)

    def listing(self) -> dict:
        entries = []
        for file_id, (name, served, original) in self.files.items():
            payload = original if original is not None else served
            md5 = "0" * 32 if file_id in self.wrong_md5 else hashlib.md5(payload).hexdigest()
            data_file = {"id": file_id, "filename": name, "filesize": len(served), "md5": md5,
                         "checksum": {"type": "MD5", "value": md5}}
            if original is not None:
                data_file |= {"originalFileFormat": "text/csv", "originalFileSize": len(original),
                              "originalFileName": name.replace(".tab", ".csv")}
            entries.append({"label": name, "dataFile": data_file})
        return {"status": "OK", "data": {"latestVersion": {"files": entries}}}

    def file_requests(self) -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].startswith("/api/access/datafile/")]


@pytest.fixture
def dataverse():
    fake = FakeDataverse()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            fake.requests.append((self.path, self.headers.get("Range")))
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/api/datasets/:persistentId/" and query.get("persistentId") == [DOI]:
                return self._send(200, json.dumps(fake.listing()).encode(), "application/json")
            match = re.fullmatch(r"/api/access/datafile/(\d+)", url.path)
            if not match or int(match[1]) not in fake.files:
                return self._send(404, b'{"status":"ERROR"}', "application/json")
            _, served, original = fake.files[int(match[1])]
            body = original if original is not None and query.get("format") == ["original"] else served
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if ranged and fake.honour_range:
                start = int(ranged[1])
                if start >= len(body):
                    return self._send(416, b"", "text/plain")
                return self._send(206, body[start:], "application/octet-stream",
                                  {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
            return self._send(200, body, "application/octet-stream")

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for key, value in {"Content-Type": ctype, "Content-Length": str(len(body)), **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


def _fetch(fake: FakeDataverse, dest: Path, **kwargs: object) -> Path:
    return download_ham10000(dest, server=fake.url, progress=False, timeout=5.0, **kwargs)


def _assert_layout(dest: Path) -> None:
    assert (dest / "HAM10000_metadata.csv").read_text() == METADATA
    part_1 = sorted(p.name for p in (dest / "HAM10000_images_part_1").iterdir())
    part_2 = sorted(p.name for p in (dest / "HAM10000_images_part_2").iterdir())
    assert part_1 == [f"{IMAGE_IDS[0]}.jpg", f"{IMAGE_IDS[1]}.jpg"]
    assert part_2 == [f"{IMAGE_IDS[2]}.jpg"]  # wrapper folder and __MACOSX junk gone
    for jpg in dest.glob("HAM10000_images_part_*/*.jpg"):
        with Image.open(jpg) as img:
            img.load()
            assert img.size == (64, 48)


def test_download_builds_official_layout(dataverse, tmp_path):
    dest = tmp_path / "ham"
    assert _fetch(dataverse, dest) == dest
    _assert_layout(dest)
    assert not (dest / "ISIC2018_Task3_Test_Images").exists()
    fetched = {path for path, _ in dataverse.file_requests()}
    assert fetched == {"/api/access/datafile/101", "/api/access/datafile/102",
                       "/api/access/datafile/103?format=original"}  # no masks, no extras
    assert not list(dest.rglob("*.part"))


def test_download_with_test_set(dataverse, tmp_path):
    dest = _fetch(dataverse, tmp_path / "ham", include_test=True)
    _assert_layout(dest)
    assert (dest / "ISIC2018_Task3_Test_GroundTruth.csv").read_text() == GROUND_TRUTH
    test_images = sorted((dest / "ISIC2018_Task3_Test_Images").iterdir())
    assert [p.name for p in test_images] == [f"{i}.jpg" for i in TEST_IDS]
    for jpg in test_images:
        with Image.open(jpg) as img:
            img.load()
    assert not any("/107" in path or "/104" in path for path, _ in dataverse.file_requests())


@pytest.mark.parametrize("honour_range", [True, False])
def test_resumes_partial_download(dataverse, tmp_path, honour_range):
    dataverse.honour_range = honour_range
    dest = tmp_path / "ham"
    whole = dataverse.files[101][1]
    (dest / ".downloads").mkdir(parents=True)
    (dest / ".downloads" / "HAM10000_images_part_1.zip.part").write_bytes(whole[: len(whole) // 2])
    _fetch(dataverse, dest)
    _assert_layout(dest)
    assert ("/api/access/datafile/101", f"bytes={len(whole) // 2}-") in dataverse.file_requests()
    assert (dest / ".downloads" / "HAM10000_images_part_1.zip").read_bytes() == whole
    assert not (dest / ".downloads" / "HAM10000_images_part_1.zip.part").exists()


def test_checksum_mismatch_names_file_and_cleans_up(dataverse, tmp_path):
    dataverse.wrong_md5.add(101)
    dest = tmp_path / "ham"
    with pytest.raises(DownloadError, match=r"HAM10000_images_part_1\.zip") as err:
        _fetch(dataverse, dest)
    assert "checksum" in str(err.value).lower()
    leftovers = [p.name for p in (dest / ".downloads").iterdir()]
    assert not any(name.startswith("HAM10000_images_part_1") for name in leftovers), leftovers
    # Once the record is right again, a rerun starts clean and succeeds.
    dataverse.wrong_md5.clear()
    _assert_layout(_fetch(dataverse, dest))


def test_missing_file_in_record_is_named(dataverse, tmp_path):
    del dataverse.files[102]
    with pytest.raises(DownloadError, match="HAM10000_images_part_2"):
        _fetch(dataverse, tmp_path / "ham")
    assert not dataverse.file_requests()  # checked before any download starts


def test_no_network_fails_fast_with_manual_instructions(tmp_path):
    with socket.socket() as sock:  # grab a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_ham10000(tmp_path / "ham", server=f"http://127.0.0.1:{port}", progress=False)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "doi.org/10.7910/DVN/DBW86T" in message
    for needed in ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata",
                   "lesionkit data check --data-dir"):
        assert needed in message


def test_second_call_downloads_nothing(dataverse, tmp_path):
    dest = _fetch(dataverse, tmp_path / "ham", include_test=True)
    before = len(dataverse.file_requests())
    mtime = (dest / "HAM10000_images_part_1" / f"{IMAGE_IDS[0]}.jpg").stat().st_mtime_ns
    _fetch(dataverse, dest, include_test=True)
    assert len(dataverse.file_requests()) == before
    assert (dest / "HAM10000_images_part_1" / f"{IMAGE_IDS[0]}.jpg").stat().st_mtime_ns == mtime  # not re-unpacked
    _assert_layout(dest)


def test_cli_entry_points(dataverse, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--to", str(tmp_path / "ham"), "--server", dataverse.url])
    assert args.test is False
    assert run(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "ham") in out
    assert f"lesionkit data check --data-dir {tmp_path / 'ham'}" in out
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --to is required
