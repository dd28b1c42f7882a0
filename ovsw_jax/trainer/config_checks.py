"""Checks of a training config before a run builds anything: its values and its batch layout.

Why: a nonsense value used to train something other than asked, silently
(`num_train_steps=-5` trained the default length, `num_epochs=0` trained
nothing and exited 0, a negative learning rate trained until the loss was
inf, `checkpoint_every_steps=0` saved every step), and a batch that does not
split over the devices stopped the run only once the data were loaded. Here
every problem is one `ConfigError` (a `ValueError`, printed by the command
line as one `error:` line) naming the field, its value and the fix, raised
before the data, the model or the workdir are touched.

`check(config, devices, processes)` is what the trainer calls: `check_values`
(each field alone, pure) then `layout` (how the batches split over the run's
devices), whose `Layout` says the batch sizes the run uses. The evaluation
batch is rounded up to a multiple of the device count (the padded rows are
masked out, so every example is still counted once); the train batch is part
of the recipe and is never changed: one that does not split is the error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

import ml_collections

from ovsw_jax.trainer import parallel, optimizer

# `config.matmul_precision`: jax's names for the precision of float32 matmuls
# and convolutions (`jax.default_matmul_precision`). "highest" (= "float32")
# is full float32; "high" (= "tensorfloat32", bf16_3x on TPUs) and "default"
# (= "bfloat16" on TPUs, TF32 on Ampere-or-newer GPUs) are faster passes. On
# CPUs every choice computes float32 exactly.
MATMUL_PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "default", "bfloat16")


class ConfigError(ValueError):
  """A config value no run can use; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a run's batches split over its devices (all counts global unless named per_*).

  `eval_batch_size` is `config.eval_batch_size` rounded up to a multiple of
  `devices` (`eval_rounded` says whether that changed it).
  """
  devices: int
  processes: int
  batch_size: int
  eval_batch_size: int
  eval_rounded: bool

  @property
  def per_device(self) -> int:
    return self.batch_size // self.devices

  @property
  def eval_per_device(self) -> int:
    return self.eval_batch_size // self.devices


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


def _int_at_least(low: int) -> Callable[[Any], bool]:
  return lambda v: _is_int(v) and v >= low


def _real_at_least(low: float, *, strict: bool = False) -> Callable[[Any], bool]:
  return lambda v: _is_real(v) and (v > low if strict else v >= low)


def _unit_interval(v: Any) -> bool:  # [0, 1)
  return _is_real(v) and 0 <= v < 1


# (field, its default where a config may lack it, test, what it must be, the fix).
# A fix without "=" is the value to put after `--config.FIELD=`.
_MISSING = object()
_RULES = (
    ("batch_size", _MISSING, _int_at_least(1), "a positive integer (the global train batch)",
     "N"),
    ("eval_batch_size", _MISSING, _int_at_least(1),
     "a positive integer (the global evaluation batch)", "N"),
    ("num_epochs", _MISSING, _real_at_least(0, strict=True),
     "a positive number of epochs (the run's length unless num_train_steps is set, and "
     "the learning rate schedule's length)", "E (to train a set number of steps, set "
     "--config.num_train_steps=N)"),
    ("num_train_steps", -1, lambda v: _is_int(v) and (v == -1 or v >= 1),
     "-1 (train num_epochs epochs) or a positive number of steps", "N, or leave it at -1"),
    ("warmup_epochs", _MISSING, _real_at_least(0), "a number of epochs >= 0", "0"),
    ("learning_rate", _MISSING, _real_at_least(0, strict=True),
     "a finite learning rate > 0", "0.1"),
    ("end_learning_rate", 1e-5, _real_at_least(0), "a finite learning rate >= 0", "1e-5"),
    ("momentum", 0.9, _unit_interval, "a momentum in [0, 1)", "0.9"),
    ("weight_decay", 0.0, _real_at_least(0), "a finite weight decay >= 0 (0: none)", "5e-4"),
    ("adamw_decay", 1e-4, _real_at_least(0), "a finite decay >= 0", "1e-4"),
    ("label_smoothing", 0.0, _unit_interval, "a smoothing in [0, 1) (0: none)", "0"),
    ("seed", 0, _int_at_least(0), "an integer >= 0", "0"),
    ("log_every_steps", _MISSING, _int_at_least(1), "a positive number of steps", "100"),
    ("eval_every_epochs", _MISSING, _real_at_least(0, strict=True),
     "a positive number of epochs", "1"),
    ("checkpoint_every_steps", _MISSING, _int_at_least(1),
     "a positive number of steps (the run also saves at its end and on SIGTERM)", "1000"),
    ("keep_checkpoints", 3, _int_at_least(1), "a positive number of checkpoints", "3"),
    ("prefetch", 2, _int_at_least(0), "a number of batches >= 0 (0: none ahead)", "2"),
    ("data_workers", None, lambda v: v is None or (_is_int(v) and v >= 0),
     "None (one a CPU) or a number of worker processes >= 0 (0: this process)", "8"),
    ("decode_threads", None, lambda v: v is None or (_is_int(v) and v >= 1),
     "None (automatic) or a positive number of threads", "4"),
    ("read_threads", None, lambda v: v is None or (_is_int(v) and v >= 1),
     "None (automatic) or a positive number of threads", "64"),
    ("image_size", 224, _int_at_least(1), "a positive number of pixels", "224"),
    ("track_oscillation", False, lambda v: isinstance(v, bool), "True or False", "True"),
    ("matmul_precision", "highest", lambda v: v in MATMUL_PRECISIONS,
     f"one of {', '.join(map(repr, MATMUL_PRECISIONS))}", "highest"),
)


def _problem(name: str, value: Any, must: str, fix: str) -> str:
  return f"config.{name}={value!r} is invalid: it must be {must}; set --config.{name}={fix}"


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` listing every field of `config` out of range (pure, builds nothing).

  The OvSW strengths are checked by `optimizer.ovsw_transforms` (only
  those of the parts switched on), which builds two small Optax transforms.
  """
  problems = []
  for name, default, ok, must, fix in _RULES:
    value = config.get(name, default)
    if value is _MISSING:
      problems.append(f"config.{name} is missing: set --config.{name}={fix}")
    elif not ok(value):
      problems.append(_problem(name, value, must, fix))
  try:
    parallel.check(config.get("parallelism", "pmap"))
  except ValueError as e:
    problems.append(str(e))
  if "ovsw" in config:
    try:
      optimizer.ovsw_transforms(config.ovsw)
    except ValueError as e:
      problems.append(str(e))
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError(f"{len(problems)} config fields are invalid: " + " | ".join(problems))


def layout(config: ml_collections.ConfigDict, devices: int, processes: int) -> Layout:
  """How `config`'s batches split over `devices` devices driven by `processes` processes.

  Every process drives `devices / processes` devices and reads its own
  `1 / processes` of each global batch, each device `1 / devices` of it. The
  evaluation batch is rounded up to a multiple of `devices`.

  Raises:
    ConfigError: the train batch does not split over the devices, or the
      devices not over the processes.
  """
  if not (_is_int(devices) and _is_int(processes) and devices >= 1 and processes >= 1
          and devices % processes == 0):
    raise ConfigError(
        f"{devices} devices do not split evenly over {processes} processes: every process "
        "must drive the same number of devices; give each the same count with "
        "--local_device_ids (or start one process per host).")
  batch = config.batch_size
  if batch % devices:
    below, above = batch // devices * devices, (batch // devices + 1) * devices
    near = f"{below} or {above}" if below else f"{above}"
    raise ConfigError(
        f"config.batch_size={batch} (the global train batch) does not split over the "
        f"{devices} devices of this run ({processes} process{'es' if processes > 1 else ''}, "
        f"{devices // processes} device{'s' if devices // processes > 1 else ''} each): set "
        f"--config.batch_size to a multiple of {devices} (e.g. {near}), or run on fewer "
        "devices. The train batch is part of the recipe, so it is never adjusted.")
  requested = config.eval_batch_size
  eval_batch = -(-requested // devices) * devices
  return Layout(devices=devices, processes=processes, batch_size=batch,
                eval_batch_size=eval_batch, eval_rounded=eval_batch != requested)


def check(config: ml_collections.ConfigDict, devices: int, processes: int) -> Layout:
  """`check_values`, then `layout`: what the trainer runs before building anything."""
  check_values(config)
  return layout(config, devices, processes)
