"""The launch scripts: the command each layout gets (DRY_RUN), the Python check, the requeue job.

Bash only: the interpreter, nvidia-smi, srun and scontrol are small fake scripts, so
these tests start no Python and take milliseconds each.
"""

import os
import re
import signal
import subprocess
import time

import pytest

from helpers import ROOT

PIN = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
CLEARED = ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES",
           "JAX_PLATFORMS", "VIRTUAL_ENV", "PYTHON", "DRY_RUN", "MAX_REQUEUES")
# What launch/common.sh's probe prints for each fake interpreter.
PYTHONS = {
    "py_gpu": f"3.11 jax={PIN} jaxlib={PIN} jax-cuda12-plugin={PIN} jax-cuda13-plugin=- libtpu=-",
    "py_tpu": f"3.12 jax={PIN} jaxlib={PIN} jax-cuda12-plugin=- jax-cuda13-plugin=- libtpu=0.0.42",
    "py_cpu": f"3.11 jax={PIN} jaxlib={PIN} jax-cuda12-plugin=- jax-cuda13-plugin=- libtpu=-",
    "py_old_jax": "3.11 jax=0.4.30 jaxlib=0.4.30 jax-cuda12-plugin=- jax-cuda13-plugin=- libtpu=-",
    "py310": "3.10 jax=- jaxlib=- jax-cuda12-plugin=- jax-cuda13-plugin=- libtpu=-",
    "py_broken": None,  # cannot run
}


def write_script(path, text):
  path.write_text("#!/bin/bash\n" + text)
  path.chmod(0o755)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
  """A bin folder: fake interpreters, and an nvidia-smi listing FAKE_NVIDIA_GPUS GPUs."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for name, line in PYTHONS.items():
    write_script(bin_dir / name, f"echo '{line}'\n" if line else "exit 127\n")
  write_script(bin_dir / "nvidia-smi",
               'for ((i = 0; i < ${FAKE_NVIDIA_GPUS:-0}; i++)); do echo "GPU $i: H100 (UUID: x)"; '
               "done\n")
  return bin_dir


def script_env(fakes, python, env_extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in CLEARED}
  env.update(PATH=f"{fakes}:{os.environ['PATH']}", DRY_RUN="1", **env_extra)
  if python is not None:
    env["PYTHON"] = str(fakes / python)
  return env


def dry_run(fakes, script, env_extra, *args, python="py_gpu"):
  return subprocess.run(["bash", str(ROOT / "launch" / script), "configs/imagenet_r18.py",
                         "/runs/r18", *args], env=script_env(fakes, python, env_extra),
                        capture_output=True, text=True, timeout=60)


def device_ids(out):
  assert out.returncode == 0, out.stderr
  (ids,) = re.findall(r"--local_device_ids=(\S+)", out.stdout)
  return ids.replace("\\", "")


EIGHT = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize("env,ids", [
    # One task per node sees the node's 8 GPUs and drives them all (jax alone: GPU 0 only).
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": EIGHT, "SLURM_TASKS_PER_NODE": "1(x2)",
      "SLURM_LOCALID": "0"}, EIGHT),
    # Several tasks per node, each seeing all 8 GPUs: task SLURM_LOCALID takes its group.
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": EIGHT,
      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "3"}, "6,7"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "4", "SLURM_LOCALID": "0"}, "0,1"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_LOCALID": "5"}, "5"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "2", "SLURM_LOCALID": "1"}, "4,5,6,7"),
    # Per-node counts differ: this node (SLURM_NODEID=1) runs 2 tasks.
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "4,2", "SLURM_NODEID": "1",
      "SLURM_LOCALID": "1"}, "4,5,6,7"),
    # --gpus-per-task=2 / --gpu-bind: the task sees its own 2 GPUs (node numbers 4,5, or 0,1
    # under a device cgroup) and names them 0,1, as CUDA renumbers them.
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "4,5",
      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "2"}, "0,1"),
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1",
      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "2"}, "0,1"),
    ({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "GPU-5a1b", "SLURM_TASKS_PER_NODE": "8",
      "SLURM_LOCALID": "5"}, "0"),
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_STEP_GPUS": "6,7", "SLURM_TASKS_PER_NODE": "4",
      "SLURM_LOCALID": "3"}, "0,1"),
    # No SLURM GPU variables: nvidia-smi counts the node's GPUs; a "type:count" spelling.
    ({"FAKE_NVIDIA_GPUS": "4", "SLURM_TASKS_PER_NODE": "2", "SLURM_LOCALID": "1"}, "2,3"),
    ({"SLURM_GPUS_ON_NODE": "a100:4"}, "0,1,2,3"),
    # LOCAL_DEVICE_IDS overrides the rule.
    ({"SLURM_GPUS_ON_NODE": "8", "LOCAL_DEVICE_IDS": "2,3"}, "2,3"),
], ids=["one-task", "4-tasks-step", "4-tasks", "8-tasks", "2-tasks", "uneven-nodes",
        "gpus-per-task", "gpus-per-task-cgroup", "gpu-bind-uuid", "step-gpus", "nvidia-smi",
        "typed-count", "explicit"])
def test_slurm_task_drives_the_gpus_it_sees(fakes, env, ids):
  out = dry_run(fakes, "gpu_multinode.sh", {"SLURM_JOB_ID": "7", **env}, "--config.batch_size=512")
  assert device_ids(out) == ids
  assert "--config.distributed_init=True" in out.stdout
  assert out.stdout.strip().endswith("--config.batch_size=512")
  assert f"drives GPUs {ids}" in out.stderr


def test_slurm_uneven_split_is_a_clear_error(fakes):
  out = dry_run(fakes, "gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8",
                                            "SLURM_NTASKS_PER_NODE": "3", "SLURM_LOCALID": "0"})
  assert out.returncode == 2
  assert "error: the 8 GPUs" in out.stderr and "do not split evenly over its 3 tasks" in out.stderr
  assert not out.stdout


def test_slurm_task_without_gpus_is_a_clear_error(fakes):
  out = dry_run(fakes, "gpu_multinode.sh", {"SLURM_JOB_ID": "7"}, python="py_cpu")
  assert out.returncode == 2
  assert "error: this SLURM task sees no GPU" in out.stderr


def test_by_hand_passes_the_three_flags(fakes):
  out = dry_run(fakes, "gpu_multinode.sh", {"COORDINATOR": "node0:1234", "NUM_PROCESSES": "2",
                                            "PROCESS_ID": "1"})
  assert out.returncode == 0, out.stderr
  for flag in ("--coordinator_address=node0:1234", "--num_processes=2", "--process_id=1"):
    assert flag in out.stdout
  assert "distributed_init" not in out.stdout and "local_device_ids" not in out.stdout


@pytest.mark.parametrize("env,message", [
    ({}, "error: neither SLURM"),
    ({"COORDINATOR": "node0:1234"}, "NUM_PROCESSES"),
])
def test_incomplete_environment_is_a_clear_error(fakes, env, message):
  out = dry_run(fakes, "gpu_multinode.sh", env)
  assert out.returncode != 0
  assert message in out.stderr


@pytest.mark.parametrize("script", ["gpu_multinode.sh", "tpu_pod.sh"])
def test_too_old_or_missing_python_is_a_clear_error(fakes, script):
  env = {"COORDINATOR": "n:1", "NUM_PROCESSES": "1", "PROCESS_ID": "0"}
  out = dry_run(fakes, script, env, python="py310")
  assert out.returncode == 2 and not out.stdout
  assert "is Python 3.10" in out.stderr and "need Python >= 3.11" in out.stderr
  assert "launch/setup_env.sh" in out.stderr
  out = dry_run(fakes, script, env, python="py_broken")
  assert out.returncode == 2 and "cannot be run" in out.stderr
  out = dry_run(fakes, script, env, python="py_old_jax")
  assert out.returncode == 2
  assert f"has jax 0.4.30 and jaxlib 0.4.30; requirements.txt pins {PIN}" in out.stderr


def test_gpu_launcher_asks_for_the_cuda_jax_where_there_is_a_gpu(fakes):
  by_hand = {"COORDINATOR": "n:1", "NUM_PROCESSES": "1", "PROCESS_ID": "0"}
  out = dry_run(fakes, "gpu_multinode.sh", {**by_hand, "FAKE_NVIDIA_GPUS": "2"}, python="py_cpu")
  assert out.returncode == 2
  assert f'pip install "jax[cuda12]=={PIN}"' in out.stderr
  out = dry_run(fakes, "gpu_multinode.sh", {"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "8"},
                python="py_cpu")
  assert out.returncode == 2 and "no CUDA jax" in out.stderr
  # A CPU trial on purpose, and a machine without GPUs, run on the CPU jax.
  out = dry_run(fakes, "gpu_multinode.sh", {**by_hand, "FAKE_NVIDIA_GPUS": "2",
                                            "JAX_PLATFORMS": "cpu"}, python="py_cpu")
  assert out.returncode == 0, out.stderr
  out = dry_run(fakes, "gpu_multinode.sh", by_hand, python="py_cpu")
  assert out.returncode == 0, out.stderr


def test_tpu_pod_lets_jax_detect_the_pod(fakes):
  out = dry_run(fakes, "tpu_pod.sh", {}, "--config.data_dir=gs://b/tfds", python="py_tpu")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"{fakes / 'py_tpu'} -m ovsw_jax.main ")
  assert "--config.distributed_init=True --config.data_dir=gs://b/tfds" in out.stdout
  out = dry_run(fakes, "tpu_pod.sh", {}, python="py_gpu")
  assert out.returncode == 2
  assert 'no TPU jax (libtpu)' in out.stderr and f'"jax[tpu]=={PIN}"' in out.stderr


def test_launchers_default_to_the_active_venv_then_the_checkouts(fakes, tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(fakes / "py_tpu")
  out = dry_run(fakes, "tpu_pod.sh", {"VIRTUAL_ENV": str(venv)}, python=None)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"{venv}/bin/python -m ovsw_jax.main ")
  out = dry_run(fakes, "tpu_pod.sh", {"VIRTUAL_ENV": str(venv), "PYTHON": str(fakes / "py310")},
                python=None)
  assert out.returncode == 2 and "is Python 3.10" in out.stderr


def setup_env(fakes, tmp_path, env_extra, accel="tpu", python=None):
  return subprocess.run(["bash", str(ROOT / "launch" / "setup_env.sh"), accel,
                         str(tmp_path / "venv")], env=script_env(fakes, python, env_extra),
                        capture_output=True, text=True, timeout=60)


def test_setup_env_takes_a_new_enough_python_from_path(fakes, tmp_path):
  out = setup_env(fakes, tmp_path, {"PYTHON_CANDIDATES": "py310 missing_python py_tpu py_gpu"})
  assert out.returncode == 0, out.stderr
  venv = tmp_path / "venv"
  assert out.stdout.splitlines() == [
      f"py_tpu -m venv {venv} ",
      f"{venv}/bin/python -m pip install --quiet -r {ROOT}/requirements.txt "
      rf"jax\[tpu\]=={PIN} "]


def test_setup_env_fetches_a_python_with_uv_where_path_has_none(fakes, tmp_path):
  out = setup_env(fakes, tmp_path, {"PYTHON_CANDIDATES": "py310", "UV": "/opt/uv"},
                  accel="cuda12")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == f"/opt/uv venv --seed --python 3.11 {tmp_path / 'venv'} "
  assert lines[1].endswith(rf"jax\[cuda12\]=={PIN} ")
  assert "no Python >= 3.11 on PATH" in out.stderr


@pytest.mark.parametrize("accel,python,message", [
    ("tpu", "py310", "error: PYTHON="),
    ("rocm", None, "error: unknown accelerator 'rocm'"),
])
def test_setup_env_errors_name_the_fix(fakes, tmp_path, accel, python, message):
  out = setup_env(fakes, tmp_path, {}, accel=accel, python=python)
  assert out.returncode == 2 and not out.stdout
  assert message in out.stderr
  if python:
    assert "is Python 3.10" in out.stderr and "deadsnakes" in out.stderr


# --- launch/slurm_requeue.sbatch, with fake srun and scontrol ---------------------------------

FAKE_SRUN = """
printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
if [[ ${FAKE_SRUN_WAIT:-} ]]; then
  trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 75' USR1
  trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit 75' TERM
  echo $$ > "$FAKE_DIR/srun.pid"
  for ((i = 0; i < 300; i++)); do sleep 0.1; done
  exit 3
fi
exit "${FAKE_SRUN_RC:-0}"
"""


def requeue_job(tmp_path, env_extra):
  """Starts the batch script (not waited for) with fake srun/scontrol writing to tmp_path."""
  write_script(tmp_path / "srun", FAKE_SRUN)
  write_script(tmp_path / "scontrol", 'echo "$@" >> "$FAKE_DIR/scontrol.calls"\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in CLEARED}
  env.update(FAKE_DIR=str(tmp_path), SRUN=str(tmp_path / "srun"),
             SCONTROL=str(tmp_path / "scontrol"), SLURM_JOB_ID="1234",
             SLURM_SUBMIT_DIR=str(ROOT), **env_extra)
  return subprocess.Popen(["bash", str(ROOT / "launch" / "slurm_requeue.sbatch"),
                           "configs/imagenet_r18.py", "/runs/r18", "--config.batch_size=512"],
                          env=env, stderr=subprocess.PIPE, text=True)


def finish(proc):
  try:
    _, err = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, err


def requeues(tmp_path):
  calls = tmp_path / "scontrol.calls"
  return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize("srun_rc,env,job_rc,requeued", [
    ("75", {}, 0, True),             # preempted and saved: back to the queue
    ("0", {}, 0, False),             # finished
    ("1", {}, 1, False),             # an error: no requeue loop
    ("75", {"SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, 75, False),
])
def test_requeue_job_requeues_exactly_a_saved_early_stop(tmp_path, srun_rc, env, job_rc,
                                                         requeued):
  rc, err = finish(requeue_job(tmp_path, {"FAKE_SRUN_RC": srun_rc, **env}))
  assert rc == job_rc, err
  assert requeues(tmp_path) == (["requeue 1234"] if requeued else [])
  assert (tmp_path / "srun.args").read_text().splitlines() == [
      "--kill-on-bad-exit=0", "bash", "launch/gpu_multinode.sh", "configs/imagenet_r18.py",
      "/runs/r18", "--config.batch_size=512", "--preemption_signals=TERM,USR1"]
  if env:
    assert "error: the job was requeued 3 times" in err


def wait_for_file(path, limit_s=20):
  deadline = time.time() + limit_s
  while not path.exists():
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def test_requeue_job_passes_the_time_limit_warning_to_srun(tmp_path):
  proc = requeue_job(tmp_path, {"FAKE_SRUN_WAIT": "1"})
  wait_for_file(tmp_path / "srun.pid")
  proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
  rc, err = finish(proc)
  assert (tmp_path / "srun.signals").read_text() == "USR1\n"
  assert rc == 0, err
  assert requeues(tmp_path) == ["requeue 1234"]


def test_requeue_job_does_not_requeue_after_a_sigterm(tmp_path):
  # scancel or a preemption: SLURM signals the batch shell and every task; no requeue from here.
  proc = requeue_job(tmp_path, {"FAKE_SRUN_WAIT": "1"})
  wait_for_file(tmp_path / "srun.pid")
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)
  os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
  rc, err = finish(proc)
  assert rc == 75, err
  assert (tmp_path / "srun.signals").read_text() == "TERM\n"  # not forwarded by the script
  assert requeues(tmp_path) == []
