"""Preemption: one decision, taken by every process at the same step.

A scheduler (SLURM, a TPU pod's maintenance, Kubernetes) asks a job to stop
with SIGTERM, and may signal its hosts one by one. Each process of a run must
then save the *same* step and stop, or the run deadlocks in a collective (the
signalled host stops while the others wait for it) or leaves checkpoints of
different steps.

* Several processes (`jax.distributed` initialised): jax's preemption service
  catches SIGTERM in every process and agrees on a step through the
  coordination service; `multihost_utils.reached_preemption_sync_point(step)`
  turns True at that step on all processes. It must be called at every step.
* One process: a SIGTERM handler sets a flag that the loop reads.
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

# Exit status of a run that was asked to stop and saved its state: the
# sysexits.h EX_TEMPFAIL ("try again later"). Schedulers requeue on it.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Training stopped on request (SIGTERM) after checkpointing `step`."""

  def __init__(self, step: int):
    super().__init__(f"Preempted at step {step}: the checkpoint of step {step} is saved; "
                     "start the same command again to resume.")
    self.step = step


class Preemption:
  """Context manager answering `stop_at(step)`: save and stop after this step?"""

  def __init__(self):
    self._requested = False
    self._previous = None
    self._synced = False

  def __enter__(self):
    self._synced = jax.distributed.is_initialized()
    if self._synced:  # jax's service owns SIGTERM; a Python handler would replace it
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: checkpointing and stopping.")
    self._requested = True

  def stop_at(self, step: int) -> bool:
    """True when the run must checkpoint `step` and stop (all processes agree).

    With several processes this is a sync point: every process must call it
    for every step, in order.
    """
    if self._synced:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
