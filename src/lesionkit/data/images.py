"""Opening a picture safely: any format Pillow reads, upright and 8-bit RGB, with the size checks that keep a
hostile header from exhausting memory. Pillow alone: ``predict --backend onnx`` reads images without pandas or
torch.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from lesionkit import LesionkitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Dermoscopy photos are at most a few thousand pixels a side; anything far larger is a decompression bomb.
# _open refuses it from the header. Pillow's own process-wide limit is left as it is: it refuses (at open) only
# what is far above this one.
MAX_PIXELS = 64_000_000
# Resizing to cover a 4:3 input multiplies a needle-thin image's long side: 1x30000 px would become
# 128x3.8M px. No photo of a lesion is 10 times longer than wide.
MAX_ASPECT = 10


def _open(path: Path) -> Image.Image:
    """``Image.open`` with the size checks that keep a hostile header from exhausting memory."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:  # far over the limit: Pillow refuses to open it at all
        raise LesionkitError(f"image {path} is too large to open safely (a decompression bomb?): {err} "
                             f"Shrink it below {MAX_PIXELS:,} pixels") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise LesionkitError(f"image {path} claims {width}x{height} pixels, over the {MAX_PIXELS:,} "
                             f"pixel limit (a decompression bomb?): shrink it below that")
    if width < 1 or height < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        image.close()
        raise LesionkitError(f"image {path} is {width}x{height} pixels, more than {MAX_ASPECT}:1: crop it to "
                             f"the lesion")
    return image


def load_image(path: Path) -> Image.Image:
    """Open any image as 8-bit RGB, upright as its EXIF says, or raise ``LesionkitError`` naming the file."""
    try:
        with _open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                # 16-bit and float grayscale: scale to 8 bits instead of letting convert() clip.
                image = image.point(lambda v: v / 256).convert("L")
            return image.convert("RGB")
    except LesionkitError:
        raise
    except Exception as err:  # Pillow documents OSError and ValueError, but nothing bounds what a format plugin
        # raises on corrupt input; whatever the type, the file is at fault (tests/data/test_fuzz.py).
        raise LesionkitError(f"cannot read image {path}: {err or type(err).__name__}; replace or remove the "
                             f"file") from None


def check_decodable(path: Path) -> str | None:
    """Decode an image cheaply (JPEG at 1/8 scale); return what is wrong with it, or None."""
    try:
        with _open(path) as image:
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()
    except LesionkitError as err:
        return f"unreadable: {err}"
    except Exception as err:
        return f"unreadable: {err or type(err).__name__}"
    return None
