"""The lever ablation of docs/accuracy.md: each lever on top of configs/lite1-cpu.yaml, one run each, on one
lesion-grouped split with a held-out test part that no arm measures, then `lesionkit compare` on validation.

    python scripts/ablation.py --data-dir ../shared/data/ham10000 --out runs/ablation [--arms base focal ...]
        [--set KEY=VALUE ...]

Every arm gets the same budget: the base recipe with ``--set`` applied to all (docs/accuracy.md names the
shortening used). Arms already finished are skipped, so the script resumes an interrupted ablation. Each arm's
wall time goes to OUT/times.csv.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

BASE = "configs/lite1-cpu.yaml"
# Held out once for the whole ablation, never measured by an arm (split.evaluate_test=false).
SPLIT = ["split.test_fraction=0.15", "split.seed=42", "split.evaluate_test=false"]
ARMS = {
    "base": [],
    "focal": ["train.loss=focal"],
    "sampler": ["data.sampler=balanced", "train.class_weights=none"],
    "ema": ["train.ema=0.998"],
    "attention": ["model.pool=attention"],
    "metadata": ["model.metadata=[age,sex,localization]"],
    "mixup": ["augment.mixup=0.2"],
    "sqrt-weights": ["train.class_weights=sqrt"],
    "llrd": ["train.phases.1.unfreeze=-1", "train.phases.1.lr_decay=0.7"],
    "lite0": ["model.name=tf_efficientnet_lite0", "model.weights=lite0"],
    "lite2": ["model.name=tf_efficientnet_lite2", "model.weights=lite2"],
    "label-smoothing": ["train.label_smoothing=0.1"],
    # Half the imbalance by oversampling, half by weights: square root of each, together about balanced.
    "sqrt-sampler": ["data.sampler=sqrt", "train.class_weights=sqrt"],
    # Any orientation (a lesion has none), wider zoom, and colour jitter as the ISIC winners' pipelines have it.
    "strong-aug": ["augment.rotation=180", "augment.zoom=0.2", "augment.brightness=0.2", "augment.contrast=0.2",
                   "augment.saturation=0.2", "augment.hue=0.02"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                        help="applied to every arm (the shared budget)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times = args.out / "times.csv"
    for arm in args.arms:
        run = args.out / arm
        if (run / "report.json").is_file():
            print(f"{arm}: done already", flush=True)
            continue
        overrides = [*SPLIT, *args.common, *ARMS[arm]]
        command = [sys.executable, "-m", "lesionkit", "train", "--config", BASE, "--data-dir", str(args.data_dir),
                   "--out", str(run), "--allow-missing", *(f"--set={o}" for o in overrides)]
        if (run / "checkpoints" / "last.ckpt").is_file():
            command = [sys.executable, "-m", "lesionkit", "train", "--out", str(run), "--resume"]
        print(f"{arm}: {' '.join(overrides)}", flush=True)
        start = time.monotonic()
        with (args.out / f"{arm}.log").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        minutes = (time.monotonic() - start) / 60
        print(f"{arm}: exit {done.returncode} after {minutes:.1f} min", flush=True)
        new = not times.is_file()
        with times.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["arm", "overrides", "minutes", "exit"])
            writer.writerow([arm, " ".join(ARMS[arm]), f"{minutes:.1f}", done.returncode])
    finished = [str(args.out / arm) for arm in ARMS if (args.out / arm / "report.json").is_file()]
    if len(finished) > 1:
        subprocess.run([sys.executable, "-m", "lesionkit", "compare", *finished, "--out",
                        str(args.out / "comparison.csv")])


if __name__ == "__main__":
    main()
