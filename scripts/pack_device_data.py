"""Prepare ``.device-data/`` (git-ignored) for ``scripts/gpu_check.sh`` on a lent GPU machine, which reaches
no network and receives at most 64 MiB with the working tree:

- ``ham10000/``: the metadata and images of the 200x150 copy (40 MiB of files; its two absent images stay absent);
- ``lite1.safetensors``: the offline ImageNet EfficientNet-Lite1 weights under timm's names (21 MiB), so the
  machine needs neither the weights package nor a hub (``--weights .device-data/lite1.safetensors``).

Usage: ``.venv/bin/python scripts/pack_device_data.py --data PATH/TO/ham10000``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import save_file

from lesionkit.data.metadata import METADATA_NAME
from lesionkit.data.images import IMAGE_SUFFIXES
from lesionkit.model.weights import lite_state_dict

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="HAM10000 folder to copy, e.g. the 200x150 copy (at most 64 MiB travel)")
    parser.add_argument("--out", type=Path, default=ROOT / ".device-data")
    args = parser.parse_args()
    target = args.out / "ham10000"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(args.data / METADATA_NAME, target / METADATA_NAME)
    for path in sorted(args.data.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            (target / path.parent.relative_to(args.data)).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.relative_to(args.data))
    save_file({k: v.contiguous() for k, v in lite_state_dict("lite1").items()}, str(args.out / "lite1.safetensors"))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB (the device carries at most 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
