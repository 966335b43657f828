"""Make the model lesionkit ships under ``models/`` from a finished run, in one command:

    python scripts/ship_model.py runs/cpu-best-unfreeze5 --data-dir ../shared/data/ham10000

1. the run's best checkpoint, slimmed (float16 weights, no optimizer state), becomes
   ``models/lesionkit-lite1.ckpt``;
2. its calibration record (temperature, conformal scores, out-of-distribution detector, melanoma referral) is
   fitted on the run's validation part, as training does, into ``models/temperature.json``;
3. it is exported to ONNX and quantised to float16 (``lesionkit export --quantize fp16``) as
   ``models/lesionkit-lite1.onnx``, which carries the record;
4. the float32 export and the float16 one are measured on the same validation images (balanced accuracy) and on
   one image at a time (latency, interleaved in this process);
5. where the run's split holds a test part, the slim checkpoint is measured on it, once, into
   ``models/test/report.json`` (nothing is chosen from it: the run is already chosen, the record already fitted);
6. the run's ``config.yaml``, ``provenance.json`` and ``split.csv`` and the slim checkpoint's reports make
   ``models/`` a run folder that ``lesionkit card models`` describes: ``MODEL_CARD.md``.

It prints the figures that ``docs/shipped-model.md`` records. Nothing is written outside ``--out`` but a
temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkit.cli import main as lesionkit
from lesionkit.model.checkpoint import slim_checkpoint
from lesionkit.model.shipped import CHECKPOINT

RUN_FILES = ("config.yaml", "provenance.json", "split.csv")
NAME = "lesionkit-lite1, the model shipped with lesionkit"


def run(command: list[str]) -> None:
    print("$ lesionkit " + " ".join(command), flush=True)
    if lesionkit(command) != 0:
        sys.exit(f"lesionkit {command[0]} failed")


def latency_ms(paths: list[Path], rounds: int = 30) -> dict[str, float]:
    """Median milliseconds of one (blank) image through each export, the exports taking turns."""
    from lesionkit.serve.onnx_classifier import OnnxClassifier

    served = {path.name: OnnxClassifier(path) for path in paths}
    pre = next(iter(served.values())).preprocessing
    image = np.zeros((3, pre.height, pre.width), np.float32)
    times = {name: [] for name in served}
    for _ in range(rounds):
        for name, classifier in served.items():
            start = time.perf_counter()
            classifier.logits(image[None])
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN")
    parser.add_argument("--data-dir", type=Path, required=True, help="the HAM10000 folder the run trained on")
    parser.add_argument("--out", type=Path, default=CHECKPOINT.parent, help="default: models/ of this source tree")
    args = parser.parse_args()
    out, checkpoint = args.out, args.out / CHECKPOINT.name
    out.mkdir(parents=True, exist_ok=True)
    slim_checkpoint(args.run_dir / "checkpoints" / "best.ckpt", checkpoint)
    split_file = args.run_dir / "split.csv"
    evaluate = ["evaluate", "--data-dir", str(args.data_dir), "--split-file", str(split_file), "--allow-missing"]
    val = [*evaluate, "--split", "val"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run([*val, "--checkpoint", str(checkpoint), "--fit-temperature", "--out", str(work / "slim")])
        float32 = work / "float32.onnx"
        run(["export", "--checkpoint", str(checkpoint), "--out", str(float32)])
        exported = checkpoint.with_suffix(".onnx")
        shutil.copy(float32, exported)
        run(["export", "--checkpoint", str(checkpoint), "--out", str(exported), "--quantize", "fp16"])
        figures = {}
        for name, model in (("float32 export", float32), ("float16 export", exported)):
            run([*val, "--checkpoint", str(model), "--bootstrap", "0", "--out", str(work / model.stem)])
            figures[name] = json.loads((work / model.stem / "report.json").read_text())
        figures["slim checkpoint"] = json.loads((work / "slim" / "report.json").read_text())
        shutil.copy(work / "slim" / "report.json", out / "report.json")
        if (pd.read_csv(split_file, usecols=["split"])["split"] == "test").any():
            run([*evaluate, "--split", "test", "--checkpoint", str(checkpoint), "--out", str(work / "test")])
            (out / "test").mkdir(exist_ok=True)
            shutil.copy(work / "test" / "report.json", out / "test" / "report.json")
            figures["slim checkpoint, test part"] = json.loads((work / "test" / "report.json").read_text())
        else:
            shutil.rmtree(out / "test", ignore_errors=True)  # a previous model's test report is not this one's
        latency = latency_ms([float32, exported])
    for name in RUN_FILES:
        shutil.copy(args.run_dir / name, out / name)
    run(["card", str(out), "--out", str(out / "MODEL_CARD.md"), "--name", NAME])
    print(f"\n{'what':<28}balanced accuracy  macro AUC  melanoma sensitivity")
    for name, report in figures.items():
        print(f"{name:<28}{report['balanced_accuracy']:>17.4f}{report['macro_auc']:>11.4f}"
              f"{report['melanoma_sensitivity']:>22.4f}")
    print("one image: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in latency.items()))
    print("files: " + ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in sorted(out.iterdir())
                                if p.is_file()))


if __name__ == "__main__":
    main()
