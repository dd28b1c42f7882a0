"""Tasks: what differs between the trainer's jobs, one module each (`config.task`).

A task says how batches are made, which model to build, its loss and
metrics, and how an evaluation pass is summed (`base.Task`). Everything else
(the pure train step, pmap/jit, checkpoints and resume, the config record,
preemption, logging) is the trainer's and the same for every task.

`config.task` names a module of this package (`"image_classification"`) or
any importable module (`"my_package.my_task"`); the module's `TASK` is the
`base.Task` subclass the trainer builds from the config. A new task is one
new module here plus a config that names it.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from ovsw_jax.trainer.config_checks import ConfigError
from ovsw_jax.trainer.tasks.base import Task

DEFAULT = "image_classification"

__all__ = ["DEFAULT", "Task", "available", "create", "task_class"]


def available() -> list[str]:
  """The task modules of this package (the names `config.task` may give without a dot)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def task_class(name: str) -> type[Task]:
  """The `Task` subclass that `config.task=name` selects; `ConfigError` naming the fix if none.

  `name` is a module of this package, else any importable module. Only
  imports it (nothing is built), so the trainer checks it with the other
  config values, before anything else.
  """
  module_name = f"{__name__}.{name}" if name in available() else name
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is not None and module_name.startswith(e.name):  # the task module itself
      kind = "no module" if "." in name else "not a task"
      raise ConfigError(
          f"config.task={name!r} is {kind}: set --config.task to one of {available()}, or to "
          f"the name of a module on the Python path that defines TASK ({e}).") from e
    raise
  cls = getattr(module, "TASK", None)
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ConfigError(f"config.task={name!r}: module {module_name} defines no TASK (a subclass "
                      "of ovsw_jax.trainer.tasks.Task): add `TASK = YourTask` to it.")
  return cls


def create(config: ml_collections.ConfigDict) -> Task:
  """The task of `config` (`config.task`, default image classification), built from it."""
  return task_class(config.get("task", DEFAULT))(config)
