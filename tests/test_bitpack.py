"""Bit-packed sign storage: round trips against numpy, sizes, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovsw_jax import bitpack

SHAPES = [(1,), (7,), (8,), (9,), (17,), (3, 5), (3, 5, 7), (3, 3, 3, 5), (2, 4, 8)]


def random_with_zeros(shape, seed):
  rs = np.random.RandomState(seed)
  x = rs.randn(*shape).astype(np.float32)
  flat = x.reshape(-1)
  flat[rs.rand(flat.size) < 0.25] = 0.0
  if flat.size > 1:
    flat[-1] = -0.0
  return x


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_round_trip(shape):
  x = random_with_zeros(shape, len(shape) * 31 + shape[0])
  packed = bitpack.pack_signs(jnp.asarray(x))
  n = x.size
  assert packed.dtype == jnp.uint8
  assert packed.shape == (2, -(-n // 8))
  signs = bitpack.unpack_signs(packed, shape)
  assert signs.dtype == jnp.int8
  assert signs.shape == shape
  np.testing.assert_array_equal(np.asarray(signs), np.sign(x).astype(np.int8))


def test_sign_round_trip_all_values():
  x = np.array([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, np.inf, -np.inf, 3.0, -2.0, 0.0],
               np.float32)
  signs = bitpack.unpack_signs(bitpack.pack_signs(jnp.asarray(x)), x.shape)
  np.testing.assert_array_equal(np.asarray(signs), [0, 0, 1, -1, 1, -1, 1, -1, 1, -1, 0])


def test_packed_layout_is_two_bit_planes():
  # Independent of the unpacker: numpy's packbits of the positive / negative masks.
  x = random_with_zeros((5, 7), 2)
  packed = np.asarray(bitpack.pack_signs(jnp.asarray(x)))
  np.testing.assert_array_equal(packed[0], np.packbits(x.reshape(-1) > 0))
  np.testing.assert_array_equal(packed[1], np.packbits(x.reshape(-1) < 0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_other_dtypes(dtype):
  x = np.array([[-2, 0, 3], [1, 0, -1]], np.float32)
  signs = bitpack.unpack_signs(bitpack.pack_signs(jnp.asarray(x, dtype)), x.shape)
  np.testing.assert_array_equal(np.asarray(signs), np.sign(x).astype(np.int8))


def test_bytes_per_weight_is_a_quarter():
  for shape in [(3, 3, 64, 64), (3, 3, 16, 16), (1, 1, 8, 16)]:
    n = int(np.prod(shape))
    packed = bitpack.pack_signs(jnp.ones(shape))
    assert packed.size * packed.dtype.itemsize / n == 0.25
  # Odd sizes round up to whole bytes per plane.
  packed = bitpack.pack_signs(jnp.ones((3, 3, 3, 5)))  # 135 weights
  assert packed.size * packed.dtype.itemsize == 2 * 17


@pytest.mark.parametrize("shape", [(1,), (9,), (3, 5, 7), (16,)])
def test_bits_round_trip(shape):
  mask = np.random.RandomState(shape[0]).rand(*shape) < 0.5
  packed = bitpack.pack_bits(jnp.asarray(mask))
  assert packed.dtype == jnp.uint8
  assert packed.shape == (-(-mask.size // 8),)
  np.testing.assert_array_equal(packed, np.packbits(mask.reshape(-1)))
  out = bitpack.unpack_bits(packed, shape)
  assert out.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(out), mask)


def test_sign_changed_matches_numpy():
  prev = np.array([0.3, 0.0, -0.2, 0.0, 0.5, -0.0, 0.0, -1.0, 2.0], np.float32)
  new = np.array([0.0, 0.0, -0.7, 0.4, -0.5, 0.0, -0.0, 1.0, 0.1], np.float32)
  changed = bitpack.sign_changed(bitpack.pack_signs(jnp.asarray(prev)), jnp.asarray(new))
  expected = np.sign(prev) != np.sign(new)
  np.testing.assert_array_equal(np.asarray(changed), expected)
  # 0.3 -> 0.0 is a change (sign(0) = 0); 0 -> -0 is not.
  np.testing.assert_array_equal(expected, [1, 0, 0, 1, 1, 0, 0, 1, 0])

  a = random_with_zeros((3, 3, 4, 5), 8)
  b = random_with_zeros((3, 3, 4, 5), 9)
  changed = jax.jit(lambda p, x: bitpack.sign_changed(bitpack.pack_signs(p), x))(
      jnp.asarray(a), jnp.asarray(b))
  assert changed.shape == a.shape
  np.testing.assert_array_equal(np.asarray(changed), np.sign(a) != np.sign(b))


def test_under_jit():
  x = random_with_zeros((3, 3, 2, 5), 4)
  packed = jax.jit(bitpack.pack_signs)(jnp.asarray(x))
  signs = jax.jit(bitpack.unpack_signs, static_argnums=1)(packed, x.shape)
  np.testing.assert_array_equal(np.asarray(signs), np.sign(x).astype(np.int8))


@pytest.mark.parametrize("shape", SHAPES)
def test_changed_bits_is_the_packed_sign_difference(shape):
  a, b = random_with_zeros(shape, 10), random_with_zeros(shape, 11)
  b.reshape(-1)[::3] = a.reshape(-1)[::3]  # some weights keep their sign
  packed = bitpack.changed_bits(bitpack.pack_signs(jnp.asarray(a)),
                                bitpack.pack_signs(jnp.asarray(b)))
  expected = np.sign(a) != np.sign(b)
  np.testing.assert_array_equal(np.asarray(packed), np.packbits(expected.reshape(-1)))
  np.testing.assert_array_equal(np.asarray(bitpack.unpack_bits(packed, shape)), expected)
