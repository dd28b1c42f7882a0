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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from ovsw_jax import preemption

# Set in the child's environment; a process that sees it trains instead of supervising.
CHILD_ENV = "OVSW_JAX_SUPERVISED_CHILD"
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
  env = dict(os.environ, **{CHILD_ENV: "1"})
  forwarder = Forwarder()
  child = None

  def forward(signum, frame):
    del frame
    to_send = forwarder.translate(signum)
    if child is not None and child.poll() is None:
      child.send_signal(to_send)
  handled = tuple(stop_signals) + (preemption.STACK_DUMP_SIGNAL,)
  previous = {s: signal.signal(s, forward) for s in handled}
  try:
    child = subprocess.Popen([sys.executable, "-m", "ovsw_jax.main", *argv], env=env,
                             preexec_fn=_die_with_parent)
    if forwarder.first is not None:  # arrived while starting the child
      child.send_signal(signal.SIGTERM)
    rc = child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  status = forwarder.exit_status(rc)
  if status is None:
    print(abnormal_end_message(rc, process_id, workdir), file=sys.stderr, flush=True)
    return 1
  return status
