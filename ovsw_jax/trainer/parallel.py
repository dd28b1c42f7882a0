"""How the trainer runs its per-device step on every device: `jax.pmap` or `jax.jit`.

The train loop needs four things of a data-parallel scheme, and nothing else:
`compile` a per-device function (a train, eval or interval step that knows of
parallelism only its collectives' `axis_name`), `replicate` the host state on
the devices, `shard` a host batch over them, and `unreplicate` a replicated
result back to one copy (`jax.device_get` of that is the host state that
checkpoints hold, whichever scheme made it).

* `Pmap`: `jax.pmap` over the local devices; the state carries a leading
  device axis (`flax.jax_utils.replicate`), each batch is reshaped to
  `(local devices, per device, ...)`.
* `Jit`: `jax.jit` of `jax.shard_map` over a 1-D `Mesh` of all devices of all
  processes; the state is one global array per leaf, replicated
  (`NamedSharding(mesh, P())`), the batch one global array sharded on its
  leading axis (`P(axis_name)`), assembled from each process's rows.

Both run the same per-device body with the same collectives (`pmap` is itself
`jit` of `shard_map` in jax 0.10), so the two give the same state.
`config.parallelism` picks one (`create`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovsw_jax.trainer import multihost

CHOICES = ("pmap", "jit")


class Pmap:
  """`jax.pmap` over the local devices; the state has a leading device axis."""

  name = "pmap"

  def __init__(self, axis_name: str):
    self.axis_name = axis_name

  def compile(self, fn: Callable, *, donate: bool = False, batches: int = 1) -> Callable:
    """`fn(state, *batches)` on every local device; outputs keep the device axis."""
    del batches  # every argument is mapped over its leading (device) axis
    return jax.pmap(fn, axis_name=self.axis_name, donate_argnums=(0,) if donate else ())

  def replicate(self, tree: Any) -> Any:
    return jax_utils.replicate(tree)

  def shard(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows, reshaped to `(local_devices, per_device, ...)`."""
    n = jax.local_device_count()

    def reshape(x):
      if x.shape[0] % n:
        raise ValueError(f"A batch of {x.shape[0]} does not split over {n} local devices: "
                         "make the batch size a multiple of the device count.")
      return x.reshape((n, -1) + x.shape[1:])
    return jax.tree.map(reshape, batch)

  def unreplicate(self, tree: Any) -> Any:
    """The first device's copy (all copies are equal: the step averages over devices)."""
    return jax_utils.unreplicate(tree)


def _shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  # Unchecked replication, as `jax.pmap` runs its body: with the check on,
  # autodiff would sum the gradients of replicated parameters over devices
  # itself, and the step's own `pmean` would no longer see per-device values.
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  from jax.experimental.shard_map import shard_map  # jax < 0.7
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def global_devices() -> list[jax.Device]:
  """Every device of the run, grouped by process, as `jax.pmap` orders them.

  Each process's devices are then one contiguous block of the mesh, holding
  that process's rows of the global batch (the rows pmap gives it).
  """
  return [d for p in range(jax.process_count())
          for d in sorted((d for d in jax.devices() if d.process_index == p),
                          key=lambda d: d.id)]


class Jit:
  """`jax.jit` of `jax.shard_map` over a 1-D mesh of all devices (named `axis_name`).

  The state is replicated (`P()`), batches are sharded on their leading axis
  (`P(axis_name)`); inside, each device runs exactly the body pmap runs.
  Outputs are replicated global arrays: the step averages (`pmean`) or sums
  (`psum`) everything it returns over `axis_name`, BatchNorm its statistics.
  """

  name = "jit"

  def __init__(self, axis_name: str, devices: list[jax.Device] | None = None):
    self.axis_name = axis_name
    self.mesh = Mesh(np.asarray(global_devices() if devices is None else devices),
                     (axis_name,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(axis_name))

  def compile(self, fn: Callable, *, donate: bool = False, batches: int = 1) -> Callable:
    """`fn(state, *batches)` on every device; `batches` is how many sharded arguments follow."""
    mapped = _shard_map(fn, self.mesh, in_specs=(P(),) + (P(self.axis_name),) * batches,
                        out_specs=P())
    return jax.jit(mapped, donate_argnums=(0,) if donate else ())

  def replicate(self, tree: Any) -> Any:
    """A copy of the host tree on every device, as global arrays (same values on every process)."""
    return multihost.to_global(tree, self.mesh)

  def shard(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch, from this process's rows of it, split over all devices."""
    n = len(self.mesh.local_devices)
    for x in jax.tree.leaves(batch):
      if x.shape[0] % n:
        raise ValueError(f"A batch of {x.shape[0]} does not split over {n} local devices: "
                         "make the batch size a multiple of the device count.")
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

  def unreplicate(self, tree: Any) -> Any:
    """The tree itself: a replicated global array already is one copy to the host."""
    return tree


def check(name: str) -> None:
  """ValueError naming the field and the choices unless `name` is one of `CHOICES`."""
  if name not in CHOICES:
    raise ValueError(f"config.parallelism={name!r} is invalid: use one of "
                     f"{', '.join(map(repr, CHOICES))} (e.g. --config.parallelism=jit).")


def create(name: str, axis_name: str) -> Pmap | Jit:
  """The scheme `config.parallelism` names, its collectives over `axis_name`."""
  check(name)
  return Pmap(axis_name) if name == "pmap" else Jit(axis_name)
