"""End-to-end training: every data path for a few steps, metrics, resume, errors.

Runs under 4 host CPU devices (tests/conftest.py), so the pmap path splits the
batch and averages gradients and BatchNorm statistics across devices.
"""

import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import load_config
from ovsw_jax.trainer import checkpointing, input_pipeline, preemption, train
from ovsw_jax.trainer.tasks import base


def check_result(result, num_eval):
  assert result["eval_count"] == num_eval  # exact evaluation: every example once
  assert 0.0 <= result["eval_accuracy"] <= result["eval_top5"] <= 1.0
  assert np.isfinite(result["eval_loss"])
  for key in ("silent_ratio", "flip_ratio"):
    assert 0.0 <= result[key] <= 1.0
    assert any(k.startswith(key + "/") for k in result), f"no per-layer {key}"


@pytest.mark.slow
def test_cifar_config_on_mock_data(tmp_path):
  config = load_config("cifar10_resnet20", "runlocal")
  with tfds.testing.mock_data(num_examples=20):
    result = train.train_and_evaluate(config, str(tmp_path))
  check_result(result, 20)
  assert "silent_fraction" in result and "scaled_fraction" in result


@pytest.mark.slow
def test_imagenet_config_on_mock_data(tmp_path):
  config = load_config("imagenet_r18", "runlocal")
  config.image_size = 32
  config.data_workers = 1  # batches from a worker process, train and evaluation alike
  with tfds.testing.mock_data(num_examples=12):
    result = train.train_and_evaluate(config, str(tmp_path))
  check_result(result, 12)
  # The run stopped its data workers (the training iterator and the kept evaluation's).
  workers = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "multiprocessing.spawn"],
                           capture_output=True, text=True, check=False).stdout.split()
  assert not workers


def test_embedded_default_trains_and_learns(digits_run):
  config, workdir, result = digits_run
  check_result(result, input_pipeline.get_info(config).num_eval)
  assert result["eval_accuracy"] > 0.6  # chance is 0.1
  assert list((workdir / "checkpoints").iterdir()), "no checkpoint written"
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events"


@pytest.mark.slow
def test_vanilla_arm_bf16_label_smoothing(tmp_path):
  config = load_config("default", "runlocal,vanilla")
  config.half_precision = True
  config.label_smoothing = 0.1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result["eval_loss"])
  assert "silent_fraction" not in result and "scaled_fraction" not in result
  assert "silent_ratio" in result


def _final_state(config, workdir):
  info = input_pipeline.get_info(config)
  lr = train.create_learning_rate_fn(config, 10)
  model = base.create_model(config, info.num_classes, train.AXIS)
  tx = train.create_optimizer(config, lr)
  inputs = jnp.zeros((1,) + info.image_shape, jnp.float32)
  target = train.create_train_state(jax.random.key(99), model, tx, inputs)
  manager = checkpointing.create_manager(f"{workdir}/checkpoints")
  return checkpointing.restore_latest(manager, target)


@pytest.mark.slow
def test_resume_gives_bitwise_the_same_state(tmp_path, monkeypatch):
  config = load_config("default", "runlocal")
  config.num_train_steps = 6
  config.checkpoint_every_steps = 100
  train.train_and_evaluate(config, str(tmp_path / "straight"))

  # Ctrl-C during training (SIGINT, as `main` handles it): saved and stopped ...
  batches = input_pipeline.train_iterator

  def interrupted(*args, **kwargs):
    for i, batch in enumerate(batches(*args, **kwargs)):
      if i == 3:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch
  monkeypatch.setattr(input_pipeline, "train_iterator", interrupted)
  with preemption.handling(preemption.ALWAYS), pytest.raises(preemption.Preempted) as stop:
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.undo()
  assert stop.value.exit_status == preemption.EXIT_INTERRUPTED
  assert 1 <= stop.value.step < 6
  manager = checkpointing.create_manager(f"{tmp_path}/resumed/checkpoints")
  assert manager.latest_step() == stop.value.step  # the stop saved its step
  train.train_and_evaluate(config, str(tmp_path / "resumed"))  # ... and started again

  # Starting a finished run again trains nothing and reports the same result.
  again = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert again["eval_count"] == input_pipeline.get_info(config).num_eval
  assert 0.0 <= again["silent_ratio"] <= 1.0

  a = _final_state(config, tmp_path / "straight")
  b = _final_state(config, tmp_path / "resumed")
  assert int(a.step) == int(b.step) == 6
  tracker = [x for x in jax.tree.leaves(a.opt_state) if x.dtype == np.float32 and x.ndim == 4]
  assert tracker, "the OvSW tracker must be in the checkpoint"
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  config = load_config("default", "runlocal")
  config.batch_size = 7
  with pytest.raises(ValueError, match="batch_size=7"):
    train.train_and_evaluate(config, str(tmp_path))
