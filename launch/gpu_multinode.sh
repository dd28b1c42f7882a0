#!/usr/bin/env bash
# Multi-node GPU training with jax.distributed: one process per node, driving all its GPUs.
#
# SLURM (jax reads the coordinator, process count and rank from SLURM's variables):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh configs/imagenet_r18.py /shared/runs/imagenet_r18 --config.data_dir=/shared/tfds
# Under SLURM jax gives each process only the GPU numbered SLURM_LOCALID, so this
# script passes --local_device_ids=0,...,N-1 with N = SLURM_GPUS_ON_NODE (else the
# count nvidia-smi lists; set LOCAL_DEVICE_IDS=0,1,... to choose).
#
# By hand (no SLURM): on every node, with node0's address and this node's rank:
#   COORDINATOR=node0:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multinode.sh CONFIG WORKDIR ...
#   COORDINATOR=node0:1234 NUM_PROCESSES=2 PROCESS_ID=1 launch/gpu_multinode.sh CONFIG WORKDIR ...
# Each process then drives every GPU it sees (CUDA_VISIBLE_DEVICES restricts that).
#
# config.batch_size is the global batch, split over all GPUs of all nodes. The
# workdir and data_dir must be on storage every node sees. Exit status 75 means
# preempted and saved (SIGTERM to any node): requeue the same command to resume.
# PYTHON (default: python) is the interpreter; DRY_RUN=1 prints the command only.
set -euo pipefail
usage="usage: gpu_multinode.sh CONFIG WORKDIR [--config.field=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
# GPU jaxlib of the pinned version: pip install -r requirements.txt "jax[cuda12]==0.10.2"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cmd=(${PYTHON:-python} -m ovsw_jax.main --config="$config" --workdir="$workdir")
if [[ -n ${COORDINATOR:-} || -n ${NUM_PROCESSES:-} || -n ${PROCESS_ID:-} ]]; then
  cmd+=(--coordinator_address="${COORDINATOR:?set COORDINATOR=host:port}"
        --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
        --process_id="${PROCESS_ID:?set PROCESS_ID}")
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
  if [[ -z ${LOCAL_DEVICE_IDS:-} ]]; then
    n=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    n=${n##*:}  # SLURM may write "type:count"
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || { echo "gpu_multinode.sh: no GPU count (SLURM_GPUS_ON_NODE, nvidia-smi); set LOCAL_DEVICE_IDS=0,1,..." >&2; exit 2; }
    LOCAL_DEVICE_IDS=$(seq -s, 0 $((n - 1)))
  fi
  cmd+=(--config.distributed_init=True --local_device_ids="$LOCAL_DEVICE_IDS")
else
  echo "gpu_multinode.sh: neither SLURM (SLURM_JOB_ID) nor COORDINATOR/NUM_PROCESSES/PROCESS_ID is set; see the header of this script." >&2
  exit 2
fi
cmd+=("$@")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
