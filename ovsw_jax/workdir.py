"""What a workdir holds besides checkpoints: the run's config record and its lock.

* `config.json`: the config the run was started with, written atomically by
  process 0. A restart compares its config with it (`check_config`): a change
  that alters what the checkpointed state is or means stops the run with the
  differing fields and the ways out; changes that leave it intact (the
  learning rate and its schedule, the run length, logging, evaluation and
  checkpoint cadence, where the data live) pass with one log line.
* `run.lock`: `{"pid", "host", "started"}` of the run that trains in the
  workdir, taken by process 0 (the processes of one multi-process run share
  it). A second run stops at once; a lock whose process on this host is gone
  is stale and taken over. Workdirs on URLs (`gs://...`) have no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from typing import Any, Iterator

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
# The metrics a run logged, one JSON object a line (written by `ovsw_jax.run_log`).
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"

# Fields a restart may change: they do not alter the checkpointed state's
# structure or meaning (lowering the learning rate is the usual fix after a
# non-finite stop). A field matches itself and everything under it.
CHANGEABLE = (
    "learning_rate", "lr_schedule", "warmup_epochs", "num_epochs", "num_train_steps",
    "log_every_steps", "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
    "eval_batch_size", "data_dir", "distributed_init", "num_workers", "prefetch",
    "parallelism",
    # Like `parallelism`, the matmul precision changes the rounding of the steps
    # after the restart, not what the checkpointed state is (moving a run to
    # another kind of accelerator changes that rounding too): switching to
    # faster passes mid-run, or back to float32, must not force a new run.
    "matmul_precision",
)


_ABSENT = "<absent>"
# Dicts whose keys the user chooses (model settings): a key missing from the
# record there is a change, never a field declared since the record was written.
FREE_FORM = ("model_kwargs.",)


class ConfigMismatchError(ValueError):
  """The config differs from the workdir's record in a field that changes the run."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def _is_url(path: str) -> bool:
  return "://" in path


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists, as they do on disk)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _changeable(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in CHANGEABLE)


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
  """`{field: (recorded, current)}` for every dotted field that differs."""
  a, b = _flat(recorded), _flat(current)
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
          for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _write_atomically(path: epath.Path, text: str) -> None:
  """Local: a temporary file renamed over `path`. Object stores write whole objects anyway."""
  if _is_url(str(path)):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  os.replace(tmp, path)


def check_config(workdir: str, config: ml_collections.ConfigDict, *, has_checkpoint: bool,
                 allow_change: bool = False, write: bool = True) -> None:
  """Compares `config` with the workdir's record, then records it.

  Raises `ConfigMismatchError` when a checkpoint exists and a field outside
  `CHANGEABLE` differs (unless `allow_change`). With no checkpoint there is no
  run to protect: the record is replaced. `write` is False on processes > 0.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  current = config_record(config)
  if has_checkpoint and path.exists():
    try:
      recorded = json.loads(path.read_text())
    except ValueError:
      recorded = None
      logging.warning("%s is not valid JSON; recording the current config.", path)
    if recorded is not None:
      changes = config_changes(recorded, current)
      # A field absent from the record did not exist when the run started (the
      # record predates it): it takes its value now, with a warning.
      added = {k: b for k, (a, b) in changes.items()
               if a == _ABSENT and not k.startswith(FREE_FORM)}
      if added:
        logging.warning("Fields not in the workdir's record (added since it was written), "
                        "taken as they are now: %s",
                        "; ".join(f"{k}={v!r}" for k, v in added.items()))
      blocking = {k: v for k, v in changes.items()
                  if not _changeable(k) and k not in added}
      if blocking and not allow_change:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in blocking.items())
        raise ConfigMismatchError(
            f"The workdir {workdir} holds a run trained with another config, and these "
            f"fields change what its checkpoints are or mean: {listed}. Nothing was trained "
            "or deleted. Either use a new --workdir for this config, or start with the "
            f"recorded config ({path}), or pass --allow_config_change to continue this run "
            "with the new values anyway.")
      if changes:
        logging.info("Config changed since the workdir's record (%s): %s", path,
                     "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_lock(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def lock(workdir: str, *, take: bool = True) -> Iterator[None]:
  """Holds `workdir/run.lock` for the duration of a run (only where `take`).

  Raises `WorkdirLockedError` naming the owner when another live run holds it.
  """
  if not take or _is_url(workdir):
    if take:
      logging.info("No workdir lock on %s (not a local path).", workdir)
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  me = {"pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds")}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      owner = _read_lock(path)
      if (owner is not None and owner.get("host") == me["host"]
          and isinstance(owner.get("pid"), int) and not _pid_alive(owner["pid"])):
        logging.warning("Taking over the stale lock %s of process %d (no longer running).",
                        path, owner["pid"])
        os.remove(path)
        continue
      who = (f"process {owner.get('pid')} on {owner.get('host')}, started "
             f"{owner.get('started')}" if owner else "an unknown owner (unreadable lock)")
      raise WorkdirLockedError(
          f"Another run is training in {workdir} ({who}). Wait for it to finish, or use "
          f"another --workdir. If no run is using this workdir (say, its host died), "
          f"delete {path} and start again.") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  try:
    yield
  finally:
    owner = _read_lock(path)
    if owner is not None and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
      os.remove(path)
