"""Checkpoint round trip of a full train state, fallback from a damaged one, and the restore
decision every process of a run takes alike."""

import pytest
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import common
from ovsw_jax import models
from ovsw_jax.trainer import checkpointing, train
from ovsw_jax.trainer.optimizer import create_optimizer


def make_state(seed):
  c = common.base_config()
  model = models.get_model("tiny", num_classes=10)
  tx = create_optimizer(c, optax.constant_schedule(0.1))
  return train.create_train_state(jax.random.key(seed), model, tx, jnp.zeros((1, 8, 8, 1)))


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
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


@pytest.mark.slow
def test_empty_directory_restores_nothing(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path))
  assert checkpointing.restore_latest(manager, make_state(0)) is None


# --- The restore decision, with fake reads (no orbax, no second process) -----

def no_sleep(seconds):
  del seconds


def flaky(fail_times, value="state"):
  """A read that raises OSError `fail_times[step]` times for a step, then returns (step, value)."""
  calls = []

  def read(step):
    calls.append(step)
    if calls.count(step) <= fail_times.get(step, 0):
      raise OSError(f"injected read error at step {step}")
    return (step, value)
  read.calls = calls
  return read


def run_processes(reads, steps, gave_up=None):
  """`choose_step` on one thread per fake process, exchanging statuses as processes do."""
  n = len(reads)
  barrier, posted = threading.Barrier(n, timeout=30), {}
  results, errors = [None] * n, [None] * n

  def process(pid):
    def exchange(step, status):
      posted[(step, pid)] = status
      barrier.wait()
      statuses = [posted[(step, i)] for i in range(n)]
      barrier.wait()
      return statuses
    try:
      give_up = None if gave_up is None else (lambda step: gave_up.append((pid, step)))
      results[pid] = checkpointing.choose_step(steps, reads[pid], exchange, give_up,
                                               sleep=no_sleep)
    except Exception as e:  # pylint: disable=broad-except
      errors[pid] = e
  threads = [threading.Thread(target=process, args=(pid,)) for pid in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  return results, errors


def test_a_transient_read_error_is_retried_before_a_checkpoint_is_damaged():
  slept = []
  read = flaky({8: 2})
  state, error = checkpointing.read_with_retries(read, 8, attempts=3, sleep=slept.append)
  assert state == (8, "state") and error is None
  assert read.calls == [8, 8, 8] and slept == [0.5, 1.0]  # short, growing backoff

  state, error = checkpointing.read_with_retries(flaky({8: 3}), 8, attempts=3, sleep=no_sleep)
  assert state is None and "OSError: injected read error at step 8" in error

  calls = []

  def wrong_content(step):
    calls.append(step)
    raise checkpointing.DigestMismatchError(f"checkpoint {step}'s content does not match")
  slept.clear()
  state, error = checkpointing.read_with_retries(wrong_content, 8, sleep=slept.append)
  assert state is None and "does not match" in error
  assert calls == [8] and slept == []  # read in full and wrong: not read again



def test_all_processes_restore_the_same_step():
  # Process 1's first read of step 8 fails: it retries, and both restore step 8.
  (a, b), errors = run_processes([flaky({}), flaky({8: 1})], [1, 8])
  assert errors == [None, None]
  assert a == b == ((8, "state"), [])

  # Process 1 cannot read step 8 at all: both fall back to step 1, and both
  # report step 8 as damaged (process 0 then moves it aside, once).
  gave_up = []
  (a, b), errors = run_processes([flaky({}), flaky({8: 99})], [1, 8], gave_up)
  assert errors == [None, None]
  assert a == b == ((1, "state"), [8])
  assert gave_up == [(1, 8)]  # only the process that could not read step 8 gave it up

  # Nothing readable anywhere: both start afresh.
  (a, b), _ = run_processes([flaky({1: 99}), flaky({8: 99})], [1, 8])
  assert a == b == (None, [8, 1])


def test_a_checkpoint_of_another_state_on_one_process_stops_every_process():
  def mismatch(step):
    raise checkpointing.CheckpointMismatchError(f"step {step} holds another state")
  _, errors = run_processes([flaky({}), mismatch], [8])
  assert all(isinstance(e, checkpointing.CheckpointMismatchError) for e in errors)
  assert "On process 1: step 8 holds another state" in str(errors[0])
