"""Orbax checkpoints of the whole train state (params, batch stats, optimizer
state with OvSW's tracker and signs, flip history, RNG, step).

Restoring always goes through a target (an abstract train state), because
orbax rebuilds NamedTuple optimizer states only when it is given one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


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
  """Saves `state` under `step` (asynchronously; `wait` before exiting)."""
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """Restores the newest readable checkpoint into the structure of `target`.

  `target` may be a concrete state or its `jax.eval_shape`. Returns None when
  the directory holds no checkpoint. A checkpoint that fails to restore (say,
  a damaged one) is logged and skipped in favour of the one before it.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint at step %d could not be restored (%s); "
                      "trying an older one.", step, e)
  return None
