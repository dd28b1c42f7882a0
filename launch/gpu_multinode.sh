#!/usr/bin/env bash
# Multi-node GPU training with jax.distributed: one or more processes per node,
# each driving its share of the node's GPUs.
#
# Install once, on storage the nodes share (Python >= 3.11 and the CUDA jax):
#   launch/setup_env.sh cuda12        # or, in a Python >= 3.11 venv:
#   pip install -r requirements.txt "jax[cuda12]==0.10.2"
#
# SLURM, one task per node driving all of the node's GPUs:
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
#     launch/gpu_multinode.sh configs/imagenet_r18.py /shared/runs/imagenet_r18 --config.data_dir=/shared/tfds
# SLURM, T tasks per node (one is enough for ImageNet's input: its data worker
# processes decode outside the training process, docs/performance.md section 1;
# each task starts one worker per CPU of its share, so bind CPUs to tasks,
# e.g. --cpus-per-task, or set --config.data_workers):
#   srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=8 launch/gpu_multinode.sh ...
#   srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=2 launch/gpu_multinode.sh ...
# Batch jobs that requeue themselves after a preemption or a time limit:
# launch/slurm_requeue.sbatch.
#
# Under SLURM, jax alone (--config.distributed_init=True) would give each
# process the one GPU numbered SLURM_LOCALID; this script passes the GPUs each
# task drives as --local_device_ids instead, by this rule:
#   * ids are the task's own CUDA numbers: CUDA renumbers the GPUs listed in
#     CUDA_VISIBLE_DEVICES (which SLURM sets for each task) from 0, so a task
#     that sees k GPUs names them 0..k-1, whatever their numbers on the node.
#   * a task bound to its own GPUs (--gpus-per-task, --gpu-bind or
#     --tres-bind: its CUDA_VISIBLE_DEVICES lists fewer GPUs than the node
#     gives the step, SLURM_GPUS_ON_NODE) drives all it sees: 0..k-1.
#   * tasks that each see all of the node's N GPUs (--gpus-per-node or
#     --gres=gpu:N without binding) split them: the T tasks of the node take
#     N/T each, task SLURM_LOCALID the group SLURM_LOCALID (T from
#     SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE for this node).
#   * k comes from CUDA_VISIBLE_DEVICES, else from SLURM_STEP_GPUS (also the
#     task's own), else nvidia-smi; N from SLURM_GPUS_ON_NODE, else k.
#     (SLURM_JOB_GPUS is the batch node's list, not this node's: unused.)
#   LOCAL_DEVICE_IDS=0,1,... overrides the rule.
#
# By hand (no SLURM): on every node, with node0's address and this node's rank:
#   COORDINATOR=node0:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multinode.sh CONFIG WORKDIR ...
#   COORDINATOR=node0:1234 NUM_PROCESSES=2 PROCESS_ID=1 launch/gpu_multinode.sh CONFIG WORKDIR ...
# Each process then drives every GPU it sees (CUDA_VISIBLE_DEVICES restricts that).
#
# config.batch_size is the global batch, split over all GPUs of all nodes. The
# workdir and data_dir must be on storage every node sees. Exit status 75 means
# preempted and saved (SIGTERM to any process; SIGUSR1 too with
# --preemption_signals=TERM,USR1): start the same command again to resume.
# PYTHON is the interpreter (default: the active venv's, else the checkout's
# .venv, else python3); it must be Python >= 3.11 with the pinned jax and the
# CUDA jax where the machine has an NVIDIA GPU (launch/common.sh checks;
# JAX_PLATFORMS=cpu skips the CUDA check).
# DRY_RUN=1 prints the command only.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: gpu_multinode.sh CONFIG WORKDIR [--config.field=value ...]"
config=${1:?$usage}
workdir=${2:?$usage}
shift 2

# Entries of a comma-separated list ("" -> 0).
count_list() {
  local IFS=, items
  read -r -a items <<< "$1"
  echo ${#items[@]}
}

# Tasks of this step on this node: SLURM writes per-node counts as "4(x2),2".
tasks_on_this_node() {
  local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
  local node=${SLURM_NODEID:-0} part count repeat IFS=,
  local -a per_node=()
  for part in $spec; do
    count=${part%%(*}
    repeat=1
    [[ $part == *"(x"*")" ]] && { repeat=${part#*(x}; repeat=${repeat%)}; }
    while (( repeat-- > 0 )); do per_node+=("$count"); done
  done
  (( node < ${#per_node[@]} )) || node=$(( ${#per_node[@]} - 1 ))
  echo "${per_node[$node]}"
}

# The --local_device_ids of this SLURM task (the rule in the header).
slurm_local_device_ids() {
  local seen node tasks rank per
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    seen=$(count_list "$CUDA_VISIBLE_DEVICES")
  elif [[ -n ${SLURM_STEP_GPUS:-} ]]; then
    seen=$(count_list "$SLURM_STEP_GPUS")
  else
    seen=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  node=${SLURM_GPUS_ON_NODE:-$seen}
  node=${node##*:}  # a "type:count" spelling
  [[ $seen =~ ^[0-9]+$ && $seen -gt 0 ]] || seen=$node
  if ! [[ $seen =~ ^[0-9]+$ && $seen -gt 0 && $node =~ ^[0-9]+$ ]]; then
    echo "error: this SLURM task sees no GPU (CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS," \
         "SLURM_GPUS_ON_NODE and nvidia-smi give none). Ask for GPUs (srun" \
         "--gpus-per-node=N or --gpus-per-task=N), or set LOCAL_DEVICE_IDS=0,1,..." >&2
    exit 2
  fi
  if (( seen < node )); then  # bound to its own GPUs
    seq -s, 0 $((seen - 1))
    return
  fi
  tasks=$(tasks_on_this_node)
  rank=${SLURM_LOCALID:-0}
  if ! [[ $tasks =~ ^[0-9]+$ && $tasks -gt 0 && $((seen % tasks)) -eq 0 ]]; then
    echo "error: the $seen GPUs this node's tasks all see do not split evenly over its" \
         "$tasks tasks. Use an --ntasks-per-node that divides $seen, bind GPUs to tasks" \
         "(--gpus-per-task), or set LOCAL_DEVICE_IDS=0,1,..." >&2
    exit 2
  fi
  per=$((seen / tasks))
  seq -s, $((rank * per)) $((rank * per + per - 1))
}

python=$(default_python)
check_python "$python" gpu
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cmd=("$python" -m ovsw_jax.main --config="$config" --workdir="$workdir")
if [[ -n ${COORDINATOR:-} || -n ${NUM_PROCESSES:-} || -n ${PROCESS_ID:-} ]]; then
  cmd+=(--coordinator_address="${COORDINATOR:?set COORDINATOR=host:port}"
        --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
        --process_id="${PROCESS_ID:?set PROCESS_ID}")
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
  ids=${LOCAL_DEVICE_IDS:-$(slurm_local_device_ids)}
  echo "gpu_multinode.sh: SLURM task ${SLURM_PROCID:-?} (node ${SLURM_NODEID:-?}," \
       "local ${SLURM_LOCALID:-?}, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})" \
       "drives GPUs $ids" >&2
  cmd+=(--config.distributed_init=True --local_device_ids="$ids")
else
  echo "error: neither SLURM (SLURM_JOB_ID) nor COORDINATOR/NUM_PROCESSES/PROCESS_ID is set;" \
       "see the header of launch/gpu_multinode.sh." >&2
  exit 2
fi
cmd+=("$@")
if [[ -n ${DRY_RUN:-} ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
