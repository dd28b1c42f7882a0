"""A second task for the tests, written as a user would: one module and a config naming it.

`config.task = "toy_task"` (this module on the Python path): is the sum of a
random 4x4 image positive? One logit, sigmoid cross entropy, accuracy only;
batches drawn from `np.random.default_rng([seed, step])`, so they are a pure
function of (seed, step) as the trainer's resume needs; a fixed evaluation
set of 36 examples in batches padded and masked as the trainer expects
(`base.padded_batches`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from ovsw_jax.trainer.tasks import base

SHAPE = (4, 4, 1)
NUM_EVAL = 36


def _examples(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  inputs = rng.standard_normal((n,) + SHAPE).astype(np.float32)
  return {"inputs": inputs, "target": (inputs.sum(axis=(1, 2, 3)) > 0).astype(np.float32)}


class PositiveSum(base.Task):
  metric_names = ("accuracy",)

  @property
  def num_train(self) -> int:
    return 256

  def create_model(self, bn_axis_name):
    return base.create_model(self.config, 1, bn_axis_name)

  def init_inputs(self):
    return jnp.zeros((1,) + SHAPE, jnp.float32)

  def _losses(self, outputs, batch):
    return optax.sigmoid_binary_cross_entropy(outputs[:, 0].astype(jnp.float32), batch["target"])

  def _correct(self, outputs, batch):
    return ((outputs[:, 0] > 0) == (batch["target"] > 0.5)).astype(jnp.float32)

  def train_loss(self, outputs, batch):
    return jnp.mean(self._losses(outputs, batch))

  def train_metrics(self, outputs, batch):
    return {"accuracy": jnp.mean(self._correct(outputs, batch))}

  def eval_sums(self, outputs, batch):
    weight = batch["mask"].astype(jnp.float32)
    return {"loss": jnp.sum(self._losses(outputs, batch) * weight),
            "accuracy": jnp.sum(self._correct(outputs, batch) * weight),
            "count": jnp.sum(weight)}

  def train_batches(self, *, global_batch_size, start_step, seed, process_index, process_count):
    local = global_batch_size // process_count
    step = start_step
    while True:
      batch = _examples(np.random.default_rng([seed, step]), global_batch_size)
      yield {k: v[process_index * local:(process_index + 1) * local] for k, v in batch.items()}
      step += 1

  def eval_batches(self, *, global_batch_size, process_index, process_count):
    return base.padded_batches(_examples(np.random.default_rng([7]), NUM_EVAL),
                               global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count)


TASK = PositiveSum
