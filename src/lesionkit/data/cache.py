"""Decode every image once, at the size training reads it, into one memory-mapped uint8 file.

Decoding and scaling a 600x450 JPEG costs many times what reading the same pixels back from the cache costs,
and without a cache it is paid every epoch (docs/speed.md has the figures). Images are stored at the eval
transform's *cover* size (``size / crop_pct``, e.g. 272x363 for a 240x320 input with crop_pct 0.882), which is
what both transforms scale to first: the transforms then find the image already at that size, so evaluation
sees the very same pixels as without the cache and training augments (flips, rotation, zoom, colour) from the
same start. A larger margin for zoom would buy nothing, since the uncached path zooms from the cover size too.

A cache is ``<key>.npy`` (N x H x W x 3, uint8) beside ``<key>.json`` (image ids in row order). The key
hashes every image's path, size and modification time with the cover size and interpolation, so changed
data or another input size builds a new cache instead of reading a stale one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.functional import InterpolationMode
from tqdm import tqdm

from lesionkit import LesionkitError
from lesionkit.data.images import load_image
from lesionkit.data.preprocessing import Preprocessing
from lesionkit.data.transforms import ResizeCover

FORMAT_VERSION = 1  # bump when the stored pixels change meaning
DRAFT_FACTOR = 2  # JPEGs decode at no less than twice the stored size (see decode_cover)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lesionkit`` or ``~/.cache/lesionkit``: writable even when the data folder is not."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lesionkit"


def _offset(size: int, box: int, crop: int) -> int:
    """Where to cut ``box`` out of ``size`` so that centre-cropping ``crop`` from the box takes the very pixels
    that centre-cropping ``crop`` from the whole would (torchvision rounds each centre offset)."""
    whole, inner = int(round((size - crop) / 2.0)), int(round((box - crop) / 2.0))
    return min(max(whole - inner, 0), size - box)


def decode_cover(path: Path, pre: Preprocessing) -> np.ndarray:
    """One image at the cover size (``pre.cover``) as uint8: scaled to cover it, aspect kept, and cut
    to it around the centre, so that the eval transform's centre crop finds the pixels it would have found.

    JPEGs decode at a reduced DCT scale (PIL's ``draft``) when the result still covers twice the box: a
    600x450 original for a 96x128 input decodes at 1/2 scale. At twice the box the resize averages the DCT
    scaling away (0.3 levels of 255 from the full decode on average, measured; at once the box: 2.2).
    Other formats go through ``load_image``.
    """
    height, width = pre.cover
    try:
        with Image.open(path) as image:
            if image.format != "JPEG":
                image = None
            else:
                # EXIF orientations 5-8 turn the picture by 90 degrees: the box's sides swap before the turn.
                turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
                box = (DRAFT_FACTOR * height, DRAFT_FACTOR * width)
                image.draft("RGB", box[::-1] if not turned else box)
                image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise LesionkitError(f"cannot read image {path}: {err}") from None
    if image is None:
        image = load_image(path)
    image = ResizeCover(height, width, InterpolationMode(pre.interpolation))(image)
    top, left = _offset(image.height, height, pre.height), _offset(image.width, width, pre.width)
    return np.asarray(v2.functional.crop(image, top, left, height, width))


def cache_key(paths: list[str], pre: Preprocessing) -> str:
    # The crop matters too: the stored box is placed so that the final centre crop lands where it would.
    digest = hashlib.sha256(f"v{FORMAT_VERSION} {pre.cover} {pre.height}x{pre.width} {pre.interpolation}\n"
                            .encode())
    for path in paths:
        stat = os.stat(path)
        # The real path: the same files reached through a link (../shared from two checkouts) share one cache
        # instead of filling the disk with a 3 GB copy each.
        digest.update(f"{os.path.realpath(path)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


class ImageCache:
    """Read-only view of a built cache: ``image(image_id)`` gives the stored picture as a PIL image.

    The memory map opens lazily in each process, so DataLoader workers share the file through the page cache
    instead of pickling an array.
    """

    def __init__(self, path: Path, ids: list[str]):
        self.path, self.ids = path, ids
        self.rows = {image_id: row for row, image_id in enumerate(ids)}
        self._array = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.rows

    def image(self, image_id: str) -> Image.Image:
        return Image.fromarray(np.array(self.array[self.rows[image_id]]))


def reserve_space(path: Path) -> None:
    """Give the freshly mapped file ``path`` all its disk blocks now. The file starts sparse and would get them
    page by page as the map is written; where the disk ran out on the way, the kernel stopped the process with
    SIGBUS ("Bus error"): no message, and a sparse file of the full size left behind."""
    with open(path, "r+b") as file:
        size = os.fstat(file.fileno()).st_size
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return  # a file system that cannot reserve: the map fills the file as it goes
            raise LesionkitError(f"no room for the image cache ({size / 1e9:.2f} GB) in {path.parent} ({err.strerror}):"
                                 f" free space there, set data.cache_dir to a folder on another disk, or set "
                                 f"data.cache=false to read the images every epoch") from None


def cache_files(frame: pd.DataFrame, pre: Preprocessing, cache_dir: str | Path | None) -> tuple[Path, Path]:
    """Where the cache of ``frame``'s images for ``pre`` lives: the array and its index."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(list(frame.drop_duplicates("image_id")["path"]), pre)
    return cache_dir / f"{key}.npy", cache_dir / f"{key}.json"


def find_cache(frame: pd.DataFrame, pre: Preprocessing, cache_dir: str | Path | None = None) -> ImageCache | None:
    """The built cache of exactly ``frame``'s images (``image_id``, ``path``, in that order) for ``pre``, or None:
    nothing is built. ``lesionkit evaluate`` reads training's this way."""
    return _open_built(*cache_files(frame, pre, cache_dir))


def _open_built(array_path: Path, index_path: Path) -> ImageCache | None:
    if index_path.is_file() and array_path.is_file():  # the index is written last: a complete cache
        return ImageCache(array_path, json.loads(index_path.read_text())["ids"])
    return None


def build_cache(frame: pd.DataFrame, pre: Preprocessing, cache_dir: str | Path | None = None, *,
                workers: int = 8, progress: bool = True) -> ImageCache:
    """Open the cache of ``frame``'s images (``image_id``, ``path``) for ``pre``, building it if needed.

    Threads decode in parallel (PIL releases the GIL while decoding and resizing). The array is written
    under a temporary name and renamed into place, so an interrupted build or two processes building the
    same cache (DDP ranks) never leave a half-written file behind.
    """
    array_path, index_path = cache_files(frame, pre, cache_dir)
    found = _open_built(array_path, index_path)
    if found is not None:
        return found
    frame = frame.drop_duplicates("image_id")
    ids, paths = list(frame["image_id"]), list(frame["path"])
    height, width = pre.cover
    cache_dir, key = array_path.parent, array_path.stem
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LesionkitError(f"cannot create the image cache folder {cache_dir} ({err}): set data.cache_dir to a "
                             f"writable folder, or data.cache=false") from None
    tmp = cache_dir / f"{key}.{os.getpid()}.tmp.npy"
    try:
        # 10,015 images at 272x363x3 are 3.0 GB on disk; the page cache keeps the hot part in memory.
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ids), height, width, 3))
        reserve_space(tmp)
        with ThreadPoolExecutor(workers) as pool:
            decoded = pool.map(lambda p: decode_cover(Path(p), pre), paths)
            for row, pixels in enumerate(tqdm(decoded, total=len(paths), desc=f"Caching images at {width}x{height}",
                                              unit="img", disable=not progress)):
                array[row] = pixels
        array.flush()
        del array
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    index_tmp = cache_dir / f"{key}.{os.getpid()}.tmp.json"
    index_tmp.write_text(json.dumps({"ids": ids, "height": height, "width": width,
                                     "interpolation": pre.interpolation, "version": FORMAT_VERSION}))
    os.replace(index_tmp, index_path)  # the index appears last: its presence means the cache is complete
    return ImageCache(array_path, ids)
