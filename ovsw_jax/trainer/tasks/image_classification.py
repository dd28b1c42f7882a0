"""Image classification (`config.task="image_classification"`): the paper's task.

Batches come from `input_pipeline` (digits, CIFAR-10/100, ImageNet; `config.dataset`),
uint8 ones normalised on the device (`data.device`). The loss is softmax cross
entropy with `config.label_smoothing` in training and without it in evaluation;
the metrics are top-1 and top-5 accuracy (top-k with k = min(5, classes)).
"""

from __future__ import annotations

import functools
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ovsw_jax.trainer import input_pipeline
from ovsw_jax.trainer.data import device
from ovsw_jax.trainer.tasks import base


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross entropy, with optional label smoothing (in float32)."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def correct(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-example 1.0/0.0: 'accuracy' (top-1 right) and 'top5' (label among the top 5)."""
  logits = logits.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return {
      "accuracy": (topk[:, 0] == labels).astype(jnp.float32),
      "top5": jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32),
  }


class ImageClassification(base.Task):
  """Labels of images: `config.model` over `config.dataset`'s classes."""
  metric_names = ("accuracy", "top5")

  def __init__(self, config, info: input_pipeline.DatasetInfo | None = None):
    """`info` stands in for the dataset's (benchmarks and tests that make their own batches)."""
    super().__init__(config)
    if info is not None:
      self.info = info
    self._eval_passes = {}

  @functools.cached_property
  def info(self) -> input_pipeline.DatasetInfo:
    """The dataset's shapes and sizes (reads its metadata, not its examples)."""
    return input_pipeline.get_info(self.config)

  @property
  def num_train(self) -> int:
    return self.info.num_train

  def create_model(self, bn_axis_name: str | None) -> nn.Module:
    return base.create_model(self.config, self.info.num_classes, bn_axis_name)

  def init_inputs(self) -> jax.Array:
    return jnp.zeros((1,) + tuple(self.info.image_shape), jnp.float32)

  def inputs(self, batch: base.Batch) -> jax.Array:
    return device.model_images(batch, self.info.pixel_stats)

  def train_loss(self, outputs: jax.Array, batch: base.Batch) -> jax.Array:
    return jnp.mean(cross_entropy(outputs, batch["label"], self.info.num_classes,
                                  self.config.label_smoothing))

  def train_metrics(self, outputs: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
    return {k: jnp.mean(v) for k, v in correct(outputs, batch["label"]).items()}

  def eval_sums(self, outputs: jax.Array, batch: base.Batch) -> dict[str, jax.Array]:
    weight = batch["mask"].astype(jnp.float32)
    per_example = correct(outputs, batch["label"])
    return {
        "loss": jnp.sum(cross_entropy(outputs, batch["label"], self.info.num_classes) * weight),
        "accuracy": jnp.sum(per_example["accuracy"] * weight),
        "top5": jnp.sum(per_example["top5"] * weight),
        "count": jnp.sum(weight),
    }

  def train_batches(self, *, global_batch_size: int, start_step: int, seed: int,
                    process_index: int, process_count: int) -> Iterator[base.Batch]:
    return input_pipeline.train_iterator(
        self.config, global_batch_size=global_batch_size, start_step=start_step, seed=seed,
        process_index=process_index, process_count=process_count)

  def eval_batches(self, *, global_batch_size: int, process_index: int,
                   process_count: int) -> Iterator[base.Batch]:
    # One set of passes per layout, kept by the task: ImageNet's data workers
    # then start at the first evaluation only, not at every one.
    key = (global_batch_size, process_index, process_count)
    if key not in self._eval_passes:
      self._eval_passes[key] = input_pipeline.eval_passes(
          self.config, global_batch_size=global_batch_size, process_index=process_index,
          process_count=process_count)
    return self._eval_passes[key]()

  def close(self) -> None:
    for passes in self._eval_passes.values():
      passes.close()
    self._eval_passes.clear()


TASK = ImageClassification
