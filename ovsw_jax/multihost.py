"""Several processes, one run: start-up, state layout for checkpoints, agreement.

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
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOOPBACK_HOSTS = ("localhost",)


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


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               heartbeat_timeout_s: int = 100, auto: bool = False) -> bool:
  """Joins the multi-process run; returns whether `jax.distributed` was initialised.

  With `coordinator_address`, `num_processes` and `process_id` all given the
  run is started by hand (one command per process). With none of them and
  `auto`, jax detects the cluster (TPU pod, SLURM, ...). A partial set is an
  error that names the missing flags. `heartbeat_timeout_s` bounds how long
  the survivors wait before they are told that a peer died.
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
  kwargs: dict[str, Any] = dict(local_device_ids=local_device_ids,
                                heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  if not missing:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes}).")
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id,
                  coordinator_bind_address=bind_address_for(coordinator_address))
  jax.distributed.initialize(**kwargs)
  return True


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
