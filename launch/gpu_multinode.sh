#!/usr/bin/env bash
# Multi-node GPU training with jax.distributed: one or more processes per node,
# each driving its share of the node's GPUs.
#
# SLURM (jax reads the coordinator, process count and rank from SLURM's variables):
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh configs/imagenet_r18.py /shared/runs/imagenet_r18 --config.data_dir=/shared/tfds
# With --ntasks-per-node=T the node's N GPUs are split into T equal groups and
# task SLURM_LOCALID drives group SLURM_LOCALID (--local_device_ids; N from
# SLURM_GPUS_ON_NODE, else the count nvidia-smi lists; set LOCAL_DEVICE_IDS=0,1,...
# to choose). More tasks per node means more input pipelines: one process's
# ImageNet pipeline holds the GIL about 0.3 ms per image (docs/performance.md),
# about 3,000 images/s, so a node that trains faster than that wants T = 2-8.
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
    tasks=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
    tasks=${tasks%%[(,]*}  # SLURM may write "4(x2)" or "4,2"
    rank=${SLURM_LOCALID:-0}
    [[ $tasks =~ ^[0-9]+$ && $tasks -gt 0 && $((n % tasks)) -eq 0 ]] || { echo "gpu_multinode.sh: $n GPUs per node do not split evenly over $tasks tasks per node; use --ntasks-per-node dividing $n, or set LOCAL_DEVICE_IDS" >&2; exit 2; }
    per=$((n / tasks))
    LOCAL_DEVICE_IDS=$(seq -s, $((rank * per)) $((rank * per + per - 1)))
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
