"""The command line: a missing data set stops with instructions; SIGTERM checkpoints."""

import signal
import time

import pytest

from ovsw_jax import preemption

from helpers import ROOT, module_command

pytestmark = pytest.mark.slow  # each test starts the CLI in a subprocess


def run_main(args, cwd=ROOT):
  return module_command("ovsw_jax.main", args, cwd=cwd)


def test_unprepared_dataset_gives_instructions_not_a_traceback(tmp_path):
  proc = run_main([f"--config={ROOT}/configs/cifar10_resnet20.py:runlocal",
                   f"--config.data_dir={tmp_path}/empty", f"--workdir={tmp_path}/wd"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert "tfds build cifar10" in out or "download_and_prepare" in out
  assert "Traceback" not in out


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  workdir = tmp_path / "wd"  # given as a relative path: orbax needs it made absolute
  args = [f"--config={ROOT}/configs/default.py", "--workdir=wd",
          "--config.model=tiny", "--config.num_train_steps=100000",
          "--config.checkpoint_every_steps=100000", "--config.log_every_steps=5"]
  proc = run_main(args, cwd=tmp_path)
  deadline = time.time() + 240
  lines = []
  for line in proc.stdout:  # wait until training is under way
    lines.append(line)
    if "train step " in line or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == preemption.EXIT_PREEMPTED, "".join(lines) + out
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert steps and max(steps) >= 5, "SIGTERM must leave a checkpoint of the current step"
  # A second run resumes from that step.
  proc = run_main(args[:-3] + ["--config.num_train_steps=%d" % (max(steps) + 2)], cwd=tmp_path)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f"Resumed from step {max(steps)}" in out
