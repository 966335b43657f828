"""Screenshots of the web demo serving the shipped model, taken in the system's Chromium, for the README:

    python scripts/demo_screenshots.py IMAGE [--out docs/images]

- ``demo.png``: ``IMAGE`` (the README's is ``ISIC_0024306.jpg``, a 600x450 HAM10000 original) with the patient's
  age, sex and body site filled in as a user would, from the ``HAM10000_metadata.csv`` beside the image when it
  has its row (``--age``, ``--sex`` and ``--site`` give or override them);
- ``demo-not-dermoscopy.png``: scikit-image's astronaut, which the out-of-distribution check warns about.

The page is the one ``lesionkit serve`` starts with no ``--checkpoint``, driven by Playwright.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image

from lesionkit.model.shipped import CHECKPOINT



def recorded_patient(image: Path) -> dict[str, str]:
    """``image``'s age, sex and body site from a ``HAM10000_metadata.csv`` in its folder or the one above."""
    for folder in (image.parent, image.parent.parent):
        if (folder / "HAM10000_metadata.csv").is_file():
            rows = pd.read_csv(folder / "HAM10000_metadata.csv", dtype=str).set_index("image_id")
            if image.stem in rows.index:
                row = rows.loc[image.stem]
                recorded = {"age": str(int(float(row["age"]))) if pd.notna(row["age"]) else None,
                            "sex": row["sex"], "localization": row["localization"]}
                return {field: value for field, value in recorded.items() if pd.notna(value) and value != "unknown"}
    return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(page, url: str, image: Path, out: Path, patient: dict[str, str]) -> str:
    """Upload ``image`` with ``patient``'s fields, classify, save the full page as ``out``; the answer's heading."""
    page.goto(url, wait_until="networkidle")
    page.set_input_files("#upload input[type=file]", str(image))
    for field, value in patient.items():
        box = page.locator(f"#{field} input").first
        box.fill(value)
        if field != "age":  # a dropdown: choose the option the typed text leaves
            page.get_by_role("option", name=value, exact=True).click()
    page.click("#classify")
    page.wait_for_selector("#overlay img", timeout=120_000)
    page.screenshot(path=str(out), full_page=True)
    return page.inner_text("#status h3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", type=Path, help="a dermoscopic image (JPEG or PNG)")
    parser.add_argument("--age", help="the patient's age in years")
    parser.add_argument("--sex")
    parser.add_argument("--site", help="the body site (HAM10000's localization)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images")
    args = parser.parse_args()
    image = args.image
    if not image.is_file():
        parser.error(f"{image} does not exist: give the path of a dermoscopic image")
    given = {"age": args.age, "sex": args.sex, "localization": args.site}
    patient = {**recorded_patient(image), **{field: value for field, value in given.items() if value}}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("no Chromium on PATH (apt-get install chromium)")

    from playwright.sync_api import sync_playwright
    from skimage.data import astronaut

    from lesionkit.serve.demo import serve
    from lesionkit.serve.torch_classifier import TorchClassifier

    port = free_port()
    demo = serve(TorchClassifier.load(CHECKPOINT), str(CHECKPOINT), "127.0.0.1", port, block=False)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory() as work, sync_playwright() as playwright:
            photo = Path(work) / "astronaut.png"
            Image.fromarray(astronaut()).save(photo)
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            url = f"http://127.0.0.1:{port}/"
            for source, name, fields in ((image, "demo.png", patient), (photo, "demo-not-dermoscopy.png", {})):
                print(f"{name}: {source.name} {fields} -> {shoot(page, url, source, args.out / name, fields)}")
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
