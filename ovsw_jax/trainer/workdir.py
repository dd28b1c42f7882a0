"""What a workdir holds besides checkpoints: the run's config record and its lock.

Every file here is read and written through `etils.epath`, as orbax does, so a
workdir may be a local path or an object-store URL (`gs://bucket/run`).

* `config.json`: the config the run was started with, written by process 0
  (`write_atomically`). A restart compares its config with it
  (`check_config`): a change that alters what the checkpointed state is or
  means stops the run with the differing fields and the ways out; changes that
  leave it intact (the learning rate and its schedule, the run length,
  logging, evaluation and checkpoint cadence, where the data live) pass with
  one log line. Each checkpoint also carries the config it was trained with
  (`checkpointing.save`); when `config.json` is damaged or missing, that one is
  compared instead, and a damaged record that no checkpoint can stand in for
  stops the run like a mismatch.
* `run.lock`: the run that trains in the workdir, taken by process 0 (the
  processes of one multi-process run share it). It is a lease (`WorkdirLock`):
  the owner rewrites its timestamp every quarter of `LEASE_S`, a second run
  stops at once while it does, and once it stopped (the owner died, was killed
  or lost its host) any host takes the lock over after the lease ran out; on
  the owner's own host a lock whose process is gone is taken over at once.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
# The metrics a run logged, one JSON object a line (written by `ovsw_jax.trainer.run_log`).
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "run.lock"
# Seconds a lock stays valid after its last renewal; the owner renews it every
# `LEASE_S * RENEW_FRACTION`. Hosts' clocks must agree to well within it.
LEASE_S = 60.0
RENEW_FRACTION = 0.25

# Fields a restart may change: they do not alter the checkpointed state's
# structure or meaning (lowering the learning rate is the usual fix after a
# non-finite stop). A field matches itself and everything under it. Where the
# data live (`data_dir`, `corpus_dir`) may change; what they are may not (tfds
# names its version, a task's data record its content: the 'data' key).
CHANGEABLE = (
    "learning_rate", "lr_schedule", "warmup_epochs", "num_epochs", "num_train_steps",
    "log_every_steps", "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
    "eval_batch_size", "data_dir", "corpus_dir", "distributed_init", "prefetch", "parallelism",
    # How the host makes the batches, not what they are (records of runs started
    # before data workers existed name `num_workers`, the decode threads then).
    "data_workers", "decode_threads", "read_threads", "num_workers",
    # Like `parallelism`, the matmul precision changes the rounding of the steps
    # after the restart, not what the checkpointed state is (moving a run to
    # another kind of accelerator changes that rounding too): switching to
    # faster passes mid-run, or back to float32, must not force a new run.
    "matmul_precision",
)


_ABSENT = "<absent>"
# Dicts whose keys the user chooses (model settings): a key missing from the
# record there is a change, never a field declared since the record was written.
FREE_FORM = ("model_kwargs.", "data.")


class ConfigMismatchError(ValueError):
  """The config differs from the workdir's record in a field that changes the run."""


class ConfigRecordDamagedError(ConfigMismatchError):
  """The workdir has checkpoints, but no readable record of the config they were trained with."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


def is_local(path: str | os.PathLike) -> bool:
  """False for object-store and other URLs (`gs://...`): no atomic rename or exclusive create."""
  return "://" not in os.fspath(path)


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` to `path` so that a reader sees the old content or the new, never a part.

  Local: a temporary file renamed over `path`. Object stores replace whole
  objects anyway (a rename there is a copy and a delete), so it is written directly.
  """
  path = epath.Path(path)
  write = (lambda p: p.write_bytes(data)) if isinstance(data, bytes) else (
      lambda p: p.write_text(data))
  if not is_local(path):
    write(path)
    return
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
  write(tmp)
  tmp.replace(path)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_record(config: ml_collections.ConfigDict,
                  data: dict[str, Any] | None = None) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists, as they do on disk).

  `data`: what the task records of its data (`Task.data_record`, e.g. the
  language model's corpus digest and Python version), kept under 'data' and
  compared on resume like the config's fields.
  """
  record = json.loads(config.to_json_best_effort(sort_keys=True))
  if data is not None:
    record["data"] = json.loads(json.dumps(data, sort_keys=True))
  return record


def _changeable(key: str) -> bool:
  return any(key == f or key.startswith(f + ".") for f in CHANGEABLE)


def config_changes(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
  """`{field: (recorded, current)}` for every dotted field that differs."""
  a, b = _flat(recorded), _flat(current)
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
          for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def read_record(path: epath.Path) -> tuple[dict[str, Any] | None, str | None]:
  """`(record, None)`, or `(None, why)` for a missing or damaged (truncated, not JSON) record."""
  if not path.exists():
    return None, "missing"
  try:
    record = json.loads(path.read_text())
  except ValueError as e:
    return None, f"damaged: not valid JSON ({e})"
  if not isinstance(record, dict):
    return None, f"damaged: a JSON {type(record).__name__}, not an object"
  return record, None


def _compare(workdir: str, recorded: dict[str, Any], current: dict[str, Any], *,
             source: str, allow_change: bool) -> None:
  """Raises `ConfigMismatchError` for a blocking change (unless `allow_change`); logs the rest."""
  changes = config_changes(recorded, current)
  # A field absent from the record did not exist when the run started (the
  # record predates it): it takes its value now, with a warning.
  added = {k: b for k, (a, b) in changes.items()
           if a == _ABSENT and not k.startswith(FREE_FORM)}
  if added:
    logging.warning("Fields not in %s (added since it was written), taken as they are now: %s",
                    source, "; ".join(f"{k}={v!r}" for k, v in added.items()))
  blocking = {k: v for k, v in changes.items() if not _changeable(k) and k not in added}
  if blocking and not allow_change:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in blocking.items())
    data = ""
    if any(k.startswith("data.") for k in blocking):
      same = "; ".join(f"{k}={v!r}" for k, v in _flat(recorded).items()
                       if k.startswith("data.") and k not in blocking)
      data = (" The data.* fields are the task's record of the data the run read, and this "
              "process reads other data: continue the run where it reads the recorded data"
              f"{f' (unchanged: {same})' if same else ''}.")
    raise ConfigMismatchError(
        f"The workdir {workdir} holds a run trained with another config, and these "
        f"fields change what its checkpoints are or mean: {listed}. Nothing was trained "
        f"or deleted.{data} Either use a new --workdir for this config, or start with the "
        f"recorded config ({source}), or pass --allow_config_change to continue this run "
        "with the new values anyway.")
  if changes:
    logging.info("Config changed since %s: %s", source,
                 "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))


def check_config(workdir: str, config: ml_collections.ConfigDict, *, has_checkpoint: bool,
                 allow_change: bool = False, write: bool = True,
                 checkpoint_config: Callable[[], dict[str, Any] | None] | None = None,
                 data: dict[str, Any] | None = None) -> None:
  """Compares `config` with the workdir's record, then records it.

  Raises `ConfigMismatchError` when a checkpoint exists and a field outside
  `CHANGEABLE` differs (unless `allow_change`). With no checkpoint there is no
  run to protect: the record is replaced. `write` is False on processes > 0.

  `checkpoint_config` returns the config saved with the newest checkpoint (or
  None); it is asked only when `config.json` is missing or damaged, and its
  config is then compared instead. A damaged `config.json` with no checkpoint
  config raises `ConfigRecordDamagedError` (unless `allow_change`); a missing
  one with none is logged (checkpoints written before configs were saved in them).
  `data` is the task's data record (`config_record`).
  """
  path = epath.Path(workdir) / CONFIG_FILE
  current = config_record(config, data)
  if has_checkpoint:
    recorded, problem = read_record(path)
    source = f"the workdir's record ({path})"
    if recorded is None:
      saved = checkpoint_config() if checkpoint_config is not None else None
      if saved is not None:
        logging.warning("%s is %s; comparing the config with the one saved in the newest "
                        "checkpoint instead, and recording it again.", path, problem)
        recorded, source = saved, f"the config saved in the newest checkpoint ({path} is {problem})"
      elif problem != "missing" and not allow_change:
        raise ConfigRecordDamagedError(
            f"The workdir {workdir} holds checkpoints, but its config record {path} is "
            f"{problem}, and no checkpoint carries its config: whether this config is the one "
            "the checkpoints were trained with cannot be checked. Nothing was trained or "
            "deleted. Either use a new --workdir, or, if this is the run's config, pass "
            "--allow_config_change to continue (the record is then written again).")
      else:
        logging.warning("%s is %s and no checkpoint carries its config; continuing unchecked "
                        "and recording the current config.", path, problem)
    if recorded is not None:
      _compare(workdir, recorded, current, source=source, allow_change=allow_change)
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`workdir/run.lock` as a lease: `{"pid", "host", "token", "started", "renewed", "lease_s"}`.

  `acquire` creates it, or takes over a stale one: a lock not renewed for its
  `lease_s` (from any host; an unreadable lock counts from its modification
  time), or one of this host whose process is gone (at once). A lock of
  another host that is not stale yet is watched (with `wait`) until it is
  renewed (its run is alive: `WorkdirLockedError`) or its lease runs out (taken
  over), so a requeue on another node right after a kill starts by itself
  within a lease. A live lock of this host is refused at once. `renew`
  rewrites `renewed`; `start_renewal` does so every `lease_s * RENEW_FRACTION`
  on a daemon thread until `release`. A renewal that finds another token in
  the file (the lease ran out, say while the process was stopped, and another
  run took the lock) sets `lost`, logs an error and renews no more.

  `clock` (seconds since the epoch, compared across hosts), `sleep`, `host`
  and `pid` are injectable for tests.

  Atomicity: on a local disk (NFS included) the lock is created with an
  exclusive create and taken over by renaming the stale file aside, so of two
  runs only one gets it. Object stores offer neither through `epath`: there
  creating is a check, a write and a read-back, so two runs that start within
  that moment can both believe they hold it; the loser finds out at its next
  renewal (`lost`, an error in its log) but is not stopped.
  """

  def __init__(self, workdir: str | os.PathLike, *, lease_s: float = LEASE_S,
               clock: Callable[[], float] = time.time, host: str | None = None,
               pid: int | None = None, wait: bool = True,
               sleep: Callable[[float], None] = time.sleep):
    if not lease_s > 0:
      raise ValueError(f"lease_s={lease_s!r} must be a positive number of seconds")
    self.workdir = str(workdir)
    self.path = epath.Path(workdir) / LOCK_FILE
    self.lease_s = float(lease_s)
    self.lost = False
    self._clock = clock
    self._sleep = sleep
    self._wait = wait
    self._host = socket.gethostname() if host is None else host
    self._pid = os.getpid() if pid is None else pid
    self._token = uuid.uuid4().hex
    self._started = datetime.datetime.now().isoformat(timespec="seconds")
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> dict[str, Any]:
    return {"pid": self._pid, "host": self._host, "token": self._token,
            "started": self._started, "renewed": self._clock(), "lease_s": self.lease_s}

  def _read(self) -> dict[str, Any] | None:
    try:
      owner = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None
    return owner if isinstance(owner, dict) else None

  def _create(self) -> bool:
    """Writes a new lock if there is none; True if this one now holds it."""
    text = json.dumps(self._record())
    if is_local(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    if self.path.exists():
      return False
    self.path.write_text(text)
    owner = self._read()
    return owner is not None and owner.get("token") == self._token

  def _mtime(self) -> float | None:
    try:
      return float(self.path.stat().mtime)
    except (OSError, AttributeError, ValueError):
      return None

  def stale_reason(self, owner: dict[str, Any] | None) -> str | None:
    """Why the lock held by `owner` (None: unreadable) may be taken over, or None if not."""
    now = self._clock()
    if owner is None:
      mtime = self._mtime()
      if mtime is not None and now - mtime > self.lease_s:
        return f"it is unreadable and was last written {now - mtime:.0f} s ago"
      return None
    pid = owner.get("pid")
    if owner.get("host") == self._host and isinstance(pid, int) and not _pid_alive(pid):
      return f"its process {pid} on this host is no longer running"
    renewed = owner.get("renewed")
    if not isinstance(renewed, (int, float)):  # a lock of a version without leases
      renewed = self._mtime()
    lease = self._owner_lease(owner)
    if renewed is not None and now - renewed > lease:
      return f"it was not renewed for {now - renewed:.0f} s (its lease is {lease:.0f} s)"
    return None

  def _owner_lease(self, owner: dict[str, Any] | None) -> float:
    lease = (owner or {}).get("lease_s")
    return float(lease) if isinstance(lease, (int, float)) and lease > 0 else self.lease_s

  def _watch(self, owner: dict[str, Any] | None) -> str | None:
    """Waits until the lock of another host is renewed (None: alive) or stale (the reason)."""
    poll = max(self._owner_lease(owner) * RENEW_FRACTION / 4, 0.01)
    who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "an unknown owner"
    logging.warning("%s holds the workdir lock %s: waiting up to its lease (%.0f s) for it to "
                    "be renewed (that run is alive) or to run out (it is gone).",
                    who, self.path, self._owner_lease(owner))
    while True:
      self._sleep(poll)
      now = self._read()
      if now is None and not self.path.exists():
        return "it was released"
      if now != owner:
        return None  # renewed, or taken by another run
      reason = self.stale_reason(owner)
      if reason is not None:
        return reason

  def _locked_error(self, owner: dict[str, Any] | None) -> WorkdirLockedError:
    if owner is None:
      who = "an unknown owner (the lock is unreadable)"
      expiry = f"{self.lease_s:.0f} s after it was last written"
    else:
      who = (f"process {owner.get('pid')} on {owner.get('host')}, started "
             f"{owner.get('started')}")
      renewed, lease = owner.get("renewed"), owner.get("lease_s", self.lease_s)
      if isinstance(renewed, (int, float)) and isinstance(lease, (int, float)):
        left = max(renewed + lease - self._clock(), 0.0)
        who += f", lock renewed {self._clock() - renewed:.0f} s ago"
        expiry = f"in {left:.0f} s unless it is renewed"
      else:
        expiry = f"{self.lease_s:.0f} s after it was last written"
    return WorkdirLockedError(
        f"Another run is training in {self.workdir} ({who}). Wait for it to finish, or use "
        f"another --workdir. If no run is using this workdir (say, its host died), its lock "
        f"expires {expiry} and a new start then takes it over; to start at once, delete "
        f"{self.path}.")

  def _remove_stale(self, owner: dict[str, Any] | None) -> bool:
    """Removes the stale lock judged from `owner`; False if it changed meanwhile."""
    if not is_local(self.path):
      if self._read() != owner:
        return False
      self.path.unlink(missing_ok=True)
      return True
    aside = self.path.parent / f".{self.path.name}.stale-{self._token}"
    try:
      self.path.rename(aside)  # of two runs taking over, one renames it, the other fails
    except FileNotFoundError:
      return False
    moved = _read_json(aside)
    if owner is not None and moved != owner:  # renewed or replaced since judged: put back
      aside.rename(self.path)
      return False
    aside.unlink(missing_ok=True)
    return True

  def acquire(self) -> None:
    """Takes the lock; raises `WorkdirLockedError` naming the owner while another run holds it."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create():
        return
      owner = self._read()
      reason = self.stale_reason(owner)
      if reason is None and self._wait and (owner is None or owner.get("host") != self._host):
        reason = self._watch(owner)
        if reason == "it was released":
          continue
      if reason is None:
        raise self._locked_error(self._read())
      if self._remove_stale(owner):
        who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "its owner"
        logging.warning("Taking over the lock %s of %s: %s.", self.path, who, reason)
    raise self._locked_error(self._read())

  def renew(self) -> bool:
    """Rewrites the lock's timestamp; False (and `lost`) if another run holds it now."""
    if self.lost:
      return False
    owner = self._read()
    if owner is not None and owner.get("token") != self._token:
      self.lost = True
      logging.error("The workdir lock %s was taken over by process %s on %s: this run's lease "
                    "had run out (was the process stopped?). Two runs may now write to %s; "
                    "stop one.", self.path, owner.get("pid"), owner.get("host"), self.workdir)
      return False
    write_atomically(self.path, json.dumps(self._record()))
    return True

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.lease_s * RENEW_FRACTION):
      try:
        if not self.renew():
          return
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Renewing the workdir lock %s failed (%s); retrying.", self.path, e)

  def start_renewal(self) -> None:
    """Renews the lease on a daemon thread until `release`."""
    self._thread = threading.Thread(target=self._renew_loop, name="workdir-lock-lease",
                                    daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops renewing and removes the lock if this run still holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    owner = self._read()
    if owner is not None and owner.get("token") == self._token:
      self.path.unlink(missing_ok=True)


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


@contextlib.contextmanager
def lock(workdir: str, *, take: bool = True, lease_s: float = LEASE_S,
         clock: Callable[[], float] = time.time) -> Iterator[WorkdirLock | None]:
  """Holds `workdir/run.lock` for the duration of a run (only where `take`), renewing it.

  Raises `WorkdirLockedError` naming the owner when another live run holds it
  (a lock of another host is first watched for up to its lease: see `WorkdirLock`).
  """
  if not take:
    yield None
    return
  held = WorkdirLock(workdir, lease_s=lease_s, clock=clock)
  held.acquire()
  if not is_local(workdir):
    logging.info("Holding the workdir lock %s (on an object store: not atomic, see "
                 "ovsw_jax/trainer/workdir.py).", held.path)
  held.start_renewal()
  try:
    yield held
  finally:
    held.release()
