"""The command line: a missing data set stops with instructions; stop signals checkpoint."""

import json
import re
import signal
import threading
import time

import jax
import numpy as np
import pytest

from ovsw_jax import checkpointing, preemption, train

from helpers import ROOT, load_config, module_command

pytestmark = pytest.mark.slow  # each test starts the CLI in a subprocess


def run_main(args, cwd=ROOT, devices=1):
  return module_command("ovsw_jax.main", args, cwd=cwd, devices=devices)


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


def test_stop_signals_save_and_the_run_resumes_bitwise(tmp_path, monkeypatch):
  # No evaluation and no periodic checkpoint: each stop saves the step it lands on.
  settings = {"model": "tiny", "num_train_steps": 100000, "eval_every_epochs": 100000,
              "checkpoint_every_steps": 100000, "log_every_steps": 5}
  args = [f"--config={ROOT}/configs/default.py", "--workdir=wd"] + [
      f"--config.{k}={v}" for k, v in settings.items()]
  workdir = tmp_path / "wd"  # given as a relative path: orbax needs it made absolute

  # 1. With --preemption_signals=USR1: SIGQUIT prints the stacks and training
  # goes on; SIGUSR1 saves and stops as a preemption.
  run = Output(run_main(args + ["--preemption_signals=USR1"], cwd=tmp_path, devices=4))
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
  run = Output(run_main(args, cwd=tmp_path, devices=4))
  run.wait_for(f"Resumed from step {first}")
  run.wait_for("train step ")
  run.proc.send_signal(signal.SIGINT)
  rc, out = run.finish()
  assert rc == preemption.EXIT_INTERRUPTED, out[-3000:]
  assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
  assert "KeyboardInterrupt" not in out
  second = checkpoints(workdir)[-1]
  assert second > first and f"Preempted at step {second}:" in out

  # 3. The same steps without interruption, in this process (same 4 devices):
  # here the stop request comes during the evaluation after the last step,
  # which ends it after one batch, unrecorded, and saves that step.
  class StopInFinalEval(preemption.Preemption):
    calls = 0

    def should_stop(self):  # one call per train step, then one per eval batch
      StopInFinalEval.calls += 1
      return StopInFinalEval.calls >= second + 2
  monkeypatch.setattr(preemption, "Preemption", StopInFinalEval)
  config = load_config("default")
  config.update(settings)
  config.num_train_steps = second
  straight = tmp_path / "straight"
  with pytest.raises(preemption.Preempted, match=f"Preempted at step {second}:"):
    train.train_and_evaluate(config, str(straight))
  assert StopInFinalEval.calls == second + 2
  assert checkpoints(straight) == [second]
  records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
  assert records and not [r for r in records if r.get("kind") == "eval"]
  target = train.setup(config).initial_state
  a = checkpointing.restore(checkpointing.create_manager(f"{workdir}/checkpoints"), second,
                            target)
  b = checkpointing.restore(checkpointing.create_manager(f"{straight}/checkpoints"), second,
                            target)
  leaves = jax.tree_util.tree_leaves_with_path(a)
  assert len(leaves) == len(jax.tree.leaves(b))
  for (path, x), y in zip(leaves, jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
