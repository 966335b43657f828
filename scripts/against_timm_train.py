"""Full-network training speed of lesionkit against timm's reference ``train.py`` itself, as timm's users run it.

``lesionkit benchmark`` compares with the training loop of ``train.py`` rebuilt inside its own process, because
timm's wheel does not ship the script. This runs the script: take ``train.py`` from a pytorch-image-models checkout
of the installed timm's release, then

    .venv/bin/python scripts/against_timm_train.py --train-py PATH/TO/train.py \\
        --data-dir ../shared/data/ham10000_fullres_sample

Both sides train the whole network (EfficientNet-B1 by default) at 224x224, batch 32, channels-last, on the same
images, in rounds of alternating order:
- timm: ``train.py`` with its defaults (4 loader workers decoding every JPEG, its prefetcher, SGD with Nesterov
  momentum, label smoothing), on an ImageFolder of links to the images; the images/s come from its own per-step log.
- lesionkit: ``trainer.fit`` of the Lightning module ``lesionkit train`` runs, fed from the image cache, with
  lesionkit's default loader, and freed memory held in the process as every ``lesionkit`` command holds it
  (lesionkit.allocator). ``--timm-held-memory`` gives ``train.py`` the same glibc thresholds, through glibc's own
  environment variables, to see what the rest of the difference is.
Both count from the end of their first step.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lesionkit.bench.against_timm import lesionkit_full_network, training_data
from lesionkit.allocator import HELD, hold_freed_memory
from lesionkit.data.metadata import load_dataset

STEP_TIME = re.compile(r"Time: ([\d.]+)s,")


def image_folder(frame, root: Path, copies: int) -> Path:
    """``root/train/<dx>/`` with ``copies`` links to each image (one epoch of ``train.py`` must outlast the timed
    steps) and ``root/validation/<dx>/`` with one, the layout ``train.py --data-dir`` reads."""
    for split, count in (("train", copies), ("validation", 1)):
        for row in frame.itertuples():
            folder = root / split / row.dx
            folder.mkdir(parents=True, exist_ok=True)
            for copy in range(count):
                (folder / f"{copy}_{row.image_id}.jpg").symlink_to(Path(row.path).resolve())
    return root


def timm_images_per_s(train_py: Path, data: Path, model: str, size: int, batch_size: int, steps: int,
                      device: torch.device, workdir: Path, held_memory: bool) -> float:
    command = [sys.executable, str(train_py.resolve()), "--data-dir", str(data), "--model", model,
               "--num-classes", "7", "--img-size", str(size), "-b", str(batch_size), "--channels-last",
               "--epochs", "1", "--log-interval", "1", "--output", str(workdir / "timm-output")]
    if device.type == "cpu":
        # train.py has no --device flag; the keys of its --config file become argument defaults, and timm's device
        # set-up reads args.device. Its validate() then calls torch.cuda.synchronize() and fails after the epoch,
        # by which time every training step is logged: the exit status is not used.
        config = workdir / "cpu.yaml"
        config.write_text("device: cpu\n")
        command += ["--config", str(config)]
    else:
        command += ["--amp", "--amp-dtype", "bfloat16"]  # as lesionkit's bf16 autocast
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(HELD), "MALLOC_TRIM_THRESHOLD_": str(HELD)} \
        if held_memory else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    times = [float(t) for t in STEP_TIME.findall(result.stdout + result.stderr)][1:steps + 1]
    if len(times) < steps:
        raise SystemExit(f"train.py logged {len(times) + 1} step(s), not {steps + 1}:\n{result.stderr[-3000:]}")
    return batch_size * len(times) / sum(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-py", type=Path, required=True, help="timm's train.py (pytorch-image-models)")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="HAM10000-style folder of the images to train on, e.g. the 600x450 originals")
    parser.add_argument("--model", default="efficientnet_b1")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25, help="timed steps per side and round (default: 25)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timm-held-memory", action="store_true",
                        help="train.py with lesionkit's malloc thresholds too (default: glibc's, as its users run it)")
    args = parser.parse_args()
    if not args.train_py.is_file():
        parser.error(f"--train-py {args.train_py} is not a file: pass timm's train.py from pytorch-image-models")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    held = hold_freed_memory()
    frame = load_dataset(args.data_dir, decode=False).usable
    with tempfile.TemporaryDirectory(prefix="lesionkit-vs-timm-") as tmp:
        tmp = Path(tmp)
        folder = image_folder(frame, tmp / "images", math.ceil((args.steps + 1) * args.batch_size / len(frame)))
        pre, dataset = training_data(frame, args.model, args.size, tmp / "cache")
        sides = {"timm train.py": lambda: timm_images_per_s(args.train_py, folder, args.model, args.size,
                                                            args.batch_size, args.steps, device, tmp,
                                                            args.timm_held_memory),
                 "lesionkit": lambda: lesionkit_full_network(args.model, dataset, pre, args.batch_size, args.steps,
                                                             device)}
        figures = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):  # neither side always first
                figures[side].append(sides[side]())
                print(f"round {round_ + 1}: {side:13s} {figures[side][-1]:6.2f} img/s", flush=True)
    ours, theirs = (statistics.mean(figures[side]) for side in ("lesionkit", "timm train.py"))
    memory = "both held" if held and args.timm_held_memory else "lesionkit's held" if held else "glibc's defaults"
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch_size}, {len(frame)} images from "
          f"{args.data_dir}, {device}, memory {memory}: lesionkit {ours:.2f} img/s, timm train.py {theirs:.2f} "
          f"img/s (means of {args.rounds} rounds); ratio {ours / theirs:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
