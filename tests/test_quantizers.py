"""Binarizers and the channel scale, checked against numpy formulas (docs/method.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ovsw_jax as ow

# Exact zeros (both signs), values around +-1 and the clip range; every value is
# exactly representable in bfloat16 and float16, and so is 2 - 2|x| for each.
X = np.array([-3.0, -1.5, -1.0078125, -1.0, -0.9921875, -0.75, -0.5, -0.0, 0.0,
              0.25, 0.5, 0.9921875, 1.0, 1.0078125, 2.0, 0.0], np.float32)
COT = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25, 1.5, -4.0, 1.0, -0.5, 2.0,
                -3.0, 1.0, 0.75, 2.0], np.float32)
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def np_sign(x):
  return np.sign(np.asarray(x, np.float64))


def approx_sign_grad_ref(x, g):
  x = np.asarray(x, np.float64)
  return np.asarray(g, np.float64) * np.maximum(0.0, 2.0 - 2.0 * np.abs(x))


def ste_grad_ref(x, g, clip=None):
  g = np.asarray(g, np.float64)
  if clip is None:
    return g
  return np.where(np.abs(np.asarray(x, np.float64)) <= clip, g, 0.0)


def vjp(f, x, g):
  y, pull = jax.vjp(f, x)
  return y, pull(g)[0]


@pytest.mark.parametrize("fn", [ow.ste_sign, ow.approx_sign])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_sign_with_sign_zero_zero(fn, dtype):
  x = jnp.asarray(X, dtype)
  y = fn(x)
  assert y.dtype == dtype
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y, np.float64), np_sign(X))
  # The zeros of X map to 0, not to +1.
  assert np.all(np.asarray(y, np.float64)[X == 0] == 0)
  assert set(np.unique(np.asarray(y, np.float64))) == {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("dtype", DTYPES)
def test_approx_sign_gradient(dtype):
  y, dx = vjp(ow.approx_sign, jnp.asarray(X, dtype), jnp.asarray(COT, dtype))
  assert y.dtype == dtype and dx.dtype == dtype
  expected = approx_sign_grad_ref(X, COT)
  # Exact: inputs, cotangents and 2 - 2|x| are all representable in every dtype.
  np.testing.assert_array_equal(np.asarray(dx, np.float64), expected)
  # Spot checks of the formula: zero gradient at and beyond |x| = 1, 2 * g at 0.
  assert np.all(expected[np.abs(X) >= 1] == 0)
  np.testing.assert_array_equal(expected[X == 0], 2 * COT[X == 0])


def test_approx_sign_gradient_random_values():
  x = np.random.RandomState(0).uniform(-1.5, 1.5, size=(64,)).astype(np.float32)
  g = np.random.RandomState(1).randn(64).astype(np.float32)
  _, dx = vjp(ow.approx_sign, jnp.asarray(x), jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(dx), approx_sign_grad_ref(x, g), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ste_sign_gradient_is_identity(dtype):
  y, dx = vjp(ow.ste_sign, jnp.asarray(X, dtype), jnp.asarray(COT, dtype))
  assert y.dtype == dtype and dx.dtype == dtype
  np.testing.assert_array_equal(np.asarray(dx, np.float64), ste_grad_ref(X, COT))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_ste_sign_gradient_with_clip(dtype, clip):
  _, dx = vjp(lambda x: ow.ste_sign(x, clip), jnp.asarray(X, dtype), jnp.asarray(COT, dtype))
  assert dx.dtype == dtype
  expected = ste_grad_ref(X, COT, clip)
  np.testing.assert_array_equal(np.asarray(dx, np.float64), expected)
  # Gradient is cancelled strictly outside |x| <= clip and kept on the boundary.
  assert np.all(expected[np.abs(X) > clip] == 0)
  assert np.all(expected[np.abs(X) == clip] == COT[np.abs(X) == clip])
  # The clip changes the backward only.
  np.testing.assert_array_equal(
      np.asarray(ow.ste_sign(jnp.asarray(X, dtype), clip), np.float64), np_sign(X))


def test_ste_sign_clip_keyword():
  _, dx = vjp(lambda x: ow.ste_sign(x, clip_value=1.0), jnp.asarray(X), jnp.asarray(COT))
  np.testing.assert_array_equal(np.asarray(dx), ste_grad_ref(X, COT, 1.0))


def test_jit_vmap_grad():
  x = jnp.asarray(X)
  np.testing.assert_array_equal(np.asarray(jax.jit(ow.approx_sign)(x)), np_sign(X))
  np.testing.assert_array_equal(np.asarray(jax.jit(ow.ste_sign)(x)), np_sign(X))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: ow.ste_sign(v, 1.0))(x)), np_sign(X))

  # Per-element derivative through vmap(grad(.)) and jit(vmap(grad(.))).
  d_approx = jax.jit(jax.vmap(jax.grad(ow.approx_sign)))(x)
  np.testing.assert_array_equal(np.asarray(d_approx), approx_sign_grad_ref(X, np.ones_like(X)))
  d_ste = jax.vmap(jax.grad(ow.ste_sign))(x)
  np.testing.assert_array_equal(np.asarray(d_ste), np.ones_like(X))
  d_clip = jax.jit(jax.vmap(jax.grad(lambda v: ow.ste_sign(v, 1.0))))(x)
  np.testing.assert_array_equal(np.asarray(d_clip), (np.abs(X) <= 1.0).astype(np.float32))

  # vmap over a batch axis of a 2-D input, and grad of a scalar loss under jit.
  xb = jnp.asarray(X.reshape(4, 4))
  np.testing.assert_array_equal(np.asarray(jax.vmap(ow.approx_sign)(xb)), np_sign(X).reshape(4, 4))
  loss = lambda v: jnp.sum(ow.approx_sign(v) * jnp.asarray(COT.reshape(4, 4)))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jax.grad(loss))(xb)),
      approx_sign_grad_ref(X, COT).reshape(4, 4))


def channel_scale_ref(w, axis=-1, eps=1e-5):
  w = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  flat = w.reshape(-1, w.shape[-1])
  mean = flat.mean(axis=0)
  var = flat.var(axis=0, ddof=1)
  return np.mean(np.abs((flat - mean) / np.sqrt(var + eps)), axis=0)


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 8, 3), (6, 7)])
def test_channel_scale_matches_numpy(shape):
  rs = np.random.RandomState(sum(shape))
  # Channels with different means and spreads so that the standardisation matters.
  w = (rs.randn(*shape) * rs.uniform(0.01, 2.0, size=shape[-1])
       + rs.uniform(-1, 1, size=shape[-1])).astype(np.float32)
  alpha = ow.channel_scale(jnp.asarray(w))
  assert alpha.shape == (shape[-1],)
  assert alpha.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(alpha), channel_scale_ref(w), rtol=1e-5)


def test_channel_scale_uses_unbiased_variance():
  # A 2-element channel: [-1, 1] has unbiased var 2 and biased var 1, so the two
  # conventions give alpha = 1/sqrt(2 + eps) and 1/sqrt(1 + eps).
  w = jnp.asarray([[-1.0, 3.0], [1.0, 5.0]])
  alpha = np.asarray(ow.channel_scale(w))
  np.testing.assert_allclose(alpha, [1 / np.sqrt(2 + 1e-5)] * 2, rtol=1e-6)


def test_channel_scale_axis_argument():
  w = np.random.RandomState(3).randn(5, 4, 3, 3).astype(np.float32)  # OIHW
  alpha = ow.channel_scale(jnp.asarray(w), axis=0)
  np.testing.assert_allclose(np.asarray(alpha), channel_scale_ref(w, axis=0), rtol=1e-5)
  hwio = np.transpose(w, (2, 3, 1, 0))
  np.testing.assert_allclose(np.asarray(ow.channel_scale(jnp.asarray(hwio))),
                             np.asarray(alpha), rtol=1e-6)


def test_channel_scale_has_no_gradient():
  w = jnp.asarray(np.random.RandomState(4).randn(3, 3, 2, 4).astype(np.float32))
  grad = jax.grad(lambda v: jnp.sum(ow.channel_scale(v) * jnp.arange(1.0, 5.0)))(w)
  np.testing.assert_array_equal(np.asarray(grad), np.zeros(w.shape))
  # Under jit too, and inside a product with another differentiable term.
  f = lambda v: jnp.sum(v * ow.channel_scale(v))
  grad2 = jax.jit(jax.grad(f))(w)
  np.testing.assert_allclose(np.asarray(grad2),
                             np.broadcast_to(channel_scale_ref(np.asarray(w)), w.shape), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_channel_scale_keeps_dtype(dtype):
  w = np.random.RandomState(5).randn(3, 3, 2, 4).astype(np.float32)
  alpha = ow.channel_scale(jnp.asarray(w, dtype))
  assert alpha.dtype == dtype
  ref = channel_scale_ref(np.asarray(jnp.asarray(w, dtype), np.float32))
  np.testing.assert_allclose(np.asarray(alpha, np.float32), ref, rtol=1e-2)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_channel_scale_rejects_rank_below_two(shape):
  with pytest.raises(ValueError):
    ow.channel_scale(jnp.ones(shape))
