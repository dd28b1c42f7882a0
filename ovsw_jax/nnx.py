"""The binary convolution and the quantized Dense and Conv layers as `flax.nnx` modules.

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

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from ovsw_jax import quantizers
from ovsw_jax.layers import PaddingLike, kaiming_normal_fan_in, quant_conv, quant_dense, xnor_conv
from ovsw_jax.naming import LATENT_KERNEL


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


# nnx.Linear's and nnx.Conv's defaults.
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()


def _check_features(**features) -> None:
  for name, value in features.items():
    if int(value) != value or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive int.")


class QuantDense(nnx.Module):
  """`nnx.Linear` with a quantized kernel and, optionally, quantized inputs.

  Arguments as `flax.nnx.Linear`, plus `kernel_quantizer` (default 'sign') and
  `input_quantizer` (default None) as for the linen `ovsw_jax.QuantDense`. The
  latent weight is the `LatentKernel` `latent_kernel`, `(in, out)` (a plain
  `nnx.Param` named `kernel` when `kernel_quantizer=None`).

  >>> from flax import nnx
  >>> import jax.numpy as jnp, ovsw_jax as ow
  >>> layer = ow.nnx.QuantDense(3, 4, kernel_quantizer='uniform4', rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 3))).shape, layer.latent_kernel[...].shape
  ((2, 4), (3, 4))
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype: jnp.dtype | None = None, param_dtype: jnp.dtype = jnp.float32,
               precision: Any = None,
               kernel_init: nnx.Initializer = _DEFAULT_KERNEL_INIT,
               bias_init: nnx.Initializer = _ZEROS,
               kernel_quantizer: Any = "sign", input_quantizer: Any = None, rngs: nnx.Rngs):
    _check_features(in_features=in_features, out_features=out_features)
    self.in_features, self.out_features = int(in_features), int(out_features)
    self.kernel_quantizer = quantizers.get(kernel_quantizer)
    self.input_quantizer = quantizers.get(input_quantizer)
    self.dtype, self.precision = dtype, precision
    _init_params(self, (self.in_features, self.out_features), kernel_init, bias_init,
                 use_bias, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = _promote(self, x)
    return quant_dense(x, kernel, bias, kernel_quantizer=self.kernel_quantizer,
                       input_quantizer=self.input_quantizer, precision=self.precision)


class QuantConv(nnx.Module):
  """`nnx.Conv` (1-D, 2-D or 3-D, channels last) with quantized kernel and inputs.

  Arguments as `flax.nnx.Conv`, plus `kernel_quantizer` and `input_quantizer`
  as for `QuantDense`; the latent weight is `latent_kernel`,
  `kernel_size + (in / groups, out)`.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
               strides: int | Sequence[int] = 1, *, padding: Any = "SAME",
               input_dilation: int | Sequence[int] = 1,
               kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
               use_bias: bool = True, dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32, precision: Any = None,
               kernel_init: nnx.Initializer = _DEFAULT_KERNEL_INIT,
               bias_init: nnx.Initializer = _ZEROS,
               kernel_quantizer: Any = "sign", input_quantizer: Any = None, rngs: nnx.Rngs):
    _check_features(in_features=in_features, out_features=out_features)
    if in_features % feature_group_count:
      raise ValueError(f"QuantConv: in_features={in_features} is not divisible by "
                       f"feature_group_count={feature_group_count}.")
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    self.in_features, self.out_features = int(in_features), int(out_features)
    self.kernel_size = kernel_size
    self.strides, self.padding = strides, padding
    self.input_dilation, self.kernel_dilation = input_dilation, kernel_dilation
    self.feature_group_count = feature_group_count
    self.kernel_quantizer = quantizers.get(kernel_quantizer)
    self.input_quantizer = quantizers.get(input_quantizer)
    self.dtype, self.precision = dtype, precision
    shape = kernel_size + (self.in_features // feature_group_count, self.out_features)
    _init_params(self, shape, kernel_init, bias_init, use_bias, param_dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = _promote(self, x)
    return quant_conv(x, kernel, bias, strides=self.strides, padding=self.padding,
                      input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
                      feature_group_count=self.feature_group_count,
                      kernel_quantizer=self.kernel_quantizer,
                      input_quantizer=self.input_quantizer, precision=self.precision)


def _init_params(layer, shape, kernel_init, bias_init, use_bias, param_dtype, rngs) -> None:
  """The kernel (`latent_kernel`, or `kernel` when not quantized) and the bias of a layer."""
  kernel = kernel_init(rngs.params(), shape, param_dtype)
  if layer.kernel_quantizer is None:
    layer.kernel = nnx.Param(kernel)
  else:
    layer.latent_kernel = LatentKernel(kernel)
  layer.bias = (nnx.Param(bias_init(rngs.params(), (layer.out_features,), param_dtype))
                if use_bias else None)


def _promote(layer, x):
  kernel = (layer.kernel if layer.kernel_quantizer is None else layer.latent_kernel)[...]
  bias = layer.bias[...] if layer.bias is not None else None
  return promote_dtype((x, kernel, bias), dtype=layer.dtype)


def kernel_quantizers(model: nnx.Module) -> dict[str, Any]:
  """`{latent kernel path: its quantizer}` of an nnx model, for OvSW's `levels=`.

  Every `BinaryConv` (sign), `QuantDense` and `QuantConv` with a quantized
  kernel, found by walking the model's graph; the paths are those of
  `nnx.state(model)`, as `ovsw_jax.naming.path_name` writes them.

  >>> from flax import nnx
  >>> import ovsw_jax as ow
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.a = ow.nnx.QuantDense(4, 4, kernel_quantizer='ternary', rngs=rngs)
  ...     self.b = ow.nnx.QuantDense(4, 2, kernel_quantizer=None, rngs=rngs)
  >>> ow.nnx.kernel_quantizers(Net(nnx.Rngs(0)))
  {'a/latent_kernel': Ternary(rule='absmean', axis=None)}
  """
  found = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BinaryConv):
      q = quantizers.SIGN
    elif isinstance(node, QuantDense | QuantConv):
      q = node.kernel_quantizer
    else:
      continue
    if q is not None:
      found["/".join(str(p) for p in path) + "/" + LATENT_KERNEL] = q
  return found
