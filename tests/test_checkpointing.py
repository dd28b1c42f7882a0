"""Checkpoint round trip of a full train state, and fallback from a damaged one."""

import jax
import numpy as np
import optax

from configs import common
from ovsw_jax import checkpointing, models, train
from ovsw_jax.train_optimizer import create_optimizer


def make_state(seed):
  c = common.base_config()
  model = models.get_model("tiny", num_classes=10)
  tx = create_optimizer(c, optax.constant_schedule(0.1))
  return train.create_train_state(jax.random.key(seed), model, tx, (8, 8, 1))


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_fallback(tmp_path):
  first, second = make_state(1), make_state(2)
  second = second.replace(step=second.step + 7)
  manager = checkpointing.create_manager(str(tmp_path), max_to_keep=3)
  checkpointing.save(manager, 1, first)
  checkpointing.save(manager, 8, second)
  manager.wait_until_finished()

  target = make_state(0)
  assert_same(checkpointing.restore_latest(manager, target), second)
  # NamedTuple optimizer states come back as NamedTuples (restored with a target).
  restored = checkpointing.restore_latest(manager, target)
  assert type(restored.opt_state[0]) is type(target.opt_state[0])

  # Damage the newest checkpoint: every file in it truncated.
  for f in (tmp_path / "8").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  manager = checkpointing.create_manager(str(tmp_path), max_to_keep=3)
  assert_same(checkpointing.restore_latest(manager, target), first)


def test_empty_directory_restores_nothing(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path))
  assert checkpointing.restore_latest(manager, make_state(0)) is None
