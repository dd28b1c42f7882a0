"""Helpers shared by the OvSW transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_non_negative(name: str, value) -> None:
  """Raises ValueError when a concrete hyperparameter is negative.

  Traced values (under `inject_hyperparams` or `jit`) and schedules are not
  checked: they are only known at run time.
  """
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  if jnp.any(jnp.asarray(value) < 0):
    raise ValueError(f"{name}={value} must be >= 0.")


def check_momentum(name: str, value) -> None:
  """Raises ValueError when a concrete momentum is outside [0, 1)."""
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if not 0.0 <= v < 1.0:
    raise ValueError(f"{name}={value} must lie in [0, 1).")


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
