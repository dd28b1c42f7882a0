"""Real multi-process runs on 127.0.0.1: checkpoints, layouts and resumes.

2 processes with 2 fake CPU devices each (the layout of a GPU node or a TPU
host), started as launch/gpu_multinode.sh says to start it by hand:
checkpoints are written once by the run and restored by every process; the
result equals a 1-process 4-device run (this test process's own layout,
tests/conftest.py); a resume, also with another process count, continues the
same run, also when one process's first read of the checkpoint fails. Faults
(stop signals, a lost process, processes that disagree or never join):
test_multihost_faults.py.
"""

import shutil

import pytest

from helpers import ROOT, load_config
from processes import (FLAKY_RESTORE, MAIN, RUNLOCAL, assert_states_close, checkpoint_steps,
                       run_launched_pair, run_pair, state_at)
from ovsw_jax.trainer import train

pytestmark = pytest.mark.slow


def in_this_process(workdir, num_train_steps, caplog):
  """The run of `args` below, trained here on this process's 4 devices; its log."""
  config = load_config("default", "runlocal")
  config.checkpoint_every_steps, config.keep_checkpoints = 3, 5
  config.num_train_steps = num_train_steps
  caplog.clear()
  train.train_and_evaluate(config, str(workdir))
  return caplog.text


def test_two_processes_checkpoint_resume_and_equal_one_process(tmp_path, caplog):
  caplog.set_level("INFO")
  two, one = tmp_path / "two", tmp_path / "one"
  settings = ["--config.checkpoint_every_steps=3", "--config.keep_checkpoints=5"]
  args = RUNLOCAL + settings
  # Through the launch script (its by-hand recipe, one process per "node").
  out = run_launched_pair(two, f"{ROOT}/configs/default.py:runlocal",
                          settings + ["--config.num_train_steps=6"], tmp_path / "logs_a")
  assert checkpoint_steps(two) == ["3", "6"]  # one checkpoint per save step, no leftovers
  assert len(list(two.glob("events.out.tfevents.*"))) == 1  # TensorBoard written once
  assert all("JAX process" in o and "of 2" in o for o in out)

  # The same config on 1 process with 4 devices, straight to step 8.
  in_this_process(one, 8, caplog)
  # (The 6-step run evaluated at its last step, which starts a new flip-ratio
  # interval; the straight run did not: compare all but those interval signs.)
  a, b = state_at(two, 6), state_at(one, 6)
  assert int(a.step) == int(b.step) == 6
  assert_states_close(a.replace(flips=None), b.replace(flips=None))
  assert_states_close(a.flips.ever_flipped, b.flips.ever_flipped)

  # Another layout resumes the 2-process checkpoint: 1 process, 4 devices.
  relayout = tmp_path / "relayout"
  shutil.copytree(two, relayout)
  assert "Resumed from step 6" in in_this_process(relayout, 8, caplog)

  # The 2-process run started again resumes and ends where the straight run ends,
  # although process 1's first read of step 6 fails (a transient storage error):
  # it reads again, and both processes resume from the same step.
  out = run_pair(two, args + ["--config.num_train_steps=8"], tmp_path / "logs_b",
                 programs=(MAIN, FLAKY_RESTORE))
  assert "injected transient read error at step 6" in out[1] and "retrying" in out[1]
  assert all("Resumed from step 6" in o for o in out)
  assert checkpoint_steps(two) == ["3", "6", "8"]
  assert_states_close(state_at(two, 8), state_at(one, 8))
  assert_states_close(state_at(relayout, 8), state_at(one, 8))
