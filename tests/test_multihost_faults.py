"""Faults of real multi-process runs of `python -m ovsw_jax.main` on 127.0.0.1.

What they show: SIGTERM to one process stops both at the same step with the
preempted exit status, and the run resumes from that step on both; a killed
process then ends the other with a clear message; processes started with
different configs stop before anything is written; a process that never
joins, or a duplicate id, is named. Each process runs under `timeout -k`
(tests/processes.py), so a hang fails the test instead of blocking the suite
(the stop test then prints every trainer's stacks).
"""

import os
import signal
import time

import pytest

from processes import (LIMIT_S, RUNLOCAL, checkpoint_steps, finish, free_port, outputs,
                       pair_flags, start, start_pair, trainer_pid, training_pair, wait_all)
from ovsw_jax.trainer import multihost, preemption

pytestmark = pytest.mark.slow


def test_sigterm_to_one_process_stops_both_at_one_step_and_a_killed_one_ends_the_resumed_run(
    tmp_path):
  # One run for both faults: the preempted run, resumed, then loses a process.
  workdir = tmp_path / "wd"
  with training_pair(workdir, tmp_path / "logs") as procs:
    # To process 1's supervisor only (as a scheduler signals one host; not
    # through `timeout`, which would also start its 60 s kill-after clock).
    os.kill(trainer_pid(procs[1])[0], signal.SIGTERM)
    rcs = wait_all(procs, 150)
  out = outputs(tmp_path / "logs")
  assert rcs == [preemption.EXIT_PREEMPTED] * 2, f"{rcs}\n" + out[0][-4000:] + out[1][-4000:]
  steps = set()
  for o in out:
    line = [x for x in o.splitlines() if "Preempted at step" in x]
    assert line, o[-2000:]
    steps.add(int(line[-1].split("Preempted at step ")[1].split(":")[0]))
  assert len(steps) == 1, f"the processes stopped at different steps: {steps}"
  (step,) = steps
  assert checkpoint_steps(workdir) == [str(step)]

  # Started again, both processes resume from that step (a resumed 2-process run that
  # trains to its end: test_multihost.py). With a 20 s heartbeat timeout (default
  # 60) the survivor of a lost process notices sooner.
  logs = tmp_path / "resumed"
  with training_pair(workdir, logs, ["--heartbeat_timeout_s=20"]) as procs:
    # Kill the trainer of process 1 (timeout -> supervisor -> trainer), as a lost host would.
    killed_at = time.time()
    os.kill(trainer_pid(procs[1])[1], signal.SIGKILL)
    rc0 = procs[0].wait(timeout=150)
    waited = time.time() - killed_at
    rc1 = procs[1].wait(timeout=60)
  out = outputs(logs)
  assert all(f"Resumed from step {step}" in o for o in out), out[0][-3000:]
  assert rc0 != 0 and rc1 != 0
  assert waited < 120, f"the survivor took {waited:.0f} s to stop"
  assert "Process 0 of the multi-process run ended abnormally" in out[0], out[0][-3000:]
  assert "another process died" in out[0]
  assert "resume from the last checkpoint" in out[0]
  assert "Process 1 of the multi-process run ended abnormally (SIGKILL)" in out[1]


def test_processes_started_with_different_configs_stop_before_anything_is_written(tmp_path):
  # Process 1 differs in the seed, the batch size and an OvSW strength at once:
  # one launch shows each is caught and named (every field alone: the unit tests).
  workdir, logs = tmp_path / "wd", tmp_path / "logs"
  logs.mkdir()
  differ = ["--config.seed=1", "--config.batch_size=32", "--config.ovsw.delta=0.02"]
  procs = start_pair(workdir, RUNLOCAL, logs, devices=1, extra=((), differ))
  rcs, _ = finish(procs, LIMIT_S)
  out = outputs(logs)
  assert rcs == [1, 1], f"{rcs}\n" + out[0][-3000:] + out[1][-3000:]
  for o in out:
    assert "error: The 2 processes of this run were not started alike" in o, o[-3000:]
    for field, value in (("seed", "1"), ("batch_size", "32"), ("ovsw.delta", "0.02")):
      assert f"{field}: " in o and f"{value} on process 1" in o, (field, o[-3000:])
    assert "train step" not in o and "Traceback" not in o
  assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.iterdir())


def test_a_process_that_never_joins_or_a_duplicate_id_is_named(tmp_path):
  join_s = 20
  logs = tmp_path / "logs"
  logs.mkdir()
  names = ("alone", "dup_a", "dup_b")
  port = free_port()
  # Process 0 of 2 started alone; and, at the same time, two processes both
  # given --process_id=0 (whichever claims the port first serves the run).
  ports = {"alone": free_port(), "dup_a": port, "dup_b": port}
  procs = [start(pair_flags(tmp_path / name, ports[name], 0) + RUNLOCAL
                 + [f"--join_timeout_s={join_s}"], logs / f"{name}.log", devices=1)
           for name in names]
  joined, ended = {}, {}
  deadline = time.time() + LIMIT_S
  while len(ended) < len(names) and time.time() < deadline:
    for name, p in zip(names, procs):
      log = (logs / f"{name}.log").read_text()
      if name not in joined and "Joining the multi-process run" in log:
        joined[name] = time.time()
      if name not in ended and p.poll() is not None:
        ended[name] = time.time()
    time.sleep(0.2)
  for p in procs:
    p.kill()
  out = {name: (logs / f"{name}.log").read_text() for name in names}
  rcs = [p.wait() for p in procs]
  assert rcs == [1, 1, 1], f"{rcs}\n" + "\n".join(o[-2000:] for o in out.values())
  waited = {name: ended[name] - joined.get(name, 0) for name in names}
  (second,) = [n for n in names[1:] if "already in use" in out[n]]
  (first,) = [n for n in names[1:] if n != second]
  for name in ("alone", first):
    assert ("error: Process 0 stopped: process 1 of the 2-process run did not join at "
            "127.0.0.1:") in out[name], out[name][-3000:]
    assert f"within {join_s} s (--join_timeout_s)" in out[name]
    assert "another process died" not in out[name]
    # It ends once its wait is over, not after jax's 5 minutes.
    assert join_s - 1 < waited[name] < join_s + multihost.JOIN_MARGIN_S + 5, waited
  assert "error: --process_id=0: port" in out[second], out[second][-3000:]
  assert waited[second] < join_s - 5, waited  # at once (exiting takes seconds here)
