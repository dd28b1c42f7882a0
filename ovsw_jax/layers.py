"""The release's binary convolution (docs/method.md §5) and its Flax module."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax import quantizers
from ovsw_jax.naming import LATENT_KERNEL


PaddingLike = int | str | Sequence[tuple[int, int]]

# torch.nn.init.kaiming_normal_(mode='fan_in', nonlinearity='relu'): an
# untruncated normal with std sqrt(2 / fan_in).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _lax_padding(padding: PaddingLike, spatial_dims: int):
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(
          f"padding={padding!r}: use 'SAME', 'VALID', an int or (low, high) pairs.")
    return padding.upper()
  if isinstance(padding, int):
    if padding < 0:
      raise ValueError(f"padding={padding} must be >= 0.")
    return [(padding, padding)] * spatial_dims
  pairs = [tuple(int(v) for v in p) for p in padding]
  if len(pairs) != spatial_dims or any(len(p) != 2 for p in pairs):
    raise ValueError(
        f"padding={padding!r}: give {spatial_dims} (low, high) pairs, one per spatial axis.")
  return pairs


def normalize_activations(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """`x / stop_gradient(sqrt(var(x) + eps))`, the variance per example.

  The variance is unbiased (as `torch.var`) over all axes but the batch axis.
  Signs are unchanged; the scaling decides where ApproxSign's gradient is
  non-zero (docs/method.md §5, step 1).
  """
  axes = tuple(range(1, x.ndim))
  var = jnp.var(x.astype(jnp.float32), axis=axes, keepdims=True, ddof=1)
  std = jax.lax.stop_gradient(jnp.sqrt(var + eps)).astype(x.dtype)
  return x / std


def xnor_conv(x: jax.Array,
              kernel: jax.Array,
              *,
              strides: int | Sequence[int] = 1,
              padding: PaddingLike = 0,
              training: bool = True) -> jax.Array:
  """The release's binary ("xnor") convolution, NHWC input and HWIO kernel.

  `conv(approx_sign(x'), ste_sign(kernel)) * alpha`, where `x'` is `x` divided
  by its per-example standard deviation in training (docs/method.md §5) and
  `alpha` is `quantizers.channel_scale(kernel)`.

  Args:
    x: activations `(N, H, W, C_in)`.
    kernel: latent weight `(kh, kw, C_in, C_out)`.
    strides: an int or one int per spatial axis.
    padding: an int (that many zeros on every side, as torch's `padding=`),
      "SAME"/"VALID", or `(low, high)` pairs per spatial axis. Zeros are padded
      after binarization, as in the release.
    training: apply the training-only activation normalisation.

  Returns:
    `(N, H', W', C_out)` in `x.dtype`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    >>> kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
    >>> xnor_conv(x, kernel, strides=2, padding=1).shape
    (2, 4, 4, 16)
  """
  if kernel.ndim < 2:
    raise ValueError(f"kernel must have rank >= 2 (HWIO), got shape {kernel.shape}.")
  if x.ndim != kernel.ndim:
    raise ValueError(
        f"x of shape {x.shape} and kernel of shape {kernel.shape} must have the "
        "same rank (NHWC activations with an HWIO kernel).")
  spatial = kernel.ndim - 2
  if isinstance(strides, int):
    strides = (strides,) * spatial
  if training:
    x = normalize_activations(x)
  a = quantizers.approx_sign(x)
  wb = quantizers.ste_sign(kernel).astype(x.dtype)
  if spatial > 3:
    raise ValueError(f"xnor_conv supports 0 to 3 spatial axes, got kernel shape {kernel.shape}.")
  sp = "DHW"[3 - spatial:]  # "" (dense), "W", "HW", "DHW": channels last throughout.
  dn = jax.lax.conv_dimension_numbers(
      a.shape, wb.shape, ("N" + sp + "C", sp + "IO", "N" + sp + "C"))
  y = jax.lax.conv_general_dilated(
      a, wb, window_strides=tuple(strides),
      padding=_lax_padding(padding, spatial), dimension_numbers=dn)
  alpha = quantizers.channel_scale(kernel).astype(y.dtype)
  return y * alpha


class BinaryConv(nn.Module):
  """Binary convolution with 1-bit weights and activations (docs/method.md §5).

  The latent weight is the parameter `latent_kernel` (HWIO), initialised with
  Kaiming normal (fan-in, gain sqrt(2)) as in the release. No bias.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: PaddingLike = 1
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = kaiming_normal_fan_in

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    kernel_shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    kernel = self.param(LATENT_KERNEL, self.kernel_init, kernel_shape,
                        self.param_dtype)
    dtype = self.dtype or x.dtype
    return xnor_conv(x.astype(dtype), kernel, strides=self.strides,
                     padding=self.padding, training=train)
