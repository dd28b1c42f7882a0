#!/usr/bin/env bash
# The accelerator checks of docs/performance.md in one run, for a GPU (or TPU) host:
#   1. ResNet-18 ImageNet train step, batch 256, vanilla and OvSW, float32 and
#      bfloat16 (images/s, OvSW's share, bfloat16 speed-up, compile time apart);
#   2. the ImageNet input pipeline on this host's CPUs (images/s, CPU-ms and
#      GIL-ms per image, train and eval, data workers against the in-process
#      pipeline, the one-process ceiling), on a synthetic JPEG set it writes
#      itself under DATA_DIR.
#
#   benchmarks/accelerator.sh [OUT_DIR]       # figures to OUT_DIR (default: bench_out)
#
# Needs a jaxlib for the accelerator (e.g. pip install "jax[cuda12]==0.10.2").
# Every part runs under `timeout -k`, so a hung one cannot stall the rest;
# STEP_TIMEOUT and PIPELINE_TIMEOUT (seconds) bound them. BATCH, ROUNDS,
# IMAGES and PIPELINE_BATCH change the sizes (defaults 256, 10, 2000, 256); the
# data workers are the default (one a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
python=${PYTHON:-python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
{
  date -u
  "$python" -c "import jax; print(jax.__version__, jax.devices())"
  nvidia-smi -L 2>/dev/null || true
  echo "CPUs: $(nproc)"
} > "$out/host.txt" 2>&1
cat "$out/host.txt"

timeout -k 30 "${STEP_TIMEOUT:-900}" "$python" -m benchmarks.train_step \
  --model=resnet18 --batch="${BATCH:-256}" --steps="${ROUNDS:-10}" --repeats=1 \
  --arms=vanilla,ovsw,vanilla-bf16,ovsw-bf16 2>&1 | tee "$out/train_step_resnet18.txt"
echo "train step: exit ${PIPESTATUS[0]}"

timeout -k 30 "${PIPELINE_TIMEOUT:-900}" "$python" -m benchmarks.input_pipeline \
  --images="${IMAGES:-2000}" --batch="${PIPELINE_BATCH:-256}" --batches=8 --repeats=2 \
  --project_cpus="$(nproc)" --data_dir="${DATA_DIR:-/tmp/ovsw_synthetic_jpegs}" \
  2>&1 | tee "$out/input_pipeline.txt"
echo "input pipeline: exit ${PIPESTATUS[0]}"
