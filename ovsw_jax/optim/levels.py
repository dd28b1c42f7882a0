"""Which quantizer each latent weight has: how OvSW tells a flip of level from a flip of sign.

SAD's tracker and the flip metrics count a weight as flipped when its
quantized *level* changes (docs/method.md §10). With 1-bit kernels the level is
the sign, the release's rule and the default. For other kernels the user says
which quantizer each leaf has, as `levels=`:

  * None: every leaf is a sign (the release);
  * a quantizer, or its short name (`'ternary'`, `'uniform4'`): every leaf;
  * a function from a latent weight to its integer levels (SAD's
    `toward='boundary'` then needs a `Quantizer`, which knows its thresholds);
  * a dict from parameter path (`'block/dense/latent_kernel'`, as
    `naming.path_name` writes it) to any of the above: what
    `ovsw_jax.kernel_quantizers(model, x)` (linen) and
    `ovsw_jax.nnx.kernel_quantizers(model)` read off a model;
  * a pytree of the above, structured as the parameters.

Paths, not tree positions, tie a quantizer to its leaf: inside `optax.masked`
the transform sees the masked leaves only, at the same paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ovsw_jax import quantizers
from ovsw_jax.naming import parameter_path, path_name


@dataclasses.dataclass(frozen=True)
class LevelFunction(quantizers.Quantizer):
  """A user's function from a latent weight to its integer levels (int8 range).

  It tells flips apart but not where they happen: no `cells`, so SAD's
  `toward='boundary'` needs a `Quantizer` instead.
  """
  fn: Callable[[jax.Array], jax.Array] = None  # type: ignore[assignment]
  planes = 8

  def levels(self, x):
    return jnp.asarray(self.fn(x))

  def cells(self, x):
    raise ValueError(
        "toward='boundary' needs each leaf's quantizer, which knows where its levels "
        f"change; levels= gave the plain function {self.fn!r}. Pass an "
        "ovsw_jax.quantizers.Quantizer (or a name such as 'ternary') instead.")


def as_quantizer(spec: Any) -> quantizers.Quantizer:
  """One leaf's quantizer from a name, a `Quantizer` or a level function (None: sign)."""
  if spec is None:
    return quantizers.SIGN
  if isinstance(spec, (str, quantizers.Quantizer)):
    return quantizers.get(spec)
  if callable(spec):
    return LevelFunction(fn=spec)
  raise TypeError(
      f"levels: {spec!r} is not a quantizer: give a name ({', '.join(quantizers.names())}), "
      "an ovsw_jax.quantizers.Quantizer, a function from weights to levels, or a dict "
      "or tree of these.")


def _is_spec(x) -> bool:
  return x is None or isinstance(x, (str, quantizers.Quantizer)) or (
      callable(x) and not isinstance(x, dict))


def _by_path(levels: Any) -> dict[str, Any]:
  """A dict or pytree of quantizer specs as {parameter path name: spec}.

  A dict keyed by path names (`{'block/dense/latent_kernel': q}`) and a
  nested tree give the same names: `path_name` joins the keys with '/'.
  """
  flat = jax.tree_util.tree_flatten_with_path(
      levels, is_leaf=lambda x: x is not levels and _is_spec(x))[0]
  return {path_name(parameter_path(p)): spec for p, spec in flat}


def resolve(levels: Any, params: Any) -> Any:
  """A tree shaped as `params` holding each leaf's `Quantizer` (see the module docstring).

  Raises:
    ValueError: `levels` is a dict or tree that names no quantizer for a leaf
      of `params` (a leaf the transform acts on must not fall back to signs
      unnoticed).
  """
  if _is_spec(levels):
    q = as_quantizer(levels)
    return jax.tree.map(lambda _: q, params)
  table = {name: as_quantizer(spec) for name, spec in _by_path(levels).items()}
  missing = []

  def pick(path, _):
    name = path_name(parameter_path(path))
    if name not in table:
      missing.append(name)
      return quantizers.SIGN
    return table[name]

  tree = jax.tree_util.tree_map_with_path(pick, params)
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise ValueError(
        f"levels names no quantizer for {shown}: add them (ovsw_jax.kernel_quantizers reads "
        "every quantized layer's off a model), or keep them out of the mask.")
  return tree
