"""The command line: a missing data set stops with instructions; stop signals checkpoint."""

import re
import signal
import threading
import time

import pytest

from ovsw_jax.trainer import preemption

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


class Output:
  """A subprocess's merged output, read by a thread, so waiting for a line has a deadline."""

  def __init__(self, proc):
    self.proc, self.lines = proc, []
    self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self._reader.start()

  def text(self):
    return "".join(self.lines)

  def wait_for(self, pattern, after=0, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and self.proc.poll() is None:
      for line in self.lines[after:]:
        if re.search(pattern, line):
          return line
      time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r}:\n{self.text()[-3000:]}")

  def finish(self, timeout=120):
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=30)
    return rc, self.text()


def checkpoints(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_stop_signals_save_and_the_run_resumes(tmp_path):
  # No evaluation and no periodic checkpoint: each stop saves the step it lands on.
  settings = {"num_train_steps": 100000, "eval_every_epochs": 100000,
              "checkpoint_every_steps": 100000, "log_every_steps": 5}
  args = [f"--config={ROOT}/configs/default.py:runlocal", "--workdir=wd"] + [
      f"--config.{k}={v}" for k, v in settings.items()]
  workdir = tmp_path / "wd"  # given as a relative path: orbax needs it made absolute

  # 1. With --preemption_signals=USR1: SIGQUIT prints the stacks and training
  # goes on; SIGUSR1 saves and stops as a preemption.
  run = Output(run_main(args + ["--preemption_signals=USR1"], cwd=tmp_path))
  run.wait_for("train step ")
  run.proc.send_signal(signal.SIGQUIT)
  run.wait_for("most recent call first")
  shown = len(run.lines)
  run.wait_for("train step ", after=shown)  # still training
  run.proc.send_signal(signal.SIGUSR1)
  rc, out = run.finish()
  assert rc == preemption.EXIT_PREEMPTED, out[-3000:]
  assert "SIGUSR1 received" in out and "Traceback" not in out
  (first,) = checkpoints(workdir)
  assert f"Preempted at step {first}:" in out and first >= 5

  # 2. Resumed (USR1 not asked for this time); Ctrl-C saves and stops with 130.
  run = Output(run_main(args, cwd=tmp_path))
  run.wait_for(f"Resumed from step {first}")
  run.wait_for("train step ")
  run.proc.send_signal(signal.SIGINT)
  rc, out = run.finish()
  assert rc == preemption.EXIT_INTERRUPTED, out[-3000:]
  assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
  assert "KeyboardInterrupt" not in out
  second = checkpoints(workdir)[-1]
  assert second > first and f"Preempted at step {second}:" in out
