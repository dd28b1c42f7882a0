"""The learning-rate schedule against the release's per-epoch formula (docs/method.md §7)."""

import math

import numpy as np
import pytest

from configs import common
from ovsw_jax.trainer.optimizer import create_learning_rate_fn


def release_lr(e, lr0, epochs, warmup):
  if e < warmup:
    return lr0 * (e + 1) / warmup
  return 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) * lr0 + 1e-5


@pytest.mark.parametrize("warmup", [0, 5])
def test_epoch_cosine_matches_release(warmup):
  c = common.base_config()
  c.num_epochs, c.warmup_epochs, c.learning_rate = 40, warmup, 0.1
  spe = 7
  fn = create_learning_rate_fn(c, spe)
  for e in range(c.num_epochs):
    for s in (e * spe, e * spe + spe - 1):  # constant within the epoch
      np.testing.assert_allclose(float(fn(s)), release_lr(e, 0.1, 40, warmup),
                                 rtol=1e-5, atol=1e-8)


def test_step_cosine_and_bad_name():
  c = common.base_config()
  c.num_epochs, c.warmup_epochs, c.lr_schedule = 10, 1, "step_cosine"
  fn = create_learning_rate_fn(c, 100)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(100)), 0.1, rtol=1e-5)
  assert float(fn(999)) < 1e-3
  # A run set in steps ends its cosine at its last step: optax's formula by hand.
  c.num_train_steps, c.warmup_epochs, c.end_learning_rate = 300, 0, 1e-5
  fn = create_learning_rate_fn(c, 100)
  for step in (0, 120, 299, 300):
    expected = 1e-5 + (0.1 - 1e-5) * 0.5 * (1 + np.cos(np.pi * min(step, 300) / 300))
    np.testing.assert_allclose(float(fn(step)), expected, rtol=1e-5, atol=1e-7)  # float32
  c.lr_schedule = "cosine_typo"
  with pytest.raises(ValueError, match="lr_schedule"):
    create_learning_rate_fn(c, 100)
