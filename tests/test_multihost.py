"""Real multi-process runs of `python -m ovsw_jax.main` on 127.0.0.1.

Each test starts 2 processes, with 2 fake CPU devices each (the layout of a GPU
node or a TPU host) where the layout matters, every one under `timeout -k`, so
a hang fails the test instead of blocking the suite (the preemption test then
prints every trainer's stacks). What they show: checkpoints are written once by
the run and restored by every process; the result equals a 1-process
4-device run; a resume, also with another process count, continues the same
run; SIGTERM to one process stops both at the same step with the preempted
exit status; a killed process ends the other with a clear message; a resume
where one process's first read of the checkpoint fails restores the same step
everywhere; processes started with different configs stop before anything is
written; a process that never joins, or a duplicate id, is named.
"""

import contextlib
import os
import pathlib
import signal
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import ROOT, load_config
from ovsw_jax.trainer import checkpointing, multihost, preemption, train

pytestmark = pytest.mark.slow

RUNLOCAL = [f"--config={ROOT}/configs/default.py:runlocal"]
LIMIT_S = 420  # per process; `timeout -k` kills a hung one


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


MAIN = ("-m", "ovsw_jax.main")
# The trainer with its first checkpoint read failing (see that file).
FLAKY_RESTORE = (str(ROOT / "tests" / "flaky_restore.py"),)


def start(args, log, *, devices=2, limit_s=LIMIT_S, program=MAIN):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  cmd = ["timeout", "-k", "60", str(limit_s), sys.executable, *program, *args]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def pair_flags(workdir, port, process_id, num_processes=2):
  return [f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}", f"--process_id={process_id}"]


def start_pair(workdir, args, logs, devices=2, extra=((), ()), programs=(MAIN, MAIN)):
  """Processes 0 and 1 of a run; `extra[i]` are flags for process i alone."""
  port = free_port()
  return [start(pair_flags(workdir, port, i) + [*args, *extra[i]], logs / f"p{i}.log",
                devices=devices, program=programs[i])
          for i in range(2)]


def outputs(logs):
  return [(logs / f"p{i}.log").read_text() for i in range(2)]


def run_pair(workdir, args, logs, devices=2, programs=(MAIN, MAIN)):
  logs.mkdir(parents=True, exist_ok=True)
  procs = start_pair(workdir, args, logs, devices, programs=programs)
  rcs = [p.wait(timeout=LIMIT_S + 90) for p in procs]
  out = outputs(logs)
  assert rcs == [0, 0], f"exit statuses {rcs}\n" + "\n".join(o[-3000:] for o in out)
  return out


def run_single(workdir, args, log, devices=4):
  proc = start([f"--workdir={workdir}", *args], log, devices=devices)
  rc = proc.wait(timeout=LIMIT_S + 90)
  out = pathlib.Path(log).read_text()
  assert rc == 0, out[-3000:]
  return out


def config_of(num_train_steps):
  config = load_config("default", "runlocal")
  config.num_train_steps = num_train_steps
  return config


def state_at(workdir, step):
  target = train.setup(config_of(step)).initial_state
  manager = checkpointing.create_manager(f"{workdir}/checkpoints")
  return checkpointing.restore(manager, step, target)


def assert_states_close(a, b, rtol=2e-4, atol=2e-5):
  # 2x2 and 1x4 devices sum the 4 gradients in a different order (gloo's ring
  # across processes, XLA's in-process all-reduce), so the states differ by
  # float32 rounding, grown over a few steps (measured: 5e-5 relative at most
  # after 6 steps). Both layouts are deterministic, so this never flakes.
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def checkpoint_steps(workdir):
  entries = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  return entries


def test_two_processes_checkpoint_resume_and_equal_one_process(tmp_path):
  two, one = tmp_path / "two", tmp_path / "one"
  args = RUNLOCAL + ["--config.checkpoint_every_steps=3", "--config.keep_checkpoints=5"]
  out = run_pair(two, args + ["--config.num_train_steps=6"], tmp_path / "logs_a")
  assert checkpoint_steps(two) == ["3", "6"]  # one checkpoint per save step, no leftovers
  assert len(list(two.glob("events.out.tfevents.*"))) == 1  # TensorBoard written once
  assert all("JAX process" in o and "of 2" in o for o in out)

  # The same config on 1 process with 4 devices, straight to step 8.
  run_single(one, args + ["--config.num_train_steps=8"], tmp_path / "one.log")
  # (The 6-step run evaluated at its last step, which starts a new flip-ratio
  # interval; the straight run did not: compare all but those interval signs.)
  a, b = state_at(two, 6), state_at(one, 6)
  assert int(a.step) == int(b.step) == 6
  assert_states_close(a.replace(flips=None), b.replace(flips=None))
  assert_states_close(a.flips.ever_flipped, b.flips.ever_flipped)

  # Another layout resumes the 2-process checkpoint: 1 process, 4 devices.
  relayout = tmp_path / "relayout"
  shutil.copytree(two, relayout)
  out1 = run_single(relayout, args + ["--config.num_train_steps=8"], tmp_path / "relayout.log")
  assert "Resumed from step 6" in out1

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


def test_hand_started_launch_script_two_processes_of_one_device_equal_one_of_two(tmp_path):
  # launch/gpu_multinode.sh's recipe without SLURM, one process per "node".
  port = free_port()
  logs = tmp_path / "logs"
  logs.mkdir()
  args = ["--config.num_train_steps=4"]
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHON=sys.executable,
               COORDINATOR=f"127.0.0.1:{port}",
               NUM_PROCESSES="2", PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        ["timeout", "-k", "60", str(LIMIT_S), "bash", str(ROOT / "launch/gpu_multinode.sh"),
         f"{ROOT}/configs/default.py:runlocal", str(tmp_path / "two"), *args],
        env=env, cwd=ROOT, stdout=open(logs / f"p{i}.log", "w"), stderr=subprocess.STDOUT))
  rcs = [p.wait(timeout=LIMIT_S + 90) for p in procs]
  assert rcs == [0, 0], "\n".join(o[-3000:] for o in outputs(logs))
  run_single(tmp_path / "one", RUNLOCAL + args, tmp_path / "one.log", devices=2)
  # Two addends sum the same in any order: this change of layout is bitwise exact.
  a, b = state_at(tmp_path / "two", 4), state_at(tmp_path / "one", 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def wait_for(path, text, deadline_s):
  deadline = time.time() + deadline_s
  while time.time() < deadline:
    if path.exists() and text in path.read_text():
      return True
    time.sleep(0.5)
  return False


LONG = RUNLOCAL + ["--config.num_train_steps=100000", "--config.log_every_steps=2",
                   "--config.checkpoint_every_steps=100000"]


def children(pid):
  out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
  return [int(x) for x in out.split()]


def trainer_pid(proc):
  """The trainer under `timeout` -> supervisor -> trainer."""
  (supervisor,) = children(proc.pid)
  (trainer,) = children(supervisor)
  return supervisor, trainer


def wait_all(procs, limit_s):
  """Exit statuses; on a hang, every trainer's Python stacks go to its log
  (`kill -QUIT`, see main.py) and the test fails with them."""
  deadline = time.time() + limit_s
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.5)
  if any(p.poll() is None for p in procs):
    for p in procs:
      for pid in children(p.pid):
        for trainer in children(pid):
          os.kill(trainer, signal.SIGQUIT)
    time.sleep(3)
    return None
  return [p.returncode for p in procs]


@contextlib.contextmanager
def training_pair(tmp_path, extra=()):
  """A long 2-process run (1 device each), yielded once it trains; killed on the way out.

  One device per process: what these tests show (a stop agreed on by two
  processes, a lost peer) does not depend on the devices per process, which
  the tests above cover.
  """
  workdir, logs = tmp_path / "wd", tmp_path / "logs"
  logs.mkdir()
  procs = start_pair(workdir, LONG + list(extra), logs, devices=1)
  try:
    assert wait_for(logs / "p0.log", "train step ", LIMIT_S - 60), outputs(logs)[0][-3000:]
    yield workdir, logs, procs
  finally:
    for p in procs:
      p.kill()


def test_sigterm_to_one_process_saves_one_step_on_both_and_resumes(tmp_path):
  with training_pair(tmp_path) as (workdir, logs, procs):
    # To process 1's supervisor only (as a scheduler signals one host; not
    # through `timeout`, which would also start its 60 s kill-after clock).
    os.kill(trainer_pid(procs[1])[0], signal.SIGTERM)
    rcs = wait_all(procs, 150)
  out = outputs(logs)
  assert rcs == [preemption.EXIT_PREEMPTED] * 2, f"{rcs}\n" + out[0][-4000:] + out[1][-4000:]
  steps = set()
  for o in out:
    line = [x for x in o.splitlines() if "Preempted at step" in x]
    assert line, o[-2000:]
    steps.add(int(line[-1].split("Preempted at step ")[1].split(":")[0]))
  assert len(steps) == 1, f"the processes stopped at different steps: {steps}"
  (step,) = steps
  assert checkpoint_steps(workdir) == [str(step)]

  out = run_pair(workdir, RUNLOCAL + [f"--config.num_train_steps={step + 2}"], tmp_path / "l2",
                 devices=1)
  assert all(f"Resumed from step {step}" in o for o in out)


def test_a_killed_process_ends_the_other_with_a_clear_message(tmp_path):
  # A 20 s heartbeat timeout (default 60): the survivor notices sooner, the test is shorter.
  with training_pair(tmp_path, ["--heartbeat_timeout_s=20"]) as (_, logs, procs):
    # Kill the trainer of process 1 (timeout -> supervisor -> trainer), as a lost host would.
    killed_at = time.time()
    os.kill(trainer_pid(procs[1])[1], signal.SIGKILL)
    rc0 = procs[0].wait(timeout=150)
    waited = time.time() - killed_at
    rc1 = procs[1].wait(timeout=60)
  out = outputs(logs)
  assert rc0 != 0 and rc1 != 0
  assert waited < 120, f"the survivor took {waited:.0f} s to stop"
  assert "Process 0 of the multi-process run ended abnormally" in out[0], out[0][-3000:]
  assert "another process died" in out[0]
  assert "resume from the last checkpoint" in out[0]
  assert "Process 1 of the multi-process run ended abnormally (SIGKILL)" in out[1]


def finish(procs, limit_s):
  """Exit statuses and seconds until each process ended (None when still running)."""
  started, ends = time.time(), [None] * len(procs)
  while time.time() - started < limit_s and None in ends:
    for i, p in enumerate(procs):
      if ends[i] is None and p.poll() is not None:
        ends[i] = time.time() - started
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [p.wait() for p in procs], ends


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
