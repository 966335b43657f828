#!/usr/bin/env bash
# Speed check on a lent GPU machine: the benchmark table, then one full reference run with its wall time.
#
# Here, once:   .venv/bin/python scripts/pack_device_data.py --data PATH/TO/ham10000
#               (fills the git-ignored .device-data/, ~61 MiB with the 200x150 copy)
# There:        the device tool's run with command "bash scripts/gpu_check.sh", carry [".device-data"],
#               timeout_s 600. Results (8 small files) land in $OUT.
#
# The GPU image brings torch 2.11, timm, lightning, torchmetrics, onnxruntime, pandas and scikit-learn and
# reaches no network: lesionkit installs without dependencies, and the Lite1 weights come as a file.
#
# The full run is configs/lite1-offline.yaml with those weights: real transfer learning. B1's ImageNet weights
# cannot reach that machine, so the reference recipe itself can be timed only from random weights, with early
# stopping off so that every epoch runs (its accuracy then means nothing):
#   CONFIG=configs/b1.yaml WEIGHTS=none \
#   TRAIN_FLAGS="--set train.phases.0.patience=null --set train.phases.1.patience=null" bash scripts/gpu_check.sh
#
# The GPU recipe and its five-fold ensemble (docs/accuracy.md), one device call each, without the benchmark:
#   BENCH=0 CONFIG=configs/gpu-best.yaml bash scripts/gpu_check.sh
#   BENCH=0 CONFIG=configs/gpu-best.yaml TRAIN_FLAGS="--folds 5" bash scripts/gpu_check.sh
set -euo pipefail
OUT=${OUT:-gpu-check-out}
DATA=${DATA:-.device-data/ham10000}
CONFIG=${CONFIG:-configs/lite1-offline.yaml}
WEIGHTS=${WEIGHTS:-.device-data/lite1.safetensors}
RUN=${RUN:-/tmp/lesionkit-reference}
BENCH=${BENCH:-1}              # 0 skips the benchmark
BENCH_FLAGS=${BENCH_FLAGS:-}   # e.g. "--quick" to try the script out
TRAIN_FLAGS=${TRAIN_FLAGS:-}   # e.g. "--set data.per_class_limit=5"
mkdir -p "$OUT"

# Installed unless lesionkit already imports from this checkout (as after `make install`). No build isolation:
# it would fetch setuptools from the network. The source tree works as a fallback.
imported_from=$(python -c 'import lesionkit, os; print(os.path.realpath(lesionkit.__file__))' 2>/dev/null || true)
if [ "$imported_from" != "$(pwd -P)/src/lesionkit/__init__.py" ]; then
  python -m pip install --quiet --no-deps --no-build-isolation -e . ||
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
python - <<'PY' | tee "$OUT/environment.txt"
import importlib.util, os, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "|", os.cpu_count(), "CPU cores")
wanted = ("timm", "lightning", "torchmetrics", "sklearn", "scipy", "pandas", "PIL", "yaml", "tqdm", "safetensors",
          "matplotlib", "markdown", "onnx", "onnxruntime")
print("missing modules:", [m for m in wanted if importlib.util.find_spec(m) is None] or "none")
PY

# The benchmark on generated 600x450 JPEGs (the originals' size); onnx figures are skipped without the onnx package.
if [ "$BENCH" != 0 ]; then
  python -m lesionkit benchmark $BENCH_FLAGS --out "$OUT/benchmark.json" | tee "$OUT/benchmark.txt"
fi

rm -rf "$RUN"
start=$(date +%s)
status=0
python -m lesionkit train --config "$CONFIG" --data-dir "$DATA" --out "$RUN" --allow-missing \
    --weights "$WEIGHTS" $TRAIN_FLAGS 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$OUT/train.log" || status=$?
end=$(date +%s)
echo "full run ($CONFIG, weights $WEIGHTS $TRAIN_FLAGS, $DATA): exit $status, wall time $((end - start)) s" \
    | tee -a "$OUT/benchmark.txt"
cp "$RUN/metrics.csv" "$RUN/report.json" "$RUN/report.md" "$RUN/cv.json" "$OUT/" 2>/dev/null || true
# The held-out test part's report, where the recipe sets one aside (a --folds run's ensemble writes RUN/test/).
[ -f "$RUN/test/report.json" ] && cp "$RUN/test/report.json" "$OUT/test-report.json"
[ -f "$RUN/test/report.md" ] && cp "$RUN/test/report.md" "$OUT/test-report.md"
exit $status
