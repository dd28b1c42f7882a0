"""Several processes, one run: start-up, agreement, state layout for checkpoints.

A run on a TPU pod or a GPU cluster is one process per host (or per GPU), all
executing the same program; `jax.pmap` spans every device of every process.
This module holds what the trainer needs for that and nothing else:

* `initialize`: `jax.distributed.initialize` from explicit flags, or jax's own
  cluster auto-detection (TPU pods, SLURM) when none is given.
* `to_global` / `to_local`: the train state is replicated on every device. For
  a checkpoint it becomes a fully replicated *global* `jax.Array` (sharding
  `P()` over a mesh of all devices of all processes), which orbax saves once
  and every process restores (orbax rejects host-local arrays when
  `process_count > 1`). The replicated layout also means a checkpoint does not
  depend on the number of processes or devices it was written with.
* `check_agreement`: every process compares its config and package version
  with process 0's before anything is built or written; any difference stops
  all of them with one message naming the fields and processes.
* `share` / `from_process_0`: small strings exchanged through jax's
  coordination service (its key-value store; no device is involved), for
  decisions every process must take alike (which checkpoint to restore).

Joining: a process that never joins, or a duplicate `--process_id=0`, must
not leave the others waiting without a word. Process 0 first claims the
coordinator port (`claim_port`: a second process 0 then stops at once with an
error naming the id). The coordination service waits
`join_timeout_s` for every process to register and then names the missing
ones in its error; that error ends the process from C++, so `initialize`
reports its phase to the supervising parent (`supervisor.report`), which
prints what happened.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import itertools
import json
import logging
import socket
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ovsw_jax.trainer import supervisor

LOOPBACK_HOSTS = ("localhost",)
# The clients wait this much longer than the service: the service's error,
# which names the processes that did not join, then reaches every client.
JOIN_MARGIN_S = 10


def _is_loopback(host: str) -> bool:
  host = host.strip("[]")
  if host in LOOPBACK_HOSTS:
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def bind_address_for(coordinator_address: str) -> str | None:
  """Where process 0 binds the coordination service.

  jax binds `[::]:PORT` (every interface) by default. A coordinator on a
  loopback address (a run on one machine, the tests) binds that address only,
  so nothing outside the machine can reach it. Elsewhere jax's default stands.
  """
  host, sep, port = coordinator_address.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"--coordinator_address={coordinator_address!r} is not HOST:PORT "
                     "(e.g. --coordinator_address=10.0.0.1:1234).")
  return coordinator_address if _is_loopback(host) else None


def parse_device_ids(text: str | None) -> list[int] | None:
  """'0,1,2,3' -> [0, 1, 2, 3]; None or '' -> None (jax decides)."""
  if not text:
    return None
  try:
    ids = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"--local_device_ids={text!r} must be comma-separated integers "
                     "such as 0,1,2,3.") from None
  if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
    raise ValueError(f"--local_device_ids={text!r} must list distinct device numbers >= 0.")
  return ids


def _port_of(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


_claimed: list[socket.socket] = []  # held for the life of process 0 (see `claim_port`)


def claim_port(bind_address: str, *, process_id: int, num_processes: int) -> None:
  """Raises ValueError when another process already serves the coordinator's port.

  What it catches: a second process given `--process_id=0` (the first one
  already serves the run there), or another program on that port. gRPC binds
  with SO_REUSEPORT, so without this check a second service would start on the
  same port and both processes would wait for peers that never come. A probe
  without SO_REUSEPORT fails on any socket bound there; then a socket bound
  with SO_REUSEPORT (never listening, so it takes no connections) holds the
  port until jax's service listens beside it, so two processes 0 started at
  the same moment cannot both pass.
  """
  host, port = _port_of(bind_address)
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed run's TIME_WAIT is fine
    try:
      probe.bind((host, port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return  # cannot tell (say, no IPv6 here): jax reports what it finds
      raise ValueError(
          f"--process_id={process_id}: port {port} of the coordinator is already in use on "
          f"this host. Most likely another process of this run was also given "
          f"--process_id={process_id}: each of the {num_processes} processes needs its own id "
          f"in [0, {num_processes}), and process {process_id} serves the coordinator. "
          "Otherwise another program holds the port: choose another --coordinator_address "
          "port for every process.") from None
  holder = socket.socket(family, socket.SOCK_STREAM)
  try:
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, port))
  except (OSError, AttributeError):  # no SO_REUSEPORT here, or a corner case: probe only
    holder.close()
    return
  _claimed.append(holder)


@contextlib.contextmanager
def _service_register_timeout(timeout_s: int) -> Iterator[None]:
  """Makes the coordination service that `jax.distributed.initialize` starts give up on
  missing processes after `timeout_s` (jax exposes only the clients' timeout, and on its
  expiry the clients end with a bare "Deadline Exceeded" that names nobody)."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  lib = distributed._jax  # pylint: disable=protected-access
  original = getattr(lib, "get_distributed_runtime_service", None)
  if original is None or "cluster_register_timeout" not in (original.__doc__ or ""):
    yield  # another jax: its defaults stand
    return
  lib.get_distributed_runtime_service = functools.partial(
      original, cluster_register_timeout=int(timeout_s))
  try:
    yield
  finally:
    lib.get_distributed_runtime_service = original


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               heartbeat_timeout_s: int = 100, join_timeout_s: int = 300,
               auto: bool = False) -> bool:
  """Joins the multi-process run; returns whether `jax.distributed` was initialised.

  With `coordinator_address`, `num_processes` and `process_id` all given the
  run is started by hand (one command per process). With none of them and
  `auto`, jax detects the cluster (TPU pods, SLURM, ...). A partial set is an
  error that names the missing flags. `join_timeout_s` bounds the wait for
  every process to join (then the missing ones are named);
  `heartbeat_timeout_s` how long the survivors wait before they are told that
  a peer died.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  missing = [k for k, v in given.items() if v is None]
  if len(missing) == len(given) and not auto:
    return False
  if missing and len(missing) < len(given):
    raise ValueError("A hand-started multi-process run needs all of --coordinator_address, "
                     "--num_processes and --process_id; missing: "
                     + ", ".join(f"--{m}" for m in missing)
                     + ". Give all three, or none of them on a cluster jax detects itself "
                     "(TPU pods, SLURM) with --config.distributed_init=True.")
  if join_timeout_s < 1:
    raise ValueError(f"--join_timeout_s={join_timeout_s} must be at least 1 (seconds).")
  kwargs: dict[str, Any] = dict(local_device_ids=local_device_ids,
                                heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                                initialization_timeout=int(join_timeout_s) + JOIN_MARGIN_S)
  logging.info("Joining the multi-process run (waiting up to %d s for every process).",
               join_timeout_s)
  if not missing:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes}).")
    bind = bind_address_for(coordinator_address)
    if process_id == 0:
      claim_port(bind or f"[::]:{_port_of(coordinator_address)[1]}",
                 process_id=process_id, num_processes=num_processes)
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, coordinator_bind_address=bind)
  supervisor.report(phase="joining", process_id=process_id, num_processes=num_processes,
                    coordinator=coordinator_address, join_timeout_s=int(join_timeout_s))
  with _service_register_timeout(join_timeout_s):
    jax.distributed.initialize(**kwargs)
  supervisor.report(phase="joined", process_id=jax.process_index(),
                    num_processes=jax.process_count())
  return True


# --- Small values exchanged through the coordination service ---------------

EXCHANGE_TIMEOUT_S = 1800  # a peer slower than this (a huge checkpoint read) is a hang
_sequence = itertools.count()  # every process makes the same exchanges in the same order


def _client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialised; no coordination service to use.")
  return client


def _key(name: str) -> str:
  return f"ovsw_jax/{next(_sequence)}/{name}"


def _get(client, key: str, timeout_s: float, whose: int) -> str:
  try:
    return client.blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    if "DEADLINE_EXCEEDED" not in str(e):
      raise
    raise TimeoutError(f"Process {whose} did not answer within {timeout_s:.0f} s ({key}); "
                       "read its log for what it is doing.") from None


def share(name: str, value: str, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> list[str]:
  """Every process's `value`, in process order. Every process must call it (same `name`)."""
  if jax.process_count() == 1:
    return [value]
  client, key = _client(), _key(name)
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  return [_get(client, f"{key}/{i}", timeout_s, i) for i in range(jax.process_count())]


def from_process_0(name: str, value: str, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> str:
  """Process 0's `value` on every process. Every process must call it (same `name`)."""
  if jax.process_count() == 1:
    return value
  client, key = _client(), _key(name)
  if jax.process_index() == 0:
    client.key_value_set(key, value)
    return value
  return _get(client, key, timeout_s, 0)


# --- Agreement on what the run is --------------------------------------------

VERSION_FIELD = "ovsw_jax.__version__"


class DisagreementError(ValueError):
  """The processes of one run were started with different configs or package versions."""


def run_record(config_record: dict[str, Any], version: str) -> dict[str, Any]:
  """What every process must hold alike: the config record and the package version."""
  return {"config": config_record, "version": version}


def record_changes(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple]:
  """`{field: (process 0's, this process's)}` for every differing field (dotted names)."""
  from ovsw_jax.trainer import workdir  # pylint: disable=g-import-not-at-top
  changes = workdir.config_changes(reference["config"], other["config"])
  if reference["version"] != other["version"]:
    changes[VERSION_FIELD] = (reference["version"], other["version"])
  return changes


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def disagreement_message(changes: dict[int, dict[str, tuple]], num_processes: int,
                         shown: int = 4) -> str:
  """One paragraph naming each differing process and field (`changes` keyed by process)."""
  parts = []
  for pid in sorted(changes)[:shown]:
    fields = "; ".join(f"{k}: {_short(a)} on process 0, {_short(b)} on process {pid}"
                       for k, (a, b) in changes[pid].items())
    parts.append(f"process {pid} differs from process 0 in {fields}")
  if len(changes) > shown:
    parts.append(f"and {len(changes) - shown} more processes differ")
  fields = sorted({k for c in changes.values() for k in c})
  return (f"The {num_processes} processes of this run were not started alike, so none "
          f"trains: {'; '.join(parts)} (fields: {', '.join(fields)}). Nothing was built or "
          "written. Start every process with the same --config file, the same --config.* "
          "overrides and the same ovsw_jax version.")


def check_agreement(config_record: dict[str, Any], version: str, *,
                    timeout_s: float = EXCHANGE_TIMEOUT_S) -> None:
  """Raises `DisagreementError` on every process unless all hold process 0's record.

  Process 0 publishes its record; every other process compares its own with it
  and publishes the differences; every process reads all of them and so takes
  the same decision.
  """
  if jax.process_count() == 1:
    return
  mine = run_record(config_record, version)
  reference = json.loads(from_process_0("agree/record", json.dumps(mine, sort_keys=True),
                                        timeout_s=timeout_s))
  # Through JSON as well, so both sides compare the same representation.
  mine = json.loads(json.dumps(mine, sort_keys=True))
  own = {k: list(v) for k, v in record_changes(reference, mine).items()}
  verdicts = share("agree/changes", json.dumps(own), timeout_s=timeout_s)
  changes = {pid: {k: tuple(v) for k, v in json.loads(text).items()}
             for pid, text in enumerate(verdicts)}
  changes = {pid: c for pid, c in changes.items() if c}
  if changes:
    raise DisagreementError(disagreement_message(changes, jax.process_count()))


def global_mesh() -> Mesh:
  """A 1-D mesh of every device of every process, in jax's global order."""
  return Mesh(np.asarray(jax.devices()), ("devices",))


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(tree: Any, mesh: Mesh | None = None) -> Any:
  """A host-local (unreplicated, one copy) tree -> fully replicated global arrays.

  Every process must hold the same values (the train state does: it is
  computed identically everywhere). The result holds its own copies on every
  local device, so the caller may donate or delete `tree` afterwards.
  """
  mesh = global_mesh() if mesh is None else mesh
  sharding = _replicated(mesh)
  local = list(mesh.local_devices)

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(x, d) for d in local])
  return jax.tree.map(one, tree)


def abstract_global(tree: Any, mesh: Mesh | None = None) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree` with the replicated global sharding (restore target)."""
  sharding = _replicated(global_mesh() if mesh is None else mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)


def to_local(tree: Any) -> Any:
  """Replicated global arrays -> one host-local copy each (numpy), for the train loop."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def log_layout() -> None:
  logging.info("JAX process %d of %d; %d local of %d devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
