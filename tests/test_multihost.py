"""Real multi-process runs on 127.0.0.1: checkpoints, layouts and resumes.

One run goes through three layouts: 1 process with 4 devices (this test
process's own, tests/conftest.py) trains to step 3; 2 processes with 2 fake CPU
devices each (the layout of a GPU node or a TPU host) resume it to step 6,
process 0 started by launch/gpu_multinode.sh as its comment says to start it by
hand, process 1's first read of the checkpoint failing (a transient storage
error); 1 process resumes that to step 8. What it shows: a resume, also with
another process count, continues the same run (its states equal those of a
straight 1-process run); checkpoints are written once by the run and restored
by every process; a process whose read fails reads again and resumes the step
the others resume. A 2-process run from step 0 and faults (stop signals, a lost
process, processes that disagree or never join): test_multihost_faults.py.
"""

import shutil

import pytest

from helpers import ROOT
from processes import (FLAKY_RESTORE, RUNLOCAL, assert_states_close, checkpoint_steps,
                       config_of, free_port, pair_flags, start, start_launched, state_at,
                       wait_ok)
from ovsw_jax.trainer import train

pytestmark = pytest.mark.slow

SETTINGS = ["--config.checkpoint_every_steps=3", "--config.keep_checkpoints=5"]


def in_this_process(workdir, num_train_steps, caplog):
  """The run of SETTINGS, trained here on this process's 4 devices; its log."""
  config = config_of(num_train_steps)
  config.checkpoint_every_steps, config.keep_checkpoints = 3, 5
  caplog.clear()
  train.train_and_evaluate(config, str(workdir))
  return caplog.text


def test_a_run_resumed_on_two_processes_and_on_one_continues_the_same_run(tmp_path, caplog):
  caplog.set_level("INFO")
  two, one = tmp_path / "two", tmp_path / "one"
  in_this_process(one, 8, caplog)  # straight to step 8: the reference
  in_this_process(two, 3, caplog)
  events = set(two.glob("events.out.tfevents.*"))

  # 2 processes x 2 devices resume it to step 6.
  logs, port = tmp_path / "logs", free_port()
  logs.mkdir()
  args = SETTINGS + ["--config.num_train_steps=6"]
  procs = [start_launched(two, f"{ROOT}/configs/default.py:runlocal", args, logs / "p0.log",
                          port=port, process_id=0),
           start(pair_flags(two, port, 1) + RUNLOCAL + args, logs / "p1.log",
                 program=FLAKY_RESTORE)]
  out = wait_ok(procs, logs)
  assert all("JAX process" in o and "of 2" in o for o in out)
  assert "injected transient read error at step 3" in out[1] and "retrying" in out[1]
  assert all("Resumed from step 3" in o for o in out)
  assert checkpoint_steps(two) == ["3", "6"]  # one checkpoint per save step, no leftovers
  assert len(set(two.glob("events.out.tfevents.*")) - events) == 1  # TensorBoard: process 0
  # (Each run evaluated at its last step, which starts a new flip-ratio interval; the
  # straight run did not: compare all but those interval signs.)
  a, b = state_at(two, 6), state_at(one, 6)
  assert int(a.step) == int(b.step) == 6
  assert_states_close(a.replace(flips=None), b.replace(flips=None))
  assert_states_close(a.flips.ever_flipped, b.flips.ever_flipped)

  # 1 process x 4 devices resumes the 2-process checkpoint and ends where the straight
  # run ends.
  relayout = tmp_path / "relayout"
  shutil.copytree(two, relayout)
  assert "Resumed from step 6" in in_this_process(relayout, 8, caplog)
  assert_states_close(state_at(relayout, 8), state_at(one, 8))  # both evaluated at step 8
