#!/usr/bin/env bash
# TPU pod training: run the same command on every worker of a TPU VM pod slice.
#
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
#     cd ovsw_jax && pip install -r requirements.txt 'jax[tpu]==0.10.2' &&
#     launch/tpu_pod.sh configs/imagenet_r18.py gs://BUCKET/runs/imagenet_r18 --config.data_dir=gs://BUCKET/tfds"
#
# jax.distributed.initialize() discovers the pod's workers by itself (one process
# per worker, all its TPU chips). config.batch_size is the global batch over all
# chips. The workdir and the tfds data_dir should be a GCS bucket every worker
# can read and write. A maintenance event signals workers with SIGTERM: all of
# them save the same step and exit 75; run the same command again to resume.
# PYTHON (default: python) is the interpreter; DRY_RUN=1 prints the command only.
set -euo pipefail
usage="usage: tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
cmd=(${PYTHON:-python} -m ovsw_jax.main --config="$config" --workdir="$workdir"
     --config.distributed_init=True "$@")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
