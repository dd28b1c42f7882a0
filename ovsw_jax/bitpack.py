"""Bit-packed sign storage: 2 bits per weight instead of a float.

`sign` takes three values (-1, 0, +1) and the release compares signs with
`sign(0) = 0`, so a sign is stored exactly as two bit-planes, "positive" and
"negative", each packed 8 weights to a byte with `jnp.packbits`: 0.25 bytes
per weight. Used by SAD's previous signs and by the flip metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_signs(x: jax.Array) -> jax.Array:
  """Packs `sign(x)` into a uint8 array of shape `(2, ceil(x.size / 8))`.

  >>> import jax.numpy as jnp
  >>> packed = pack_signs(jnp.array([0.5, 0.0, -2.0]))
  >>> packed.shape, unpack_signs(packed, (3,)).tolist()
  ((2, 1), [1, 0, -1])
  """
  flat = x.reshape(-1)
  return jnp.stack([jnp.packbits(flat > 0), jnp.packbits(flat < 0)])


def unpack_signs(packed: jax.Array, shape) -> jax.Array:
  """Inverse of `pack_signs`: an int8 array of `shape` holding -1, 0 or +1."""
  size = 1
  for d in shape:
    size *= int(d)
  bits = jnp.unpackbits(packed, axis=-1, count=size).astype(jnp.int8)
  return (bits[0] - bits[1]).reshape(shape)


def pack_bits(mask: jax.Array) -> jax.Array:
  """Packs a boolean array into uint8, 8 to a byte, flattened."""
  return jnp.packbits(mask.reshape(-1))


def unpack_bits(packed: jax.Array, shape) -> jax.Array:
  """Inverse of `pack_bits`: a boolean array of `shape`."""
  size = 1
  for d in shape:
    size *= int(d)
  return jnp.unpackbits(packed, count=size).astype(bool).reshape(shape)


def sign_changed(packed: jax.Array, x: jax.Array) -> jax.Array:
  """Boolean array, True where `sign(x)` differs from the packed sign.

  A move to or from exactly zero counts as a change (`sign(0) = 0`).

  >>> import jax.numpy as jnp
  >>> sign_changed(pack_signs(jnp.array([1.0, -1.0, 0.0])), jnp.array([2.0, 1.0, -1.0])).tolist()
  [False, True, True]
  """
  return jnp.sign(x).astype(jnp.int8) != unpack_signs(packed, x.shape)
