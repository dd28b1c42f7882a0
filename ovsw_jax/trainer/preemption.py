"""Stop requests: save the state and stop, all processes at the same point.

A scheduler asks a job to stop with a signal: SIGTERM (SLURM's time limit and
`scancel`, a TPU pod's maintenance, Kubernetes), often with a warning signal
some time before (`sbatch --signal=USR1@120`). A user asks with Ctrl-C
(SIGINT). The run then saves its current state and exits: 75 (EX_TEMPFAIL,
"requeue me") after SIGTERM or a configured warning signal, 130 after SIGINT.

Signals (`install`, called by `main` for the whole run, start-up included):
SIGTERM and SIGINT always, others on request (`--preemption_signals=USR1`,
parsed by `parse_signals`). A second SIGINT stops at once: after the first,
SIGINT is back to the system's default action, so the second ends the process
(status 130, no Python code runs, no traceback) even while the main thread
waits in C++. A save in progress is then left incomplete; orbax writes into a
temporary folder, so the next start ignores it and resumes from the last
complete checkpoint. SIGQUIT (`STACK_DUMP_SIGNAL`, Ctrl-\\) prints every
thread's stack and the run goes on (`install_stack_dump`); no scheduler uses it
as a warning.

Where the loop looks (`Preemption.should_stop`): after every train step and
before every evaluation batch, so a request during an evaluation ends it (its
partial result is dropped) and the state is saved at once.

Agreement. Each process must stop at the same point, or the others wait in a
collective for ever. One process: the signal handler sets a flag that
`should_stop` reads. Several processes (`jax.distributed` initialised): jax's
preemption service catches SIGTERM in C++ and agrees with the other processes,
through the coordination service, on a sync point: the next value of a counter
that each process passes to `multihost_utils.reached_preemption_sync_point`,
one more than the largest value any process has passed. `should_stop` passes
a counter of its own calls, +1 per call; every process calls it at the same
points of the same program (every step, every evaluation batch), so the
agreed counter is the same point everywhere, inside an evaluation too, with
no extra collective. The counter must grow by exactly one per call (a skipped
value could be the sync point). The other stop signals reach jax's service as
SIGTERM: their handler sends SIGTERM to its own process, and a request
recorded before `jax.distributed` was initialised is passed on in the same
way when the loop starts. The supervising parent of each process
(`supervisor`) turns the stop signals it receives into SIGTERM for its child
as well (a signal sent to the parent's pid alone); a process that receives a
signal both directly and from its parent stops once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from typing import Iterable, Iterator

# Exit status of a run that was asked to stop and saved its state: the
# sysexits.h EX_TEMPFAIL ("try again later"). Schedulers requeue on it.
EXIT_PREEMPTED = 75
# Exit status after SIGINT (Ctrl-C): the shell's 128 + 2, as if killed by it.
EXIT_INTERRUPTED = 130
# `faulthandler` prints all threads' stacks on this signal (`main`).
STACK_DUMP_SIGNAL = signal.SIGQUIT
# Stop signals always handled, and those `--preemption_signals` may add.
ALWAYS = (signal.SIGTERM, signal.SIGINT)
OPTIONAL = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGXCPU)

# The first stop signal this process received (None: none yet), and the
# signals whose handlers `handling` installed.
_first: signal.Signals | None = None
_handled: tuple[signal.Signals, ...] = ()
_notified = False  # whether `_first` was passed on to jax's preemption service


class Preempted(Exception):
  """Training stopped on request after checkpointing `step`."""

  def __init__(self, step: int, by: signal.Signals | None = None):
    cause = (f"stop requested by {by.name}" if by is not None
             else "stop requested by SIGTERM to one of the processes")
    super().__init__(f"Preempted at step {step}: the checkpoint of step {step} is saved "
                     f"({cause}); start the same command again to resume.")
    self.step = step
    self.by = by

  @property
  def exit_status(self) -> int:
    return EXIT_INTERRUPTED if self.by == signal.SIGINT else EXIT_PREEMPTED


def parse_signals(text: str | None) -> tuple[signal.Signals, ...]:
  """`ALWAYS` plus the signals named in `text`, comma-separated: "USR1", "SIGUSR1,HUP".

  Raises ValueError naming the bad entry and the accepted names.
  """
  chosen = list(ALWAYS)
  names = {s.name[3:]: s for s in ALWAYS + OPTIONAL}
  for word in (text or "").split(","):
    word = word.strip().upper()
    if not word:
      continue
    key = word[3:] if word.startswith("SIG") else word
    if key not in names:
      accepted = ",".join(s.name[3:] for s in OPTIONAL)
      raise ValueError(
          f"--preemption_signals: {word!r} is not a stop signal this trainer handles; "
          f"give a comma-separated list of {accepted} (TERM and INT are always handled; "
          f"{STACK_DUMP_SIGNAL.name} prints the stacks).")
    if names[key] not in chosen:
      chosen.append(names[key])
  return tuple(chosen)


def requested_by() -> signal.Signals | None:
  """The first stop signal this process received, or None."""
  return _first


def _multi_process() -> bool:
  # Never imports jax: a signal may arrive while the main thread imports it.
  jax = sys.modules.get("jax")
  try:
    return bool(jax is not None and jax.distributed.is_initialized())
  except AttributeError:  # jax half imported
    return False


def _handle(signum, frame) -> None:
  del frame
  global _first
  signum = signal.Signals(signum)
  if signum == signal.SIGINT:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
  if _first is not None:
    return
  _first = signum
  again = "; a second Ctrl-C stops at once, without saving" if signum == signal.SIGINT else ""
  logging.warning("%s received: saving the state and stopping%s.", signum.name, again)
  if signum != signal.SIGTERM and _multi_process():
    _notify_jax()


def _notify_jax() -> None:
  """Passes the request on to jax's preemption service, which listens to SIGTERM only."""
  global _notified
  _notified = True
  os.kill(os.getpid(), signal.SIGTERM)


def install(signals: Iterable[signal.Signals] = ALWAYS) -> dict:
  """From now on `signals` request a stop (see `requested_by`); returns the previous handlers.

  For the whole process (`main`): the handlers stay through the interpreter's
  shutdown, so a late Ctrl-C still ends the process without a traceback.
  Main thread only (ValueError otherwise).
  """
  global _handled
  signals = tuple(signals)
  previous = {s: signal.signal(s, _handle) for s in signals}
  _handled = signals
  return previous


def install_stack_dump(signum: signal.Signals = STACK_DUMP_SIGNAL) -> threading.Thread:
  """From now on `signum` prints every thread's Python stack to stderr; returns the printer.

  Not `faulthandler.register(signum, all_threads=True)`: that walks the other
  threads' states inside the C signal handler, without the GIL, and a thread that
  exits meanwhile is freed under it: a run crashed there (a segfault in the test
  suite, about one CI run in six). Here Python's C-level handler only writes the
  signal's number to a pipe (`signal.set_wakeup_fd`), and a daemon thread reading
  the pipe prints the stacks (`faulthandler.dump_traceback`) holding the GIL, when
  no thread can come or go. The main thread need not run Python for it: a run
  stuck in C++ (a collective, a device wait) has released the GIL, and the stacks
  still come. The wakeup pipe gets every Python-handled signal's number; the
  printer ignores the others. Main thread only (ValueError otherwise); once per
  process (it takes the process's wakeup fd).
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # set_wakeup_fd's requirement: a signal never blocks
  signal.signal(signum, lambda s, f: None)  # a Python handler: the C handler then writes
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def print_stacks():
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
      while data := pipe.read(512):
        if int(signum) in data:
          faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

  printer = threading.Thread(target=print_stacks, name="stack-dump", daemon=True)
  printer.start()
  return printer


@contextlib.contextmanager
def handling(signals: Iterable[signal.Signals] = ALWAYS) -> Iterator[None]:
  """`install` for the duration of the context: then the previous handlers and no request."""
  global _first, _handled, _notified
  previous = install(signals)
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    _first, _handled, _notified = None, (), False


class Preemption:
  """The training loop's view of stop requests: `should_stop()` at every sync point.

  Outside `handling` (the library called without `main`), SIGTERM alone is
  handled while the context is open.
  """

  def __init__(self):
    self._synced = False
    self._calls = 0
    self._stopped = False
    self._own = contextlib.ExitStack()

  def __enter__(self):
    self._synced = _multi_process()
    if self._synced:
      if _first is not None and not _notified:  # came before jax's service took SIGTERM
        _notify_jax()
    elif not _handled:
      try:
        self._own.enter_context(handling((signal.SIGTERM,)))
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def should_stop(self) -> bool:
    """True when the run must save and stop here; then True on every later call.

    A sync point with several processes: every process must call it at the
    same points of the run, in the same order (see the module docstring).
    """
    if not self._stopped:
      if self._synced:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        self._calls += 1
        self._stopped = bool(multihost_utils.reached_preemption_sync_point(self._calls))
      else:
        self._stopped = _first is not None
    return self._stopped

  def __exit__(self, *exc):
    self._own.close()
