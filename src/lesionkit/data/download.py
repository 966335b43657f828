"""Fetch HAM10000 from its official home, Harvard Dataverse, into the layout the rest of lesionkit reads.

Result under ``dest``::

    HAM10000_metadata.csv
    HAM10000_images_part_1/*.jpg
    HAM10000_images_part_2/*.jpg
    ISIC2018_Task3_Test_GroundTruth.csv       (with include_test)
    ISIC2018_Task3_Test_Images/*.jpg          (with include_test)

The zip archives are kept in ``dest/.downloads/``: pooch re-checks their hash on every run, so a rerun
neither downloads nor unpacks again. Delete that folder to reclaim its space (about 2.8 GB, more with the
test set) once you no longer need a rerun to be free.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pooch
import requests

from lesionkit import LesionkitError

DEFAULT_SERVER = "https://dataverse.harvard.edu"
DOI = "doi:10.7910/DVN/DBW86T"

# Record stem -> what it becomes under dest. A stem matches "X.zip", "X.tab", "X.csv" or a bare "X",
# because Dataverse lists ingested CSVs as ".tab" and their original name may lack an extension.
# Segmentation masks and the other extras in the record are simply not asked for.
_CORE = {
    "HAM10000_metadata": "HAM10000_metadata.csv",
    "HAM10000_images_part_1": "HAM10000_images_part_1",
    "HAM10000_images_part_2": "HAM10000_images_part_2",
}
_TEST = {
    "ISIC2018_Task3_Test_GroundTruth": "ISIC2018_Task3_Test_GroundTruth.csv",
    "ISIC2018_Task3_Test_Images": "ISIC2018_Task3_Test_Images",
}
_HASH_NAMES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}
_HEADERS = {"User-Agent": "lesionkit-download (+https://pypi.org/project/requests)"}


class DownloadError(LesionkitError, RuntimeError):
    """The download failed; the message says what happened and what to do next."""


def _by_hand(dest: Path, doi: str) -> str:
    return (
        f"To get the data by hand, open https://doi.org/{doi.removeprefix('doi:')} in a browser and download "
        "HAM10000_images_part_1.zip, HAM10000_images_part_2.zip and HAM10000_metadata (as the original CSV, "
        f"saved as HAM10000_metadata.csv). Unzip both image archives into one folder beside "
        f"HAM10000_metadata.csv in {dest}, then run: lesionkit data check --data-dir {dest}"
    )


class _ResumableDownloader:
    """Pooch downloader that streams into a stable ``.part`` file and resumes it with an HTTP Range request.

    Pooch hands every attempt a fresh random temp name, so the bytes must live elsewhere to survive an
    interruption; once complete they are moved onto pooch's temp file, which pooch hash-checks and deletes
    on a mismatch, so a corrupt download never lingers.
    """

    def __init__(self, part: Path, timeout: tuple[float, float], progress: bool) -> None:
        self.part, self.timeout, self.progress = part, timeout, progress

    def __call__(self, url: str, output_file: str, pooch_obj: object, check_only: bool = False) -> bool | None:
        if check_only:
            return requests.head(url, headers=_HEADERS, timeout=self.timeout, allow_redirects=True).ok
        from tqdm.auto import tqdm  # always present: lightning, a lesionkit dependency, requires it

        offset = self.part.stat().st_size if self.part.exists() else 0
        headers = {**_HEADERS, **({"Range": f"bytes={offset}-"} if offset else {})}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as resp:
            if resp.status_code == 416:  # the .part already holds every byte; the hash check decides
                os.replace(self.part, output_file)
                return None
            resp.raise_for_status()
            if resp.status_code != 206:  # server ignored the Range: start over rather than append garbage
                offset = 0
            size = int(resp.headers.get("Content-Length", 0))
            bar = tqdm(total=offset + size or None, initial=offset, unit="B", unit_scale=True,
                       desc=self.part.name.removesuffix(".part"), disable=not self.progress, file=sys.stderr)
            with bar, open(self.part, "ab" if offset else "wb") as out:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(self.part, output_file)
        return None


class _UnpackFlat:
    """Pooch processor: unzip into a staging folder, then move every JPEG flat into ``target``.

    Flattening gives the official layout whether or not the zip wraps its images in a top folder. A marker
    beside the archive records the unpacked hash, so a rerun that only *fetched* the archive skips this.
    """

    def __init__(self, target: Path, known_hash: str | None) -> None:
        self.target, self.known_hash = target, str(known_hash)

    def __call__(self, fname: str, action: str, pooch_obj: object) -> Path:
        marker = Path(fname + ".unpacked")
        if action == "fetch" and self.target.is_dir() and marker.exists() and marker.read_text() == self.known_hash:
            return self.target
        staging = Path(fname + ".unzip")
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted unpack
        files = pooch.Unzip(extract_dir=str(staging))(fname, "download", pooch_obj)
        self.target.mkdir(parents=True, exist_ok=True)
        for path in map(Path, files):
            if path.suffix.lower() == ".jpg" and "__MACOSX" not in path.parts:
                os.replace(path, self.target / path.name)
        shutil.rmtree(staging)
        marker.write_text(self.known_hash)
        return self.target


def _list_files(server: str, doi: str, timeout: tuple[float, float]) -> list[dict]:
    url = f"{server}/api/datasets/:persistentId/"
    resp = requests.get(url, params={"persistentId": doi}, headers=_HEADERS, timeout=timeout)
    if resp.status_code == 404:
        raise DownloadError(f"{server} has no dataset {doi}. Check --server (it must be a Dataverse installation).")
    resp.raise_for_status()
    return [entry["dataFile"] for entry in resp.json()["data"]["latestVersion"]["files"]]


def _find(files: list[dict], stem: str, doi: str) -> dict:
    for data_file in files:
        names = (data_file.get("filename"), data_file.get("originalFileName"))
        if any(name and name.split(".")[0] == stem for name in names):
            return data_file
    raise DownloadError(f"The Dataverse record {doi} has no file named {stem} (.zip/.csv/.tab); it may have been "
                        f"reorganised. Download the files by hand from https://doi.org/{doi.removeprefix('doi:')}.")


def _fetch(
    data_file: dict, target: Path, server: str, dest: Path, timeout: tuple[float, float], progress: bool
) -> None:
    """Download one record file, verify it, and put it at ``target`` (a CSV) or unpack it there (a zip)."""
    # Ingested tabular files (the CSVs) are served as Dataverse's ".tab" unless asked for the original.
    # Dataverse computes the listed checksum on the uploaded original (its file page calls it "Original
    # File MD5"; see IQSS/dataverse#9501), so it verifies the ?format=original bytes.
    tabular = bool(data_file.get("originalFileFormat"))
    url = f"{server}/api/access/datafile/{data_file['id']}" + ("?format=original" if tabular else "")
    checksum = data_file.get("checksum") or {"type": "MD5", "value": data_file.get("md5")}
    algo = _HASH_NAMES.get(str(checksum.get("type")).upper())
    known_hash = f"{algo}:{checksum['value']}" if algo and checksum.get("value") else None
    is_zip = target.suffix != ".csv"
    cache = dest / ".downloads"
    cache.mkdir(parents=True, exist_ok=True)  # the .part files live here even for the CSVs
    fname = f"{target.name}.zip" if is_zip else target.name
    try:
        pooch.retrieve(
            url, known_hash, fname=fname, path=cache if is_zip else dest,
            downloader=_ResumableDownloader(cache / f"{fname}.part", timeout, progress),
            processor=_UnpackFlat(target, known_hash) if is_zip else None,
        )
    except ValueError as err:  # pooch's hash mismatch; it already deleted the bad bytes
        raise DownloadError(f"Checksum mismatch for {fname} from {url}: {err} Run the command again to "
                            "download it afresh; if it keeps failing, the server is serving a different file.") from err
    except requests.HTTPError as err:
        raise DownloadError(f"{server} refused {fname} ({err}). Try again later or use --server for a mirror.") from err
    if known_hash is None:  # the record gave no checksum: the size is all that can be checked
        size = data_file.get("originalFileSize" if tabular else "filesize")
        got = (cache / fname if is_zip else target).stat().st_size
        if size is not None and got != size:
            raise DownloadError(f"{fname} has {got} bytes but the record says {size}; delete it and rerun.")


def download_ham10000(dest: Path, *, include_test: bool = False, server: str = DEFAULT_SERVER, doi: str = DOI,
                      progress: bool = True, timeout: float = 30.0) -> Path:
    """Download HAM10000 (and optionally the ISIC 2018 Task 3 test set) from Dataverse into ``dest``.

    Args:
        dest: Folder to fill; created if missing.
        include_test: Also fetch the ISIC 2018 Task 3 test images and ground-truth CSV.
        server: Dataverse installation to ask (the official one, or a mirror of the record).
        doi: Persistent id of the record.
        progress: Show a progress bar per file on stderr.
        timeout: Seconds to wait for the server to connect or send data before giving up.

    Returns:
        ``dest``.

    Raises:
        DownloadError: The server is unreachable, a file is missing from the record, or a checksum fails.
    """
    dest, server = Path(dest), server.rstrip("/")
    # An unreachable host that drops packets should not hold the user for long; a slow transfer may.
    limits = (min(timeout, 10.0), timeout)
    try:
        files = _list_files(server, doi, limits)
        wanted = {**_CORE, **(_TEST if include_test else {})}
        # Resolve every file before downloading any, so a reorganised record fails before gigabytes move.
        plan = [(_find(files, stem, doi), dest / name) for stem, name in wanted.items()]
        for data_file, target in plan:
            _fetch(data_file, target, server, dest, limits, progress)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise DownloadError(f"Could not reach {server}, or lost the connection ({type(err).__name__}). Check your "
                            f"network and rerun: partial downloads resume. {_by_hand(dest, doi)}") from err
    except (requests.RequestException, KeyError, ValueError) as err:
        raise DownloadError(f"Unexpected answer from {server} for {doi} ({err}). {_by_hand(dest, doi)}") from err
    return dest
