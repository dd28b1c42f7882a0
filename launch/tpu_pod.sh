#!/usr/bin/env bash
# TPU pod training: run the same command on every worker of a TPU VM pod slice.
#
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="
#     cd ovsw_jax && pip install -r requirements.txt 'jax[tpu]==0.10.2' &&
#     launch/tpu_pod.sh configs/imagenet_r18.py gs://BUCKET/runs/imagenet_r18 --config.data_dir=gs://BUCKET/tfds"
#
# jax.distributed.initialize() discovers the pod's workers by itself. The workdir
# and the tfds data_dir should be a GCS bucket every worker can read and write.
set -euo pipefail
config=${1:?usage: tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]}
workdir=${2:?usage: tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]}
shift 2
exec python -m ovsw_jax.main --config="$config" --workdir="$workdir" \
  --config.distributed_init=True "$@"
