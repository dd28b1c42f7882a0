"""Starting and watching trainer processes for the multi-process tests.

Every process runs under `timeout -k`, so a hang fails its test instead of
blocking the suite. `start_pair` starts processes 0 and 1 of one run on
127.0.0.1; `training_pair` yields a long run once it trains (and kills it on
the way out); `wait_all` prints every trainer's stacks into its log when the
processes do not end in time.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from helpers import ROOT, load_config, xla_flags
from ovsw_jax.trainer import checkpointing, train

RUNLOCAL = [f"--config={ROOT}/configs/default.py:runlocal"]
LIMIT_S = 420  # per process; `timeout -k` kills a hung one


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


MAIN = ("-m", "ovsw_jax.main")
# The trainer with its first checkpoint read failing (see that file).
FLAKY_RESTORE = (str(ROOT / "tests" / "flaky_restore.py"),)


def _spawn(cmd, log, devices, **env):
  """`cmd` under `timeout -k`, with `devices` host CPU devices, its output into `log`."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONPATH=str(ROOT),
             TF_CPP_MIN_LOG_LEVEL="3", **env)
  return subprocess.Popen(["timeout", "-k", "60", str(LIMIT_S), *cmd], env=env, cwd=ROOT,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT)


def start(args, log, *, devices=2, program=MAIN):
  return _spawn([sys.executable, *program, *args], log, devices)


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


def start_launched(workdir, config, args, log, *, port, process_id, devices=2):
  """Process `process_id` of a 2-process run, started by launch/gpu_multinode.sh as its
  comment says to start it by hand (no SLURM): COORDINATOR, NUM_PROCESSES, PROCESS_ID."""
  return _spawn(["bash", str(ROOT / "launch/gpu_multinode.sh"), config, str(workdir), *args],
                log, devices, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
                COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2",
                PROCESS_ID=str(process_id))


def wait_ok(procs, logs):
  """The processes' outputs, once every one has ended with status 0."""
  rcs = [p.wait(timeout=LIMIT_S + 90) for p in procs]
  out = outputs(logs)
  assert rcs == [0] * len(procs), f"exit statuses {rcs}\n" + "\n".join(o[-3000:] for o in out)
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
def training_pair(workdir, logs, extra=()):
  """A long 2-process run (1 device each), yielded once it trains; killed on the way out.

  One device per process: what these runs show (a stop agreed on by two
  processes, a lost peer) does not depend on the devices per process, which
  the resume tests cover.
  """
  logs.mkdir()
  procs = start_pair(workdir, LONG + list(extra), logs, devices=1)
  try:
    assert wait_for(logs / "p0.log", "train step ", LIMIT_S - 60), outputs(logs)[0][-3000:]
    yield procs
  finally:
    for p in procs:
      p.kill()


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
