"""Helpers shared by the OvSW transforms."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np


class HyperparameterError(ValueError):
  """A hyperparameter value the transform cannot work with.

  Attributes:
    argument: the name of the offending argument (e.g. 'delta'), so that a
      caller that builds the transform from a config can name its own field.
  """

  def __init__(self, message: str, argument: str):
    super().__init__(message)
    self.argument = argument


def concrete_number(value):
  """The value as a NumPy array when it is a concrete Python or NumPy number, else None.

  Why: hyperparameters can be checked only when their value is known where the
  transform is built. Schedules (callables) and JAX arrays are not checked
  here: under `optax.inject_hyperparams` every numeric argument arrives as a
  JAX array, traced under `jit`, and reading a concrete one would stall the
  device at every step (the factory is called again in each update).
  """
  if isinstance(value, bool) or callable(value):
    return None
  if isinstance(value, (int, float, np.number, np.ndarray)):
    return np.asarray(value, np.float64)
  return None


def check_range(owner: str, name: str, value, *, low: float = 0.0,
                high: float | None = None, low_open: bool = False,
                hint: str = "", label: str = "") -> None:
  """Raises `HyperparameterError` when a concrete value is NaN, infinite or out of range.

  The accepted range is `[low, high)` (`(low, high)` with `low_open`; no upper
  bound when `high` is None). NaN must be caught explicitly: every comparison
  with NaN is False, so `delta=nan` would silently switch AGS off and
  `dampen_weight=nan` would make every update NaN. Values that are not
  concrete (see `concrete_number`) pass unchecked. The message names `name`
  (followed by `label`), the range, and `hint`.

  >>> try:
  ...   check_range('scale_by_ags', 'delta', float('nan'))
  ... except ValueError as e:
  ...   print(e)
  scale_by_ags: delta=nan is not a finite number; it must lie in [0, inf).
  """
  v = concrete_number(value)
  if v is None:
    return
  lo = "(" if low_open else "["
  hi = f"{high:g})" if high is not None else "inf)"
  wanted = f"in {lo}{low:g}, {hi}"
  if not np.all(np.isfinite(v)):
    problem = "is not a finite number"
  elif (np.any(v <= low) if low_open else np.any(v < low)) or (
      high is not None and np.any(v >= high)):
    problem = "is out of range"
  else:
    return
  raise HyperparameterError(
      f"{owner}: {name}{label}={value} {problem}; it must lie {wanted}. {hint}".rstrip(),
      name)


def check_schedule_start(owner: str, name: str, value, **range_kwargs) -> None:
  """Checks a schedule's value at step 0 like a constant (see `check_range`).

  Called from `init`, the one place a schedule can be evaluated cheaply (once,
  not at every step). A value traced under `jit` passes unchecked.
  """
  if not callable(value):
    return
  start = value(jnp.zeros([], jnp.int32))
  if isinstance(start, jax.core.Tracer):
    return
  start = np.asarray(start)
  check_range(owner, name, start.item() if start.ndim == 0 else start,
              label=" (a schedule, at step 0)", **range_kwargs)


def check_axis(owner: str, axis: int, shape: tuple[int, ...]) -> None:
  """Raises `HyperparameterError` when `axis` is not an axis of an array of `shape`.

  Why: a kernel of rank r has axes -r..r-1; taken modulo r, `axis=7` would
  quietly pick another axis and scale the wrong channels.
  """
  rank = len(shape)
  if not -rank <= axis < rank:
    raise HyperparameterError(
        f"{owner}: axis={axis} is out of range for a parameter of shape {shape} "
        f"(rank {rank}: valid axes are {-rank}..{rank - 1}). Pass the output-channel "
        "axis of every kernel the transform sees (None for the last, Flax's HWIO), "
        "or mask out the parameters of another layout.", "axis")


def static_axis(owner: str, axis) -> int | None:
  """`axis` as a Python int (None stays None), or a `HyperparameterError` saying how to fix it.

  Under `optax.inject_hyperparams` an integer `axis` is injected as an array
  unless named in `static_args`; inside `jit` it is then traced, and the
  channel axis cannot depend on a traced value.
  """
  if axis is None:
    return None
  try:
    return operator.index(axis)
  except TypeError as e:  # A float, or a traced array (TracerIntegerConversionError).
    raise HyperparameterError(
        f"{owner}: axis={axis!r} must be a Python int (or None). Under "
        f"optax.inject_hyperparams name it static: inject_hyperparams({owner}, "
        "static_args=('axis',)).", "axis") from e


def value_at(value_or_schedule, count):
  """The hyperparameter's value at step `count` (a constant or a schedule)."""
  return value_or_schedule(count) if callable(value_or_schedule) else value_or_schedule


def per_channel_norm(x: jax.Array, axis: int) -> jax.Array:
  """L2 norm of each slice along `axis` (reduced over all other axes), keepdims."""
  others = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  x32 = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(x32 * x32, axis=others, keepdims=True))


def no_params_error(name: str) -> ValueError:
  """The error for a missing `params` argument (optax's `NO_PARAMS_MSG`, named)."""
  return ValueError(
      f"{name} needs the current parameters: call "
      "`tx.update(updates, state, params)` with `params` (it was None).")


def tree_unzip(like, tree, n: int):
  """Splits a tree of n-tuples (structured as `like`) into n trees.

  A `like` without leaves (no parameter selected by the mask) gives n copies
  of its empty structure, as `jax.tree.transpose` cannot.

  >>> tree_unzip({'a': 0, 'b': 0}, {'a': (1, 2), 'b': (3, 4)}, 2)
  ({'a': 1, 'b': 3}, {'a': 2, 'b': 4})
  >>> tree_unzip({'a': None}, {'a': None}, 2)
  ({'a': None}, {'a': None})
  """
  outer = jax.tree.structure(like)
  if outer.num_leaves == 0:
    return (jax.tree.unflatten(outer, []),) * n
  return jax.tree.transpose(outer, jax.tree.structure((0,) * n), tree)
