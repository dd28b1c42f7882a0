"""A thin parent for each process of a multi-process run: a peer's death gets a clear message.

When one process of a run dies (killed, out of memory, a host lost), the
others find out inside a collective or from jax's coordination service, and
both end the process from C++ (gloo's `terminate`, a fatal log, `abort()`):
no Python code runs after that to say what happened, and the last lines are
a C++ assertion that talks of a "collective mismatch in your code".

So `main` runs the trainer in a child process and waits. The parent passes
each stop signal (SIGTERM, SIGINT, `--preemption_signals`) on to the child as
SIGTERM, the one signal jax's preemption service listens to (`preemption`
explains why; the child may get the signal directly too, and stops once);
a second SIGINT kills the child at once (SIGKILL). SIGQUIT (the stack dump)
is passed on as it is. It returns the child's exit status, 130 when the stop
was a SIGINT; when the child was ended by a signal, it prints one paragraph
that names the likely cause and the way back (start every process again: the
run resumes from its last checkpoint) and exits 1. The parent imports nothing
heavy: it costs a few MB and no start-up time.

The child tells the parent what it is doing (`report`, a small JSON file
named in its environment), and the parent passes the child's stderr through,
keeping its last lines: a child aborted while joining the run (a process
that never started, a duplicate `--process_id`) then gets a message that
names the processes that did not join, which jax's coordination service
printed before it ended the child.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading

from ovsw_jax.trainer import preemption

# Set in the child's environment; a process that sees it trains instead of supervising.
CHILD_ENV = "OVSW_JAX_SUPERVISED_CHILD"
# Set in the child's environment: the file `report` writes the child's phase to.
STATUS_ENV = "OVSW_JAX_CHILD_STATUS"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_child() -> bool:
  return os.environ.get(CHILD_ENV) == "1"


def _signal_name(rc: int) -> str:
  try:
    return signal.Signals(-rc).name
  except ValueError:
    return f"signal {-rc}"


def abnormal_end_message(rc: int, process_id: int | None, workdir: str) -> str:
  """The paragraph printed when the trainer child ended by a signal (rc < 0)."""
  who = f"Process {process_id}" if process_id is not None else "This process"
  if -rc == signal.SIGABRT:  # what gloo and jax's coordination client do on a peer's death
    cause = ("In a multi-process run this most often means that another process died or was "
             "killed (a lost host, out of memory, a kill): the collectives or jax's "
             "coordination service then stop the survivors. Read the other processes' logs "
             "for the first error.")
  else:
    cause = ("It was killed (out of memory, or by the scheduler or a user); the other "
             "processes of the run stop too.")
  return (f"error: {who} of the multi-process run ended abnormally ({_signal_name(rc)}). "
          f"{cause} Nothing is lost: start all processes again with the same command and "
          f"they resume from the last checkpoint in {workdir}.")


def report(**status) -> None:
  """In a supervised child: records what it is doing (`phase` and its details) for the parent.

  A no-op in a process that has no supervising parent.
  """
  path = os.environ.get(STATUS_ENV)
  if not path:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(status, f)
  os.replace(tmp, path)


def _read_status(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


# The coordination service's error when not every process registered in time
# lists them after this line, one a line ("2", or "/job:jax_worker/replica:0/task:2").
_MISSING_HEADER = "Some timed out task names:"
_TASK = re.compile(r"(?:/job:[^/\s]+/replica:\d+/task:)?(\d+)")


def missing_processes(log: str) -> list[int] | None:
  """The process ids the coordination service named as not joined in `log`, or None."""
  at = log.rfind(_MISSING_HEADER)
  if at < 0:
    return None
  ids = []
  for line in log[at + len(_MISSING_HEADER):].splitlines()[1:]:
    tokens = [t for t in re.split(r"[,\s]+", line) if t]
    matches = [_TASK.fullmatch(t) for t in tokens]
    if not tokens or not all(matches):
      break
    ids.extend(int(m.group(1)) for m in matches)
  return sorted(set(ids)) or None


def join_failure_message(status: dict, missing: list[int] | None) -> str:
  """The paragraph printed when the child was ended while joining the run."""
  pid, n = status.get("process_id"), status.get("num_processes")
  address, timeout_s = status.get("coordinator"), status.get("join_timeout_s")
  who = f"Process {pid}" if pid is not None else "This process"
  run = f"the {n}-process run" if n else "the multi-process run"
  at = f" at {address}" if address else ""
  ids = f"[0, {n})" if n else "[0, --num_processes)"
  if missing:
    plural = "es" if len(missing) > 1 else ""
    names = ", ".join(str(i) for i in missing)
    return (f"error: {who} stopped: process{plural} {names} of {run} did not join{at} "
            f"within {timeout_s} s (--join_timeout_s). Process{plural} {names} was not "
            f"started, cannot reach {address or 'the coordinator'}, or was given another "
            f"process's --process_id (each process needs its own id in {ids}). Nothing was "
            "trained or written. Start the missing processes (or all of them again); raise "
            "--join_timeout_s if they start slowly.")
  return (f"error: {who} could not join {run}{at} within {timeout_s} s (--join_timeout_s): "
          "process 0, which serves that address, was not started in time or cannot be "
          f"reached from here, or another process already joined with --process_id={pid} "
          f"(each process needs its own id in {ids}). Nothing was trained or written. Check "
          "every process's --coordinator_address and --process_id, then start them all again.")


def _pass_through(stream, tail: collections.deque) -> None:
  """Copies the child's stderr to ours, line by line, keeping the last lines in `tail`."""
  out = getattr(sys.stderr, "buffer", None)
  for line in iter(stream.readline, b""):
    if out is not None:
      out.write(line)
      out.flush()
    else:
      sys.stderr.write(line.decode(errors="replace"))
      sys.stderr.flush()
    tail.append(line)


def _die_with_parent() -> None:
  """In the child, before exec: be killed when the supervising parent dies (Linux).

  Without it a parent killed with SIGKILL would leave a trainer that the
  scheduler no longer sees, still holding the run's collectives.
  """
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # not Linux: nothing to set
    pass


class Forwarder:
  """What the parent sends its child for each signal, and the exit status it returns."""

  def __init__(self):
    self.first: signal.Signals | None = None  # the first stop signal received
    self.interrupts = 0
    self.killed = False

  def translate(self, signum: int) -> signal.Signals:
    """The signal to send the child on receiving `signum` (records it)."""
    signum = signal.Signals(signum)
    if signum == preemption.STACK_DUMP_SIGNAL:
      return signum
    self.first = self.first or signum
    if signum == signal.SIGINT:
      self.interrupts += 1
      if self.interrupts > 1:  # a second Ctrl-C: stop now
        self.killed = True
        return signal.SIGKILL
    return signal.SIGTERM

  def exit_status(self, rc: int) -> int | None:
    """The parent's exit status for the child's `rc`; None when it ended abnormally."""
    if self.first == signal.SIGINT and (
        rc == preemption.EXIT_PREEMPTED or rc == -signal.SIGINT
        or (self.killed and rc == -signal.SIGKILL)):
      return preemption.EXIT_INTERRUPTED
    if rc >= 0:
      return rc
    if -rc in preemption.ALWAYS:  # before the child's handlers were installed
      return 128 - rc
    return None


def run_child(argv: list[str], *, process_id: int | None, workdir: str,
              stop_signals: tuple[signal.Signals, ...] = preemption.ALWAYS) -> int:
  """Runs `python -m ovsw_jax.main argv...` as a child; returns the exit status to use."""
  with tempfile.TemporaryDirectory(prefix="ovsw_jax_") as tmp:
    return _run_child(argv, process_id=process_id, workdir=workdir,
                      status_path=os.path.join(tmp, "status.json"), stop_signals=stop_signals)


def _run_child(argv: list[str], *, process_id: int | None, workdir: str, status_path: str,
               stop_signals: tuple[signal.Signals, ...]) -> int:
  env = dict(os.environ, **{CHILD_ENV: "1", STATUS_ENV: status_path})
  forwarder = Forwarder()
  child = None

  def forward(signum, frame):
    del frame
    to_send = forwarder.translate(signum)
    if child is not None and child.poll() is None:
      child.send_signal(to_send)
  handled = tuple(stop_signals) + (preemption.STACK_DUMP_SIGNAL,)
  previous = {s: signal.signal(s, forward) for s in handled}
  tail: collections.deque = collections.deque(maxlen=300)
  copier = None
  try:
    child = subprocess.Popen([sys.executable, "-m", "ovsw_jax.main", *argv], env=env,
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    copier = threading.Thread(target=_pass_through, args=(child.stderr, tail), daemon=True)
    copier.start()
    if forwarder.first is not None:  # arrived while starting the child
      child.send_signal(signal.SIGTERM)
    rc = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  copier.join(timeout=10)
  status = forwarder.exit_status(rc)
  if status is None:
    phase = _read_status(status_path)
    if phase.get("phase") == "joining":
      log = b"".join(tail).decode(errors="replace")
      message = join_failure_message(phase, missing_processes(log))
    else:
      message = abnormal_end_message(rc, process_id, workdir)
    print(message, file=sys.stderr, flush=True)
    return 1
  return status
