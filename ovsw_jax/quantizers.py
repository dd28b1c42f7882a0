"""Binarizers: pure functions with straight-through gradients (`jax.custom_vjp`).

Each function keeps its input's dtype and works under `jit`, `vmap` and `grad`.
The forward of every binarizer is `jnp.sign`, so `sign(0) = 0`, as in the
authors' PyTorch release (`torch.sign`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def ste_sign(x: jax.Array, clip_value: float | None = None) -> jax.Array:
  """Sign with a straight-through gradient.

  Forward: `sign(x)`. Backward: `g` (identity) when `clip_value` is None, else
  `g * (|x| <= clip_value)` (the gradient is cancelled outside the clip range,
  as in BinaryConnect). OvSW binarizes latent weights with the identity form
  (docs/method.md §5, step 3).

  Args:
    x: input array.
    clip_value: optional clip range of the backward pass.

  Returns:
    `sign(x)` in `x.dtype`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([-2.0, 0.0, 0.5])
    >>> ste_sign(x).tolist(), jax.grad(lambda x: ste_sign(x).sum())(x).tolist()
    ([-1.0, 0.0, 1.0], [1.0, 1.0, 1.0])
  """
  return jnp.sign(x)


def _ste_sign_fwd(x, clip_value):
  return jnp.sign(x), x


def _ste_sign_bwd(clip_value, x, g):
  if clip_value is None:
    return (g,)
  return (jnp.where(jnp.abs(x) <= clip_value, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """Sign with the ApproxSign gradient of Bi-Real Net (Liu et al., 2018).

  Forward: `sign(x)`. Backward: `g * max(0, 2 - 2|x|)`, the derivative of the
  piecewise-quadratic approximation of sign. Used for activations (docs/method.md §5, step 2).

  >>> import jax, jax.numpy as jnp
  >>> jax.grad(lambda x: approx_sign(x).sum())(jnp.array([-2.0, -0.25, 0.0, 0.75])).tolist()
  [0.0, 1.5, 2.0, 0.5]
  """
  return jnp.sign(x)


def _approx_sign_fwd(x):
  return jnp.sign(x), x


def _approx_sign_bwd(x, g):
  two = jnp.asarray(2, dtype=x.dtype)
  return (g * jnp.maximum(jnp.zeros_like(x), two - two * jnp.abs(x)).astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def channel_scale(w: jax.Array, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  """Per-output-channel scale `alpha` of a binary kernel (docs/method.md §5, step 4).

  The kernel is standardised per channel, `(w - mean_o) / sqrt(var_o + eps)`
  with the unbiased variance (as `torch.var`), and `alpha_o` is the mean
  absolute value of the standardised channel. No gradient flows through it.

  Args:
    w: latent kernel, rank >= 2.
    axis: the output-channel axis (last for Flax's HWIO kernels).
    eps: added to the variance.

  Returns:
    A vector of length `w.shape[axis]`, in `w.dtype`.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, 5.0], [-1.0, 5.0]])  # channel 0: +-1; channel 1: constant
    >>> channel_scale(w).tolist()  # |+-1| / sqrt(2 + 1e-5); 0 / sqrt(0 + 1e-5)
    [0.7071..., 0.0]
  """
  if w.ndim < 2:
    raise ValueError(
        f"channel_scale needs a kernel of rank >= 2, got shape {w.shape}.")
  axis = axis % w.ndim
  others = tuple(a for a in range(w.ndim) if a != axis)
  w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
  mean = jnp.mean(w32, axis=others, keepdims=True)
  var = jnp.var(w32, axis=others, keepdims=True, ddof=1)
  standardised = (w32 - mean) / jnp.sqrt(var + eps)
  return jnp.mean(jnp.abs(standardised), axis=others).astype(w.dtype)
