#!/usr/bin/env bash
# TPU pod training: run the same command on every worker of a TPU VM pod slice.
#
# Stock TPU VM images (Ubuntu 22.04) have Python 3.10; the pinned jax 0.10.2
# needs >= 3.11. Once per pod slice (and again after it is recreated), make
# the checkout's .venv on every worker: launch/setup_env.sh takes a Python
# >= 3.11 from PATH, else installs uv (pip install --user uv) and lets
# `uv venv --python 3.11` fetch one, then installs requirements.txt and
# "jax[tpu]==0.10.2":
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
#     git clone REPO ovsw_jax && cd ovsw_jax && launch/setup_env.sh tpu"
# Then train (this script runs .venv/bin/python by default):
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
#     cd ovsw_jax && launch/tpu_pod.sh configs/imagenet_r18.py gs://BUCKET/runs/imagenet_r18 --config.data_dir=gs://BUCKET/tfds"
#
# jax.distributed.initialize() discovers the pod's workers by itself (one process
# per worker, all its TPU chips). config.batch_size is the global batch over all
# chips. The workdir and the tfds data_dir should be a GCS bucket every worker
# can read and write. A maintenance event signals workers with SIGTERM: all of
# them save the same step and exit 75; run the same command again to resume.
# A preempted (spot) TPU VM loses its disk: recreate it, run setup_env.sh
# again, then the same command; it resumes from the checkpoints in the bucket.
# PYTHON is the interpreter (default: the active venv's, else the checkout's
# .venv, else python3); it must be Python >= 3.11 with the pinned jax and
# libtpu (launch/common.sh checks). DRY_RUN=1 prints the command only.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
python=$(default_python)
check_python "$python" tpu
cmd=("$python" -m ovsw_jax.main --config="$config" --workdir="$workdir"
     --config.distributed_init=True "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
