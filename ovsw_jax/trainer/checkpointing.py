"""Orbax checkpoints of the whole train state (params, batch stats, optimizer
state with OvSW's tracker and signs, flip history, RNG, step).

Restoring always goes through a target (an abstract train state), because
orbax rebuilds NamedTuple optimizer states only when it is given one.

The trainer hands over and gets back a host-local state (one copy, numpy or
single-device arrays). On disk it is a fully replicated global array per leaf
(`multihost.to_global`): the form orbax saves once and restores on every
process of a multi-process run, and one that does not depend on how many
processes or devices wrote it, so a run may resume on another layout.

What can go wrong in a checkpoint folder, and what happens:

* A foreign entry (an empty `99/`, a step folder whose item was removed, a
  user's file): only complete checkpoints count as steps (`_CompleteSteps`);
  the rest is left alone and named once in the log.
* A read that fails (a transient NFS/GCS error, an OOM): retried a few times
  with a short backoff before the checkpoint is called damaged.
* A damaged checkpoint (unreadable after the retries, or its content no
  longer matching the SHA-256 digest of the state recorded at save time):
  moved aside to `<step>.damaged` (named in the log), and the one before it
  is restored; the run then saves that step again.
* In a multi-process run the processes take one decision (`choose_step`):
  they try process 0's list of steps, newest first, exchange whether each
  read the step, and restore the newest one every process read; only a step
  some process could not read is moved aside (once, by process 0).
* A checkpoint of another model or optimizer (its arrays' shapes differ from
  the target's): `CheckpointMismatchError`, never a silent restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from etils import epath

from ovsw_jax.trainer import multihost

DIGEST_KEY = "ovsw_state_sha256"
# The run's config, beside the digest in each checkpoint's custom metadata.
CONFIG_KEY = "ovsw_config"
_ITEM = "default"  # orbax's item folder for a single-item manager


class CheckpointMismatchError(RuntimeError):
  """The workdir's checkpoint holds a state of another shape than this config builds."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (a full disk, a lost mount); the message says what."""


class DigestMismatchError(ValueError):
  """A checkpoint read in full whose content is not what was saved: damage, not a glitch."""


def is_complete(step_dir: epath.Path) -> bool:
  """True for a committed orbax checkpoint folder (its metadata and its item's)."""
  return ((step_dir / "_CHECKPOINT_METADATA").exists()
          and (step_dir / _ITEM / "_METADATA").exists())


class _CompleteSteps(ocp.step.NameFormat):
  """Orbax's standard step names, but `find_all` yields complete checkpoints only.

  Orbax takes every numbered folder for a step; one stray folder then broke
  every restore ("Must provide args of type Composite") and the first save.
  """

  def __init__(self):
    self._standard = ocp.step.standard_name_format()
    self._reported: set[str] = set()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_step(self, base_path, step: int):
    return self._standard.find_step(base_path, step)

  def find_all(self, base_path) -> Iterator[Any]:
    for metadata in self._standard.find_all(base_path):
      if is_complete(epath.Path(metadata.path)):
        yield metadata
      elif str(metadata.path) not in self._reported:
        self._reported.add(str(metadata.path))
        logging.warning("Ignoring %s: not a complete checkpoint (left as it is).",
                        metadata.path)


def _use_coordination_barriers() -> None:
  """Makes orbax synchronise processes through jax's coordination service.

  By default orbax's barriers are device collectives (`sync_global_devices`),
  run by its background save thread while the main thread runs the train
  step's collectives: the two processes can then enter them in different
  orders and wait for each other forever (seen once in 10 two-process runs).
  Barriers of the coordination service involve no device. The switch is an
  absl flag of orbax's; outside an absl program the flags are marked parsed
  first (all other flags keep their defaults).
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def create_manager(directory: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A `CheckpointManager` over `directory` keeping the last `max_to_keep` steps.

  A relative local path is made absolute (orbax requires it); URLs such as
  `gs://...` are kept as they are.
  """
  if jax.process_count() > 1:
    _use_coordination_barriers()
  if not isinstance(max_to_keep, int) or max_to_keep < 1:
    raise ValueError(f"keep_checkpoints={max_to_keep!r} would keep no checkpoint to resume "
                     "from: set --config.keep_checkpoints to 1 or more.")
  if "://" not in directory:
    directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         step_name_format=_CompleteSteps())
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def state_digest(state: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (host arrays)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False,
         config: dict[str, Any] | None = None) -> bool:
  """Saves the host-local `state` under `step` (asynchronously; `wait` before exiting).

  Every process of a run calls it with the same state. The state's digest is
  stored in the checkpoint's metadata and checked on restore; `config` (the
  run's `workdir.config_record`) is stored beside it, the record of what the
  state was trained with (`saved_config`).
  """
  digest = state_digest(state)
  metadata = {DIGEST_KEY: digest}
  if config is not None:
    metadata[CONFIG_KEY] = config
  try:
    return manager.save(step, args=ocp.args.StandardSave(multihost.to_global(state)),
                        force=force, custom_metadata=metadata)
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e, step) from e


def saved_config(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
  """The config saved with the newest checkpoint that has a readable one, or None."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      config = (manager.metadata(step).custom_metadata or {}).get(CONFIG_KEY)
    except Exception:  # pylint: disable=broad-except
      continue  # unreadable metadata: a damaged checkpoint, left to the restore
    if isinstance(config, dict):
      return config
  return None


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the pending asynchronous save; its failure is a `CheckpointSaveError`."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise _save_error(manager, e) from e


def _save_error(manager: ocp.CheckpointManager, error: Exception,
                step: int | None = None) -> CheckpointSaveError:
  steps = [s for s in manager.all_steps() if s != step]
  last = (f"the last complete checkpoint is step {max(steps)}" if steps
          else "there is no complete checkpoint yet")
  what = f"step {step}" if step is not None else "the last checkpoint"
  return CheckpointSaveError(
      f"Saving {what} to {manager.directory} failed ({_first_line(error)}); {last}. "
      "Free disk space (or fix the storage) and start the same command again: it resumes "
      "from there.")


def _shapes(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """Sorted (shape, dtype) of every leaf: arrays, ShapeDtypeStructs or orbax metadata."""
  return sorted((tuple(x.shape), np.dtype(x.dtype).str) for x in jax.tree.leaves(tree))


def _check_structure(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
  """Raises `CheckpointMismatchError` if `step`'s arrays are not the target's.

  Compares the multiset of (shape, dtype) read from orbax's metadata (no array
  data is read). Unreadable metadata is left to the restore (damage).
  """
  try:
    saved_shapes = _shapes(manager.item_metadata(step))
  except Exception:  # pylint: disable=broad-except
    return
  wanted = _shapes(target)
  if saved_shapes != wanted:
    raise CheckpointMismatchError(
        f"The checkpoint at step {step} in {manager.directory} holds another state than this "
        f"config builds ({len(saved_shapes)} arrays saved, {len(wanted)} expected, or other "
        "shapes): a different model, optimizer or OvSW setting. Use a new --workdir for this "
        "config, or start with the config the workdir was trained with (its config.json).")


def restore(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Restores checkpoint `step` into the structure of `target` (numpy leaves).

  Raises `DigestMismatchError` (a ValueError) if the restored content does not
  match the digest saved with it (a corrupted file that still parses).
  """
  abstract = multihost.abstract_global(target)
  state = multihost.to_local(manager.restore(step, args=ocp.args.StandardRestore(abstract)))
  expected = (manager.metadata(step).custom_metadata or {}).get(DIGEST_KEY)
  if expected is not None and state_digest(state) != expected:
    raise DigestMismatchError(f"checkpoint {step}'s content does not match its SHA-256 digest")
  return state


def _first_line(error: Exception, limit: int = 300) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return f"{type(error).__name__}: {text[:limit]}"


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Process 0 renames damaged step folders to `<step>.damaged[.N]`; all then reload.

  Every process calls it with the same `steps` (the decision of `choose_step`).
  """
  if steps and jax.process_index() == 0:
    for step in steps:
      source = epath.Path(manager.directory) / str(step)
      if not source.exists():  # process 0 read it, but another process could not see it
        continue
      target, n = source.parent / f"{step}.damaged", 1
      while target.exists():
        target, n = source.parent / f"{step}.damaged.{n}", n + 1
      source.rename(target)
      logging.warning("Moved the damaged checkpoint %s aside to %s; its step will be "
                      "trained and saved again.", source, target)
  if steps:
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("ovsw_jax_damaged_checkpoints_moved")
    manager.reload()


READ_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.5  # doubled after each failed attempt
_OK, _DAMAGED, _MISMATCH = "ok", "damaged", "mismatch"


def read_with_retries(read: Callable[[int], Any], step: int, *, attempts: int = READ_ATTEMPTS,
                      backoff_s: float = RETRY_BACKOFF_S,
                      sleep: Callable[[float], None] = time.sleep) -> tuple[Any, str | None]:
  """`(state, None)`, or `(None, first line of the last error)` after `attempts` failed reads.

  `CheckpointMismatchError` is not a read failure: it is raised at once. A
  digest mismatch (the whole checkpoint was read, and it is not what was
  saved) is not retried.
  """
  error = None
  for attempt in range(attempts):
    try:
      return read(step), None
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = _first_line(e)
      if isinstance(e, DigestMismatchError):
        break
      if attempt + 1 < attempts:
        delay = backoff_s * 2 ** attempt
        logging.warning("Reading the checkpoint at step %d failed (%s); retrying in %.1f s "
                        "(attempt %d of %d).", step, error, delay, attempt + 2, attempts)
        sleep(delay)
  return None, error


def choose_step(steps: Sequence[int], read: Callable[[int], Any],
                exchange: Callable[[int, str], list[str]],
                give_up: Callable[[int], None] | None = None,
                **retry) -> tuple[Any, list[int]]:
  """One restore decision for every process: `(state or None, damaged steps)`.

  `steps` (the same on every process) are tried newest first. Each process
  reads a step (`read_with_retries`), then `exchange(step, status)` gives
  every process's status: the step is restored only if every process read
  it; otherwise every process falls back to the next older one together. A
  step of another state structure on any process raises
  `CheckpointMismatchError` everywhere. `give_up(step)` runs on a process
  that could not read `step`, before the exchange.
  """
  damaged = []
  for step in sorted(steps, reverse=True):
    mismatch = None
    try:
      state, error = read_with_retries(read, step, **retry)
    except CheckpointMismatchError as e:
      state, error, mismatch = None, str(e), e
    if error is not None and mismatch is None and give_up is not None:
      give_up(step)
    status = (json.dumps([_MISMATCH, error]) if mismatch is not None
              else json.dumps([_OK, None]) if error is None else json.dumps([_DAMAGED, error]))
    statuses = [json.loads(s) for s in exchange(step, status)]
    for pid, (kind, reason) in enumerate(statuses):
      if kind == _MISMATCH:
        if mismatch is not None:
          raise mismatch
        raise CheckpointMismatchError(f"On process {pid}: {reason}")
    failed = {pid: reason for pid, (kind, reason) in enumerate(statuses) if kind != _OK}
    if not failed:
      return state, damaged
    where = "; ".join(f"process {pid}: {reason}" for pid, reason in failed.items())
    logging.warning("The checkpoint at step %d is damaged or unreadable (%s); every process "
                    "falls back to an older one.", step, where)
    damaged.append(step)
  return None, damaged


def _meet_restore_barrier(manager: ocp.CheckpointManager) -> None:
  """Reaches the barrier that ends orbax's restore, for a process whose reads all failed.

  The processes that read the step wait there for every process (300 s);
  without this one they would wait it out and fail too. The barrier's name
  is orbax's (`Checkpointer:restore` after the checkpointer's key prefix).
  """
  prefix = getattr(getattr(manager, "_checkpointer", None), "_barrier_sync_key_prefix", None)
  try:
    ocp.multihost.sync_global_processes(
        ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not meet the other processes at orbax's restore barrier (%s).",
                    _first_line(e))


def _exchange_status(step: int, status: str) -> list[str]:
  return multihost.share(f"restore/{step}", status)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """Restores the newest intact checkpoint into the structure of `target`.

  `target` may be a concrete state or its `jax.eval_shape`; the result has
  numpy leaves in `target`'s tree structure. Returns None when the directory
  holds no checkpoint. Every process of a run restores the same step
  (`choose_step`, over process 0's list of steps). A damaged checkpoint is
  moved aside (one log line) in favour of the one before it; one of another
  state structure raises `CheckpointMismatchError`.
  """
  steps = json.loads(multihost.from_process_0("restore/steps",
                                              json.dumps(sorted(manager.all_steps()))))

  missed_barrier = {}

  def read(step):
    _check_structure(manager, step, target)
    try:
      return restore(manager, step, target)
    except Exception as e:
      # Failures other than these come before the barrier that ends orbax's restore.
      missed_barrier[step] = not (isinstance(e, DigestMismatchError)
                                  or "Barrier timed out" in str(e))
      raise

  def give_up(step):
    if jax.process_count() > 1 and missed_barrier.get(step):
      _meet_restore_barrier(manager)
  damaged = []
  try:
    state, damaged = choose_step(steps, read, _exchange_status, give_up)
    return state
  finally:
    _move_aside(manager, damaged)
