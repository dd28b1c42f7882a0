"""Config checks (`ovsw_jax.trainer.config_checks`): nonsense values and impossible layouts stop
the run before anything is built, with one message naming the field and the fix; the evaluation
batch is rounded up to fit the devices and still counts each example once."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from helpers import ROOT, load_config, module_command
from ovsw_jax.trainer import config_checks, input_pipeline, train
from ovsw_jax.trainer.tasks import base, image_classification

ConfigError = config_checks.ConfigError

# (field, nonsense value): each must be refused by name. The ones of the brief first.
NONSENSE = [
    ("num_train_steps", -5), ("num_train_steps", 0), ("num_epochs", 0), ("num_epochs", -3),
    ("learning_rate", -0.1), ("learning_rate", 0.0), ("learning_rate", math.nan),
    ("learning_rate", math.inf), ("checkpoint_every_steps", 0), ("checkpoint_every_steps", -1),
    ("batch_size", 0), ("batch_size", -64), ("eval_batch_size", 0), ("log_every_steps", 0),
    ("eval_every_epochs", 0), ("eval_every_epochs", -1), ("keep_checkpoints", 0),
    ("warmup_epochs", -1), ("momentum", 1.0), ("momentum", -0.5), ("weight_decay", -5e-4),
    ("label_smoothing", 1.0), ("seed", -1), ("prefetch", -1), ("data_workers", -1),
    ("decode_threads", 0), ("read_threads", 0),
    ("end_learning_rate", -1.0), ("adamw_decay", -1.0), ("image_size", 0),
    ("matmul_precision", "fp32"), ("matmul_precision", "HIGHEST"),
]


def default_config(**fields):
  config = load_config("default")
  for name, value in fields.items():
    config[name] = value
  return config


@pytest.mark.parametrize("field,value", NONSENSE, ids=lambda x: str(x))
def test_a_nonsense_value_is_one_message_naming_the_field_and_the_fix(field, value):
  config = default_config(**{field: value})
  with pytest.raises(ConfigError) as error:
    config_checks.check_values(config)
  message = str(error.value)
  assert message.startswith(f"config.{field}={value!r} is invalid: it must be "), message
  assert f"set --config.{field}=" in message and "\n" not in message


@pytest.mark.parametrize("field,value", [
    ("num_train_steps", -1), ("num_train_steps", 1), ("learning_rate", 1e8),
    ("warmup_epochs", 0), ("momentum", 0.0), ("weight_decay", 0.0), ("label_smoothing", 0.1),
    ("data_workers", 0), ("decode_threads", 1), ("read_threads", 1), ("prefetch", 0),
    ("num_epochs", 1),
    *[("matmul_precision", p) for p in config_checks.MATMUL_PRECISIONS]])
def test_edge_values_that_mean_something_pass(field, value):
  config_checks.check_values(default_config(**{field: value}))


def test_every_problem_is_listed_on_one_line():
  config = default_config(num_epochs=0, learning_rate=-0.1, parallelism="vmap")
  with pytest.raises(ConfigError) as error:
    config_checks.check_values(config)
  message = str(error.value)
  assert message.startswith("3 config fields are invalid: ") and "\n" not in message
  for field in ("num_epochs", "learning_rate", "parallelism"):
    assert f"config.{field}=" in message


def test_ovsw_strengths_are_checked_with_the_rest():
  config = default_config()
  config.ovsw.delta = math.nan
  with pytest.raises(ConfigError, match=r"config\.ovsw\.delta is invalid"):
    config_checks.check_values(config)
  config.ovsw.ags = False  # a strength of a part switched off is not used
  config_checks.check_values(config)


def test_a_bad_value_stops_train_and_evaluate_before_the_workdir_is_touched(tmp_path):
  workdir = tmp_path / "wd"
  with pytest.raises(ConfigError, match=r"config\.num_train_steps=-5"):
    train.train_and_evaluate(default_config(num_train_steps=-5), str(workdir))
  assert not workdir.exists()


def test_a_run_shorter_than_one_step_is_an_error():
  assert train._num_steps(default_config(num_epochs=2), 22) == 44
  assert train._num_steps(default_config(num_train_steps=3), 22) == 3
  # A config file may declare fractional epochs: 0.01 passes the field check (> 0),
  # but is 0.22 steps.
  config = ml_collections.ConfigDict({"num_epochs": 0.01, "num_train_steps": -1})
  with pytest.raises(ConfigError, match=r"config\.num_epochs=0\.01 is less than one step"):
    train._num_steps(config, 22)


# --- layout ---------------------------------------------------------------------------------


def test_the_eval_batch_is_rounded_up_to_a_multiple_of_the_devices():
  cifar = load_config("cifar10_resnet20")  # eval 500
  assert [config_checks.layout(cifar, d, 1).eval_batch_size for d in (1, 4, 8, 16, 32, 256)] \
      == [500, 500, 504, 512, 512, 512]
  digits = load_config("default")  # eval 120
  assert not config_checks.layout(digits, 8, 2).eval_rounded
  rounded = config_checks.layout(digits, 16, 4)
  assert rounded.eval_rounded and rounded.eval_batch_size == 128 and rounded.eval_per_device == 8
  assert config_checks.layout(default_config(batch_size=1024), 1024, 128).eval_batch_size == 1024


@pytest.mark.parametrize("devices,processes,batch", [
    (128, 1, 64),      # the default's 64 over 128 devices
    (512, 64, 256),    # a CIFAR batch over 512 devices
    (4, 1, 7), (32, 4, 48)])
def test_a_train_batch_that_does_not_split_is_the_error(devices, processes, batch):
  config = default_config(batch_size=batch)
  with pytest.raises(ConfigError) as error:
    config_checks.layout(config, devices, processes)
  message = str(error.value)
  assert message.startswith(f"config.batch_size={batch} (the global train batch) does not "
                            f"split over the {devices} devices")
  assert f"multiple of {devices}" in message and "\n" not in message
  below, above = batch // devices * devices, (batch // devices + 1) * devices
  assert str(above) in message and (below == 0 or f"{below} or {above}" in message)


@pytest.mark.parametrize("devices,processes", [(8, 3), (4, 8), (0, 1), (4, 0)])
def test_devices_that_do_not_split_over_the_processes_are_the_error(devices, processes):
  with pytest.raises(ConfigError, match=f"{devices} devices do not split evenly over "
                                        f"{processes} processes"):
    config_checks.layout(default_config(), devices, processes)


def test_the_rounded_eval_batch_counts_every_example_once_over_the_processes():
  """What the trainer reads with a rounded batch (128 for 360 digits, 4 processes)."""
  config = default_config()
  layout = config_checks.layout(config, 16, 4)
  info = input_pipeline.get_info(config)
  per_process = [list(input_pipeline.eval_iterator(
      config, global_batch_size=layout.eval_batch_size, process_index=p, process_count=4))
      for p in range(4)]
  assert len({len(batches) for batches in per_process}) == 1
  labels, count = [], 0
  for step in zip(*per_process):
    for batch in step:
      assert batch["image"].shape[0] == layout.eval_batch_size // 4
      assert batch["image"].shape[0] % (layout.devices // 4) == 0
      labels.append(batch["label"][batch["mask"]])
      count += int(batch["mask"].sum())
  assert count == info.num_eval == 360
  whole = next(input_pipeline.eval_iterator(config, global_batch_size=info.num_eval))
  np.testing.assert_array_equal(np.concatenate(labels), whole["label"])


def test_train_and_evaluate_runs_under_the_precision_and_the_rounded_batch(tmp_path,
                                                                          monkeypatch):
  seen = {}

  def fake_train(config, workdir, **kwargs):
    seen.update(kwargs, precision=jax.config.jax_default_matmul_precision)
    return {}
  monkeypatch.setattr(train, "_train", fake_train)
  train.train_and_evaluate(default_config(eval_batch_size=6, matmul_precision="high"),
                           str(tmp_path))
  assert seen["precision"] == "high" and seen["eval_batch_size"] == 8  # 4 test devices
  assert jax.config.jax_default_matmul_precision is None  # restored afterwards


@pytest.mark.slow
def test_highest_precision_changes_no_bit_on_cpu():
  """The default digits run trains bitwise as before `matmul_precision` existed (CPU).

  The precision reaches only convolutions and matmuls: the loss and gradients of
  the default's layer kinds (float stem and head, binary convs) at half its depth.
  """
  config = default_config()
  config.model_kwargs.blocks_per_stage = 1
  model = base.create_model(config, 10, bn_axis_name=None)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  # Random values of the init's shapes (tracing the init is cheap, running it is not).
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1], train=False))
  variables = jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)

  def loss_and_grads(params):
    def loss(params):
      logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              images, train=True, mutable=["batch_stats"])
      return image_classification.cross_entropy(logits, labels, 10).mean()
    return jax.value_and_grad(loss)(params)
  out = {}
  for precision in (None, "highest"):
    with jax.default_matmul_precision(precision):
      lowered = jax.jit(loss_and_grads).lower(variables["params"])
      out[precision] = lowered.as_text(), lowered.compile()(variables["params"])
  assert "HIGHEST" in out["highest"][0] and "HIGHEST" not in out[None][0]
  assert jax.default_backend() == "cpu" and np.isfinite(float(out[None][1][0]))
  for a, b in zip(jax.tree.leaves(out[None][1]), jax.tree.leaves(out["highest"][1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
  """A bad value, a workdir that is a file, a config that does not parse, an unknown
  config argument and an override of a field the config does not have."""
  bad_file = tmp_path / "bad.py"
  bad_file.write_text("def get_config(:\n  pass\n")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = {
      "config.num_train_steps=-5 is invalid": [f"--workdir={tmp_path}/wd",
                                               "--config.num_train_steps=-5"],
      f"--workdir={a_file} is a file, not a directory": [f"--workdir={a_file}"],
      f"the config file {bad_file} does not parse: line 1": [f"--config={bad_file}",
                                                             f"--workdir={tmp_path}/wd"],
      "--config: ValueError: Unknown config arg '3bit': use any of ('binary', 'ternary'": [
          f"--config={ROOT}/configs/default.py:3bit", f"--workdir={tmp_path}/wd"],
      "the config has no field 'no_such_field' (overrides given: --config.no_such_field)": [
          f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path}/wd",
          "--config.no_such_field=1"],
  }
  for expected, args in cases.items():
    proc = module_command("ovsw_jax.main", args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], out
    assert "Traceback" not in out
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_the_default_trains_and_evaluates_exactly_on_many_devices(tmp_path):
  """Two steps of the default's batch layout on 16 fake CPU devices; the 360 test images
  counted once.

  The default's batches (64, evaluation 120) with the smoke model: the layout does
  not depend on the model, and compiling for 16 devices takes a fraction as long.
  16 devices do not divide 120, so it is rounded up to 128 (other device counts:
  the layout's unit tests) and the last batch is part padding.
  A device count that divides it: test_train's default run on this process's 4.
  """
  devices = 16
  workdir = tmp_path / "wd"
  proc = module_command("ovsw_jax.main", [
      f"--workdir={workdir}", f"--config={ROOT}/configs/default.py:runlocal",
      "--config.num_train_steps=2", "--config.batch_size=64", "--config.eval_batch_size=120"],
      devices=devices)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in evals if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [2] and evals[0]["eval_count"] == 360
  assert "Matmul precision: highest" in out
  assert f"rounded up to 128, a multiple of the {devices} devices" in out
  assert json.loads((workdir / "config.json").read_text())["matmul_precision"] == "highest"
