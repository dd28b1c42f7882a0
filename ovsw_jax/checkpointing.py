"""Orbax checkpoints of the whole train state (params, batch stats, optimizer
state with OvSW's tracker and signs, flip history, RNG, step).

Restoring always goes through a target (an abstract train state), because
orbax rebuilds NamedTuple optimizer states only when it is given one.

The trainer hands over and gets back a host-local state (one copy, numpy or
single-device arrays). On disk it is a fully replicated global array per leaf
(`multihost.to_global`): the form orbax saves once and restores on every
process of a multi-process run, and one that does not depend on how many
processes or devices wrote it, so a run may resume on another layout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

from ovsw_jax import multihost


def create_manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A `CheckpointManager` over `directory` keeping the last `max_to_keep` steps.

  A relative local path is made absolute (orbax requires it); URLs such as
  `gs://...` are kept as they are.
  """
  if "://" not in directory:
    directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> bool:
  """Saves the host-local `state` under `step` (asynchronously; `wait` before exiting).

  Every process of a run calls it with the same state.
  """
  return manager.save(step, args=ocp.args.StandardSave(multihost.to_global(state)),
                      force=force)


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores checkpoint `step` into the structure of `target` (numpy leaves)."""
  abstract = multihost.abstract_global(target)
  return multihost.to_local(manager.restore(step, args=ocp.args.StandardRestore(abstract)))


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """Restores the newest readable checkpoint into the structure of `target`.

  `target` may be a concrete state or its `jax.eval_shape`; the result has
  numpy leaves in `target`'s tree structure. Returns None when the directory
  holds no checkpoint. A checkpoint that fails to restore (say, a damaged one)
  is logged and skipped in favour of the one before it.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, step, target)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint at step %d could not be restored (%s); "
                      "trying an older one.", step, e)
  return None
