"""The task interface: what one kind of training job supplies to the trainer.

The trainer's train step (`train.train_step`) is one pure function for every
task: it applies the model to `task.inputs(batch)`, differentiates
`task.train_loss`, averages gradients and `task.train_metrics` over the
devices, and updates the optimizer, the flip history and OvSW's state. The
evaluation step sums `task.eval_sums` over the real examples of every batch
of `task.eval_batches`; the trainer divides by the count. Batches must be a
pure function of (seed, step), so a resumed run reads exactly what an
uninterrupted one would (see `input_pipeline`).

Methods that run inside the compiled step (`inputs`, `train_loss`,
`train_metrics`, `eval_sums`) must be pure jax functions of their arguments.
"""

from __future__ import annotations

import abc
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovsw_jax import models

Batch = dict[str, Any]


def padded_batches(examples: Batch, *, global_batch_size: int, process_index: int,
                   process_count: int) -> Iterator[Batch]:
  """One pass over in-memory `examples` (arrays, examples on the leading axis) in global batches.

  The last batch is filled by repeating the last example with `mask` False, so
  every batch has the same shape and each example counts once; each process
  gets its rows (`global_batch_size // process_count` of them) of every batch.
  """
  total = len(next(iter(examples.values())))
  local = global_batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  for start in range(0, total, global_batch_size):
    positions = np.arange(start, start + global_batch_size)
    batch = {k: v[np.minimum(positions, total - 1)] for k, v in examples.items()}
    batch["mask"] = positions < total
    yield {k: v[rows] for k, v in batch.items()}


def create_model(config: ml_collections.ConfigDict, num_outputs: int,
                 bn_axis_name: str | None) -> nn.Module:
  """`config.model` from the registry with `num_outputs` outputs, in bfloat16 when
  `config.half_precision` (parameters stay float32)."""
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  kwargs = dict(config.get("model_kwargs", {}) or {})
  return models.get_model(config.model, num_classes=num_outputs, dtype=dtype,
                          bn_axis_name=bn_axis_name, **kwargs)


class Task(abc.ABC):
  """One kind of training job. Subclasses are built from the run's config alone.

  Attributes:
    config: the run's config.
    metric_names: the per-step metrics `train_metrics` returns and `eval_sums`
      sums (besides 'loss' and 'count'); the trainer logs them as
      `train_<name>` and `eval_<name>`.
    eval_denominators: `eval_sums` keys divided by another key's total than
      'count' (`{name: count_key}`; the count keys are logged as
      `eval_<count_key>`): figures of several parts of one evaluation pass,
      e.g. a validation and a test split.
  """
  metric_names: tuple[str, ...] = ()
  eval_denominators: dict[str, str] = {}

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @property
  @abc.abstractmethod
  def num_train(self) -> int:
    """Training examples per epoch (the steps per epoch are `num_train // batch_size`)."""

  def data_record(self) -> dict[str, Any] | None:
    """Facts about the data that the run's config record keeps (`config.json`, key 'data').

    A resume, and every process of a multi-process run, must see the same
    ones; a difference stops the run with the field named. None: nothing
    beyond the config (the data are named by it, e.g. a tfds version).
    """
    return None

  @abc.abstractmethod
  def create_model(self, bn_axis_name: str | None) -> nn.Module:
    """The model; BatchNorm statistics are averaged over `bn_axis_name` (None: none)."""

  @abc.abstractmethod
  def init_inputs(self) -> jax.Array:
    """A batch of one example as the model takes it, for `model.init`."""

  def inputs(self, batch: Batch) -> jax.Array:
    """What the model is applied to, from a batch on the device (default `batch['inputs']`)."""
    return batch["inputs"]

  @abc.abstractmethod
  def train_loss(self, outputs: jax.Array, batch: Batch) -> jax.Array:
    """The scalar loss the step minimises, over this device's part of the batch."""

  @abc.abstractmethod
  def train_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """`metric_names` -> scalar means over this device's part of the batch."""

  @abc.abstractmethod
  def eval_sums(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the real examples (`batch['mask']`) of 'loss', each metric, and 'count'."""

  @abc.abstractmethod
  def train_batches(self, *, global_batch_size: int, start_step: int, seed: int,
                    process_index: int, process_count: int) -> Iterator[Batch]:
    """This process's rows of the global batches of steps `start_step`, `start_step + 1`, ..."""

  @abc.abstractmethod
  def eval_batches(self, *, global_batch_size: int, process_index: int,
                   process_count: int) -> Iterator[Batch]:
    """One pass over the evaluation split; padding rows have `mask` False."""

  def close(self) -> None:
    """Releases what the task keeps between calls (data worker processes); the
    trainer calls it when the run ends, however it ends. Nothing by default."""
    return None
