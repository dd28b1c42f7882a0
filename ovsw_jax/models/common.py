"""Pieces shared by the paper's models (docs/method.md §6).

Everything here reproduces a PyTorch behaviour of the authors' release exactly:
hardtanh's gradient, BatchNorm's epsilon and momentum, torch-style explicit
padding of full-precision convs, per-channel PReLU, and the two kinds of
projection-free / projection shortcut.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovsw_jax.layers import BinaryConv, QuantConv, kaiming_normal_fan_in

Dtype = Any

# docs/method.md §6: BatchNorm as in PyTorch, epsilon 1e-5 and running statistics
# updated with torch momentum 0.1 (Flax's `momentum` is the decay, so 0.9).
# `use_fast_variance=False` computes the batch variance in two passes like
# torch rather than as E[x^2] - E[x]^2, which loses precision when the mean is
# large relative to the spread (as after a binary conv). Flax keeps the running
# variance from the biased batch variance; torch from the unbiased one: the
# only remaining difference, and only in the running statistics.
BatchNorm = functools.partial(
    nn.BatchNorm, momentum=0.9, epsilon=1e-5, use_fast_variance=False)

# The ImageNet ResNets initialise every BatchNorm2d scale to 1e-8 (docs/method.md §6).
tiny_scale_init = nn.initializers.constant(1e-8)

# VGG-small's conv init, normal(0, sqrt(2 / (k * k * c_out))) for every conv,
# binary or not (docs/method.md §6): for an HWIO kernel Flax's fan_out is
# k * k * c_out.
vgg_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def hardtanh(x: jax.Array) -> jax.Array:
  """`clip(x, -1, 1)` with torch's gradient: 1 strictly inside, 0 elsewhere.

  `torch.nn.functional.hardtanh` passes the gradient only where
  `-1 < x < 1`; `jnp.clip` would pass half of it at the boundaries, where a
  residual sum can land exactly (a clipped input plus a zero BN output).
  """
  one = jnp.asarray(1, x.dtype)
  inside = (x > -one) & (x < one)
  return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, -one, one)))


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """The explicit padding torch uses for an odd square kernel: k // 2 a side.

  Flax's 'SAME' pads asymmetrically for strided convs (more at the end); torch
  pads both sides equally, so give the pairs explicitly.
  """
  p = kernel_size // 2
  return ((p, p), (p, p))


def conv_fp(features: int,
            kernel_size: int,
            *,
            strides: int = 1,
            use_bias: bool = False,
            dtype: Dtype = jnp.float32,
            kernel_init: Callable[..., jax.Array] | None = None,
            name: str) -> nn.Conv:
  """A full-precision square conv with torch padding (k // 2 per side).

  No bias by default, as torch's ResNets (`bias=False`). The kernel keeps
  Flax's default init unless `kernel_init` is given (docs/method.md §5).
  """
  kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides,
                 padding=torch_padding(kernel_size), use_bias=use_bias,
                 dtype=dtype, name=name, **kwargs)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of NHWC: `(N, H, W, C) -> (N, C)`."""
  return jnp.mean(x, axis=(1, 2))


def avgpool_zeropad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """ResNet-20's parameter-free shortcut ("option A", docs/method.md §6).

  A `strides x strides` average pool (torch `AvgPool2d`, no padding, so odd
  sizes are floored), then zero channels padded equally on both sides up to
  `features` (the release pads `planes // 4` a side when doubling the width).
  """
  if strides != 1:
    x = nn.avg_pool(x, (strides, strides), strides=(strides, strides))
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(
        f"zero-pad shortcut cannot shrink channels: {x.shape[-1]} -> {features}.")
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class ProjectionShortcut(nn.Module):
  """A strided 1x1 conv then BatchNorm: the shortcut of a downsampling block.

  `binary=True` makes the conv a `BinaryConv` (CIFAR ResNet-18, whose release
  builds it with `builder.conv1x1`), `binary=False` a full-precision conv
  without bias (the ImageNet ResNets' `downsample`). Submodules are `conv` and
  `bn`, the release's `downsample.0` / `downsample.1` (or `shortcut.*`).
  """
  features: int
  strides: int = 1
  binary: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  bn_scale_init: Callable[..., jax.Array] = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.binary:
      x = BinaryConv(self.features, (1, 1), strides=self.strides, padding=0,
                     dtype=self.dtype, name="conv")(x, train=train)
    else:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, padding="VALID",
                  use_bias=False, dtype=self.dtype, name="conv")(x)
    return BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name,
                     scale_init=self.bn_scale_init, dtype=self.dtype,
                     name="bn")(x)


class PReLU(nn.Module):
  """Per-channel PReLU as `torch.nn.PReLU(num_parameters=C)`.

  `max(0, x) + a_c * min(0, x)`, one slope per channel (the last axis),
  initialised to 0.25. Flax's `nn.PReLU` has a single scalar slope. At x = 0
  the gradient is torch's, `a_c`.
  """
  init_value: float = 0.25
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("negative_slope", nn.initializers.constant(self.init_value),
                       (x.shape[-1],), self.param_dtype)
    slope = slope.astype(x.dtype)
    return jnp.where(x > 0, x, slope * x)


def block_conv(features: int, kernel_quantizer: Any = None, *, strides: int = 1,
               dtype: Dtype = jnp.float32, name: str) -> Callable[[jax.Array, bool], jax.Array]:
  """A residual block's 3x3 quantized conv, called as `conv(x, train)`.

  `kernel_quantizer=None`: the release's `BinaryConv` (1-bit kernel scaled per
  output channel, 1-bit inputs). A quantizer name or object (e.g. 'ternary',
  'midrise2_absmean'): a bias-free `QuantConv` with that kernel, the same 1-bit
  inputs (`approx_sign`) and init, under the same parameter path
  (`<name>/latent_kernel`), so that only the weights' levels change between
  the two (docs/method.md §10). Call it inside a compact module's `__call__`.
  """
  if kernel_quantizer is None:
    binary = BinaryConv(features, (3, 3), strides=strides, padding=1, dtype=dtype, name=name)
    return lambda x, train: binary(x, train=train)
  conv = QuantConv(features, (3, 3), strides=strides, padding=1, use_bias=False, dtype=dtype,
                   kernel_init=kaiming_normal_fan_in, kernel_quantizer=kernel_quantizer,
                   input_quantizer="approx_sign", name=name)
  return lambda x, train: conv(x)
