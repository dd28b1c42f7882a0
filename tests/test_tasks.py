"""The task interface: image classification is one task, a second one trains through the same
step, loop, checkpoints and resume, and a bad `config.task` stops with the fix."""

import json
import signal

import jax
import numpy as np
import pytest

import toy_task
from helpers import final_state, load_config, signalled_after
from ovsw_jax.trainer import preemption, tasks, train
from ovsw_jax.trainer.config_checks import ConfigError
from ovsw_jax.trainer.tasks import image_classification


def toy_config(steps):
  config = load_config("default", "runlocal")
  config.task = "toy_task"
  config.num_train_steps = steps
  config.checkpoint_every_steps = 100
  config.eval_batch_size = 16  # 36 examples: 3 batches, the last one padded
  return config


@pytest.mark.slow
def test_a_task_in_one_module_trains_evaluates_and_resumes_bitwise(tmp_path, monkeypatch):
  config = toy_config(6)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  # The evaluation is the task's: its metrics only, each of the 36 examples counted once.
  assert set(straight) >= {"eval_loss", "eval_accuracy", "eval_count", "silent_ratio"}
  assert "eval_top5" not in straight and straight["eval_count"] == toy_task.NUM_EVAL
  assert 0.0 <= straight["eval_accuracy"] <= 1.0 and np.isfinite(straight["eval_loss"])
  lines = [json.loads(x)
           for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert any("train_accuracy" in x and "train_top5" not in x for x in lines)

  # Ctrl-C after 4 batches were read: saved and stopped, then started again.
  monkeypatch.setattr(toy_task.PositiveSum, "train_batches",
                      signalled_after(toy_task.PositiveSum.train_batches, 4, signal.SIGINT))
  with preemption.handling(preemption.ALWAYS), pytest.raises(preemption.Preempted) as stop:
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.undo()
  assert 1 <= stop.value.step < 6
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed == straight
  a, b = (final_state(config, tmp_path / d) for d in ("straight", "resumed"))
  assert int(a.step) == int(b.step) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_image_task_is_the_default_and_sums_what_numpy_sums():
  config = load_config("default")
  del config["task"]
  task = tasks.create(config)
  assert isinstance(task, image_classification.ImageClassification)
  assert task.num_train == 1437 and task.metric_names == ("accuracy", "top5")
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((6, 10)).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 4, 5], np.int32)
  mask = np.array([1, 1, 1, 1, 0, 0], bool)
  sums = jax.tree.map(float, task.eval_sums(logits, {"label": labels, "mask": mask}))
  shifted = logits - logits.max(axis=1, keepdims=True)
  ce = np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(6), labels]
  ranks = (logits > logits[np.arange(6), labels][:, None]).sum(axis=1)  # classes above the label
  np.testing.assert_allclose(sums["loss"], ce[mask].sum(), rtol=1e-5)
  assert sums["accuracy"] == (ranks[mask] == 0).sum() and sums["top5"] == (ranks[mask] < 5).sum()
  assert sums["count"] == 4


@pytest.mark.parametrize("name, match", [
    ("no_such_task", r"config.task='no_such_task' is not a task: set --config.task to one of "
                     r"\['image_classification', 'language_model'\], or to the name of a module"),
    ("no_such_package.task", r"config.task='no_such_package.task' is no module"),
    ("helpers", r"module helpers defines no TASK"),
])
def test_a_bad_task_name_stops_before_anything_is_built(name, match, tmp_path):
  config = load_config("default", "runlocal")
  config.task = name
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
