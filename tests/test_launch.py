"""The launch scripts build the right command for SLURM, by-hand and TPU-pod runs (DRY_RUN)."""

import os
import subprocess

import pytest

from helpers import ROOT


def dry_run(script, env_extra, *args):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in ("COORDINATOR", "NUM_PROCESSES",
                                                      "PROCESS_ID", "LOCAL_DEVICE_IDS")}
  env.update(DRY_RUN="1", PYTHON="python", **env_extra)
  return subprocess.run(["bash", str(ROOT / "launch" / script), "configs/imagenet_r18.py",
                         "/runs/r18", *args], env=env, capture_output=True, text=True)


def test_slurm_one_process_per_node_drives_all_its_gpus():
  out = dry_run("gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8"},
                "--config.batch_size=512")
  assert out.returncode == 0, out.stderr
  assert r"--local_device_ids=0\,1\,2\,3\,4\,5\,6\,7" in out.stdout
  assert "--config.distributed_init=True" in out.stdout
  assert out.stdout.strip().endswith("--config.batch_size=512")


def test_slurm_typed_gpu_count_and_explicit_ids():
  out = dry_run("gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "a100:4"})
  assert r"--local_device_ids=0\,1\,2\,3 " in out.stdout
  out = dry_run("gpu_multinode.sh", {"SLURM_JOB_ID": "7", "LOCAL_DEVICE_IDS": "2,3"})
  assert r"--local_device_ids=2\,3 " in out.stdout


def test_by_hand_passes_the_three_flags():
  out = dry_run("gpu_multinode.sh", {"COORDINATOR": "node0:1234", "NUM_PROCESSES": "2",
                                     "PROCESS_ID": "1"})
  assert out.returncode == 0, out.stderr
  for flag in ("--coordinator_address=node0:1234", "--num_processes=2", "--process_id=1"):
    assert flag in out.stdout
  assert "distributed_init" not in out.stdout


@pytest.mark.parametrize("env,message", [
    ({}, "neither SLURM"),
    ({"COORDINATOR": "node0:1234"}, "NUM_PROCESSES"),
])
def test_incomplete_environment_is_a_clear_error(env, message):
  out = dry_run("gpu_multinode.sh", env)
  assert out.returncode != 0
  assert message in out.stderr


def test_tpu_pod_lets_jax_detect_the_pod():
  out = dry_run("tpu_pod.sh", {}, "--config.data_dir=gs://b/tfds")
  assert out.returncode == 0, out.stderr
  assert "--config.distributed_init=True --config.data_dir=gs://b/tfds" in out.stdout


@pytest.mark.parametrize("tasks,rank,ids", [
    ("4", "0", r"0\,1"), ("4", "3", r"6\,7"), ("8(x2)", "5", "5"), ("2", "1", r"4\,5\,6\,7")])
def test_slurm_several_tasks_per_node_split_the_gpus(tasks, rank, ids):
  out = dry_run("gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8",
                                     "SLURM_TASKS_PER_NODE": tasks, "SLURM_LOCALID": rank})
  assert out.returncode == 0, out.stderr
  assert f"--local_device_ids={ids} " in out.stdout


def test_slurm_uneven_split_is_a_clear_error():
  out = dry_run("gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8",
                                     "SLURM_NTASKS_PER_NODE": "3", "SLURM_LOCALID": "0"})
  assert out.returncode == 2
  assert "do not split evenly over 3 tasks" in out.stderr
