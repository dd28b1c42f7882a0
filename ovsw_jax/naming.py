"""Names that tie the binary layers to the mask of the OvSW transforms.

Kept free of Flax and Optax so that `ovsw_jax.optim` can use them without
importing any layer library.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

# Attribute and parameter name of every binary layer's latent (real-valued)
# weight, in the linen and the nnx `BinaryConv` alike. `binary_weight_mask`
# keys on it, so a binary kernel is recognised whatever its module is called.
LATENT_KERNEL = "latent_kernel"

# flax.nnx wraps each parameter in a Variable whose array sits at the
# attribute `value`: the path of an nnx leaf ends in `.value`.
_VARIABLE_VALUE = "value"


def key_name(entry: Any) -> str:
  """The plain name of one pytree path entry (dict key, attribute or index).

  >>> import jax
  >>> key_name(jax.tree_util.DictKey('conv1')), key_name(jax.tree_util.SequenceKey(2))
  ('conv1', '2')
  """
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_name(path: Sequence[Any]) -> str:
  """A pytree path as the slash-separated name used in metric keys (`layer1_0/conv1`).

  Built by `jax.tree_util.keystr` from each entry's own field (a DictKey's
  `key`, a GetAttrKey's `name`, a SequenceKey's `idx`), so a key that itself
  holds brackets or quotes is never mangled by string surgery. The same names
  label the per-layer metrics (`silent_ratio/<path_name>`) and the reproduction
  study's weight snapshots.

  >>> import jax
  >>> path_name((jax.tree_util.DictKey('layer1_0'), jax.tree_util.DictKey('conv1')))
  'layer1_0/conv1'
  >>> path_name((jax.tree_util.GetAttrKey('blocks'), jax.tree_util.SequenceKey(2)))
  'blocks/2'
  >>> path_name(())
  ''
  """
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def parameter_path(path: Sequence[Any]) -> tuple[Any, ...]:
  """`path` without the trailing `.value` attribute of a flax.nnx Variable.

  The attribute is a `jax.tree_util.GetAttrKey`; a dict key named "value"
  (a parameter really called so) is kept.

  >>> import jax
  >>> parameter_path((jax.tree_util.DictKey('conv'), jax.tree_util.GetAttrKey('value')))
  (DictKey(key='conv'),)
  """
  path = tuple(path)
  if path and getattr(path[-1], "name", None) == _VARIABLE_VALUE and not hasattr(path[-1], "key"):
    return path[:-1]
  return path


def is_latent_kernel(path: Sequence[Any]) -> bool:
  """Whether the leaf at `path` is a binary layer's latent weight (named `LATENT_KERNEL`).

  >>> import jax
  >>> paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
  ...     {'conv': {'latent_kernel': 0, 'bias': 0}})[0]]
  >>> [is_latent_kernel(p) for p in paths]
  [False, True]
  """
  path = parameter_path(path)
  return bool(path) and key_name(path[-1]) == LATENT_KERNEL
