"""The binary convolution as a `flax.nnx` module (docs/method.md §5).

`BinaryConv` computes what the linen `ovsw_jax.layers.BinaryConv` computes:
the same `xnor_conv`, the same Kaiming-normal fan-in initialisation, and the
latent weight under the same name, `latent_kernel`, so that
`ovsw_jax.binary_weight_mask` (the default mask of `ovsw_jax.ovsw`) finds it
in `nnx.state(model)`:

  optimizer = nnx.Optimizer(
      model, optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4), optax.sgd(0.1)),
      wrt=nnx.Param)

The latent weight is a `LatentKernel`, a subclass of `nnx.Param`: optimizers
with `wrt=nnx.Param` train it like any parameter, and the filter
`LatentKernel` picks the binary kernels alone, whatever they are called (for
example, to give them an optimizer of their own).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ovsw_jax.layers import PaddingLike, kaiming_normal_fan_in, xnor_conv


class LatentKernel(nnx.Param):
  """The real-valued latent weight of a binary layer; the forward pass uses its sign."""


class BinaryConv(nnx.Module):
  """Binary convolution with 1-bit weights and activations, NHWC input.

  The latent weight `latent_kernel` has shape `kernel_size + (in_features,
  out_features)` (HWIO) and no bias goes with it. In training
  (`deterministic=False`, the default, or after `model.train()`) the input is
  divided by its per-example standard deviation before the sign; `model.eval()`
  sets `deterministic=True` and skips that step, as `train=False` does for the
  linen module.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: the window, one int per spatial axis (a sequence).
    strides: an int or one int per spatial axis.
    padding: an int (zeros on every side, as torch's `padding=`), "SAME",
      "VALID", or `(low, high)` pairs per spatial axis.
    dtype: the computation dtype (None: the input's).
    param_dtype: the latent weight's dtype.
    kernel_init: initialiser of the latent weight (Kaiming normal, fan-in).
    deterministic: evaluation mode (no activation normalisation).
    rngs: the `nnx.Rngs` whose `params` stream initialises the weight.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import ovsw_jax as ow
    >>> conv = ow.nnx.BinaryConv(3, 8, (3, 3), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((2, 16, 16, 3))).shape
    (2, 16, 16, 8)
    >>> conv.latent_kernel[...].shape
    (3, 3, 3, 8)
  """

  def __init__(self,
               in_features: int,
               out_features: int,
               kernel_size: Sequence[int] = (3, 3),
               *,
               strides: int | Sequence[int] = 1,
               padding: PaddingLike = 1,
               dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32,
               kernel_init: nnx.Initializer = kaiming_normal_fan_in,
               deterministic: bool = False,
               rngs: nnx.Rngs):
    if isinstance(kernel_size, int):
      raise TypeError(
          f"kernel_size={kernel_size}: give one size per spatial axis, e.g. "
          f"({kernel_size}, {kernel_size}) for a 2-D convolution.")
    for name, value in (("in_features", in_features), ("out_features", out_features)):
      if int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    kernel_shape = tuple(int(k) for k in kernel_size) + (int(in_features), int(out_features))
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.kernel_size = kernel_shape[:-2]
    self.strides = strides
    self.padding = padding
    self.dtype = dtype
    self.deterministic = deterministic
    self.latent_kernel = LatentKernel(kernel_init(rngs.params(), kernel_shape, param_dtype))

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """`xnor_conv(x, latent_kernel)`; `deterministic` overrides the attribute for this call."""
    if x.shape[-1] != self.in_features:
      raise ValueError(
          f"BinaryConv expects {self.in_features} input channels (the last axis), "
          f"got an input of shape {x.shape}.")
    if deterministic is None:
      deterministic = self.deterministic
    dtype = self.dtype or x.dtype
    return xnor_conv(x.astype(dtype), self.latent_kernel[...], strides=self.strides,
                     padding=self.padding, training=not deterministic)
