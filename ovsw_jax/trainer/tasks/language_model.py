"""Byte-level language modelling (`config.task="language_model"`) on Python's own sources.

The corpus is the running interpreter's standard library (`data.stdlib_text`;
`config.corpus_dir` points elsewhere, e.g. a small fake one in the tests),
the model `config.model` over its 257 tokens (`models.transformer`). The loss
is the mean negative log-likelihood (nats) of the next byte; the metric is
bits per byte (the loss over ln 2).

Training windows of `model_kwargs.context + 1` tokens start at positions
drawn from `np.random.default_rng([seed, step])`: a batch is a pure function
of (seed, step), and each process takes its rows of the global batch.

Evaluation is exact: the validation split and then the test split are cut
into consecutive windows, so every byte of each is a target exactly once
(`eval_windows`); the last window of a split is padded, padding and file
starts (`BOS`) weigh 0, and rows that fill the last batch have `mask` False.
One pass gives `eval_bits_per_byte` (validation) and `eval_test_bits_per_byte`,
each divided by its own byte count (`eval_denominators`).

The corpus's digest and Python version go into the run's config record
(`data_record`): resuming on other data is refused, never silent.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ovsw_jax.trainer.data import stdlib_text
from ovsw_jax.trainer.tasks import base

LN2 = math.log(2.0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats (float32), `logits` `(..., vocab)`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def train_windows(stream: np.ndarray, context: int, starts: np.ndarray) -> base.Batch:
  """Inputs, next-token targets and weights (0 for a `BOS` target) of windows at `starts`."""
  idx = starts[:, None] + np.arange(context + 1)[None, :]
  tokens = stream[idx]
  targets = tokens[:, 1:]
  return {"inputs": tokens[:, :-1], "targets": targets,
          "weights": (targets != stdlib_text.BOS).astype(np.float32)}


def eval_windows(stream: np.ndarray, context: int) -> base.Batch:
  """Consecutive windows over `stream` predicting each of its tokens after the first once.

  Window k has inputs `stream[k*T : k*T + T]` and targets one token later;
  the stream is padded with `BOS` to a whole number of windows, and padding
  and `BOS` targets weigh 0. Weights sum to the split's bytes.
  """
  n = stream.size
  count = max(-(-(n - 1) // context), 1)
  padded = np.full(count * context + 1, stdlib_text.BOS, np.int32)
  padded[:n] = stream
  tokens = padded[:-1].reshape(count, context)
  targets = padded[1:].reshape(count, context)
  weights = (targets != stdlib_text.BOS).astype(np.float32)
  return {"inputs": tokens, "targets": targets, "weights": weights}


class LanguageModel(base.Task):
  """Next-byte prediction on the standard library's sources (module docstring)."""
  metric_names = ("bits_per_byte",)
  # eval_<key> is divided by the sum of eval_sums[<denominator>] (default 'count').
  eval_denominators = {"test_loss": "test_count", "test_bits_per_byte": "test_count"}

  @functools.cached_property
  def corpus(self) -> stdlib_text.Corpus:
    return stdlib_text.load(self.config.get("corpus_dir"))

  @property
  def context(self) -> int:
    return int(self.config.model_kwargs.get("context", 128))

  @property
  def num_train(self) -> int:
    """Windows per epoch: the train split's tokens over the window length."""
    return max(self.corpus.train.size // self.context, 1)

  def data_record(self) -> dict[str, object]:
    return self.corpus.record()

  def create_model(self, bn_axis_name: str | None) -> nn.Module:
    return base.create_model(self.config, stdlib_text.VOCAB_SIZE, bn_axis_name)

  def init_inputs(self) -> jax.Array:
    return jnp.zeros((1, self.context), jnp.int32)

  def train_loss(self, outputs, batch):
    w = batch["weights"]
    return jnp.sum(token_nll(outputs, batch["targets"]) * w) / jnp.maximum(jnp.sum(w), 1.0)

  def train_metrics(self, outputs, batch):
    return {"bits_per_byte": self.train_loss(outputs, batch) / LN2}

  def eval_sums(self, outputs, batch):
    w = batch["weights"] * batch["mask"].astype(jnp.float32)[:, None]
    test = batch["is_test"].astype(jnp.float32)[:, None]
    nll = token_nll(outputs, batch["targets"]) * w
    val_nll, test_nll = jnp.sum(nll * (1 - test)), jnp.sum(nll * test)
    return {"loss": val_nll, "bits_per_byte": val_nll / LN2, "count": jnp.sum(w * (1 - test)),
            "test_loss": test_nll, "test_bits_per_byte": test_nll / LN2,
            "test_count": jnp.sum(w * test)}

  def train_batches(self, *, global_batch_size, start_step, seed, process_index,
                    process_count) -> Iterator[base.Batch]:
    stream, context = self.corpus.train, self.context
    if stream.size <= context + 1:
      raise ValueError(f"The corpus's train split has {stream.size} tokens, too few for "
                       f"windows of {context + 1}: lower model_kwargs.context.")
    local = global_batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    step = start_step
    while True:
      starts = np.random.default_rng([seed, step]).integers(
          0, stream.size - context, size=global_batch_size)
      yield train_windows(stream, context, starts[rows])
      step += 1

  def eval_batches(self, *, global_batch_size, process_index,
                   process_count) -> Iterator[base.Batch]:
    parts = [eval_windows(self.corpus.split(s), self.context) for s in ("validation", "test")]
    windows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    windows["is_test"] = np.repeat([False, True], [len(p["inputs"]) for p in parts])
    return base.padded_batches(windows, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count)


TASK = LanguageModel
