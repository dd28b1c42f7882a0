#!/usr/bin/env bash
# Multi-node GPU training with jax.distributed (one process per node, all its GPUs).
#
# Under SLURM (jax.distributed.initialize() reads the SLURM environment):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh configs/imagenet_r18.py /shared/runs/imagenet_r18 --config.data_dir=/shared/tfds
# Without SLURM, run on every node with the coordinator's address and this node's rank:
#   JAX_COORDINATOR_ADDRESS=node0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 launch/gpu_multinode.sh ...
# The workdir and data_dir must be on storage every node sees. The global batch
# (config.batch_size) is split over all GPUs of all nodes.
set -euo pipefail
config=${1:?usage: gpu_multinode.sh CONFIG WORKDIR [--config.field=value ...]}
workdir=${2:?usage: gpu_multinode.sh CONFIG WORKDIR [--config.field=value ...]}
shift 2
# GPU jaxlib of the pinned version: pip install -r requirements.txt "jax[cuda12]==0.10.2"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m ovsw_jax.main --config="$config" --workdir="$workdir" \
  --config.distributed_init=True "$@"
