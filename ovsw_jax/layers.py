"""The release's binary convolution (docs/method.md §5), quantized Dense and Conv layers.

`BinaryConv` is the release's layer. `QuantDense` and `QuantConv` are flax's
`nn.Dense` and `nn.Conv` with a kernel and an input quantizer (larq's
layers): binary, ternary or k-bit kernels, binary or int8 inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

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


# --- quantized Dense and Conv: flax's layers with a kernel (and input) quantizer ------------


def _quantize(quantizer, x):
  q = quantizers.get(quantizer)
  return x if q is None else q(x)


def quant_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                kernel_quantizer="sign", input_quantizer=None, precision=None) -> jax.Array:
  """`input_quantizer(x) @ kernel_quantizer(kernel) + bias` over the last axis of `x`.

  `kernel` is `(in, out)` as flax's; the quantizers are names or
  `quantizers.Quantizer`s (None: full precision). The result has `x`'s dtype.
  """
  xq = _quantize(input_quantizer, x)
  kq = _quantize(kernel_quantizer, kernel).astype(x.dtype)
  y = jax.lax.dot_general(xq, kq, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
  return y if bias is None else y + bias.astype(y.dtype)


def _per_axis(value, spatial: int, name: str) -> tuple[int, ...]:
  if value is None:
    return (1,) * spatial
  if isinstance(value, int):
    return (value,) * spatial
  value = tuple(int(v) for v in value)
  if len(value) != spatial:
    raise ValueError(f"{name}={value}: give an int or {spatial} ints, one per spatial axis.")
  return value


def quant_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
               strides=1, padding="SAME", input_dilation=1, kernel_dilation=1,
               feature_group_count: int = 1, kernel_quantizer="sign", input_quantizer=None,
               precision=None) -> jax.Array:
  """flax's convolution (channels last, kernel `spatial + (in / groups, out)`), quantized.

  `padding` as flax's `nn.Conv`: 'SAME', 'VALID', an int, or an int or
  `(low, high)` pair per spatial axis; zeros are padded after the input's
  quantization, as a binary network's deployment pads.
  """
  spatial = kernel.ndim - 2
  if not 1 <= spatial <= 3 or x.ndim != kernel.ndim:
    raise ValueError(
        f"quant_conv: x of shape {x.shape} and kernel of shape {kernel.shape}: give a batched "
        "channels-last input of rank 3 to 5 and a kernel of the same rank.")
  if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
    raise ValueError(f"padding={padding!r}: QuantConv supports 'SAME', 'VALID', ints and "
                     "(low, high) pairs.")
  pad = nn.linear.canonicalize_padding(padding, spatial)
  xq = _quantize(input_quantizer, x)
  kq = _quantize(kernel_quantizer, kernel).astype(x.dtype)
  sp = "DHW"[3 - spatial:]
  dn = jax.lax.conv_dimension_numbers(xq.shape, kq.shape,
                                      ("N" + sp + "C", sp + "IO", "N" + sp + "C"))
  y = jax.lax.conv_general_dilated(
      xq, kq, window_strides=_per_axis(strides, spatial, "strides"),
      padding=pad.upper() if isinstance(pad, str) else pad,
      lhs_dilation=_per_axis(input_dilation, spatial, "input_dilation"),
      rhs_dilation=_per_axis(kernel_dilation, spatial, "kernel_dilation"),
      dimension_numbers=dn, feature_group_count=feature_group_count, precision=precision)
  return y if bias is None else y + bias.astype(y.dtype)


def kernel_param_name(kernel_quantizer) -> str:
  """`latent_kernel` for a quantized kernel (OvSW's default mask selects it), else `kernel`."""
  return "kernel" if quantizers.get(kernel_quantizer) is None else LATENT_KERNEL


def _kernel_and_bias(layer: nn.Module, x: jax.Array, shape: tuple[int, ...]):
  """A linen quantized layer's kernel (`kernel_param_name`) and bias, promoted with `x`."""
  kernel = layer.param(kernel_param_name(layer.kernel_quantizer), layer.kernel_init, shape,
                       layer.param_dtype)
  bias = (layer.param("bias", layer.bias_init, (layer.features,), layer.param_dtype)
          if layer.use_bias else None)
  return nn.dtypes.promote_dtype(x, kernel, bias, dtype=layer.dtype)


class QuantDense(nn.Module):
  """`nn.Dense` with a quantized kernel and, optionally, quantized inputs (larq's `QuantDense`).

  Fields as `flax.linen.Dense`, plus `kernel_quantizer` (default 'sign') and
  `input_quantizer` (default None, as larq's: only the kernel is quantized):
  names ('sign', 'approx_sign', 'ternary', 'twn', 'uniform4', 'int8', ...) or
  `ovsw_jax.quantizers.Quantizer`s. The latent weight is the parameter
  `latent_kernel`, `(in, out)`, so `ovsw_jax.ovsw`'s default mask finds it;
  tell OvSW its quantizer with `levels=ovsw_jax.kernel_quantizers(model, x)`.

  >>> import jax, jax.numpy as jnp
  >>> layer = QuantDense(4, kernel_quantizer='ternary')
  >>> params = layer.init(jax.random.key(0), jnp.ones((2, 3)))['params']
  >>> sorted(params), layer.apply({'params': params}, jnp.ones((2, 3))).shape
  (['bias', 'latent_kernel'], (2, 4))
  """
  features: int
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  precision: Any = None
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  kernel_quantizer: Any = "sign"
  input_quantizer: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel, bias = _kernel_and_bias(self, x, (x.shape[-1], self.features))
    return quant_dense(x, kernel, bias, kernel_quantizer=self.kernel_quantizer,
                       input_quantizer=self.input_quantizer, precision=self.precision)


class QuantConv(nn.Module):
  """`nn.Conv` (1-D, 2-D or 3-D, channels last) with quantized kernel and inputs.

  Fields as `flax.linen.Conv` (`kernel_size` one int per spatial axis), plus
  `kernel_quantizer` and `input_quantizer` as for `QuantDense`; the latent
  weight is `latent_kernel`, `kernel_size + (in / groups, out)`.
  """
  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] = 1
  kernel_dilation: int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  precision: Any = None
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
  kernel_quantizer: Any = "sign"
  input_quantizer: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if isinstance(self.kernel_size, int):
      raise TypeError(f"QuantConv kernel_size={self.kernel_size}: give one size per spatial "
                      f"axis, e.g. ({self.kernel_size},) or ({self.kernel_size}, "
                      f"{self.kernel_size}), as flax's Conv.")
    groups = self.feature_group_count
    if x.shape[-1] % groups:
      raise ValueError(f"QuantConv: {x.shape[-1]} input channels are not divisible by "
                       f"feature_group_count={groups}.")
    shape = tuple(self.kernel_size) + (x.shape[-1] // groups, self.features)
    x, kernel, bias = _kernel_and_bias(self, x, shape)
    return quant_conv(x, kernel, bias, strides=self.strides, padding=self.padding,
                      input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
                      feature_group_count=groups, kernel_quantizer=self.kernel_quantizer,
                      input_quantizer=self.input_quantizer, precision=self.precision)


def kernel_quantizer_of(module: Any) -> Any:
  """The kernel quantizer of a linen quantized layer, None for other modules (and float kernels)."""
  if isinstance(module, BinaryConv):
    return quantizers.SIGN
  if isinstance(module, QuantDense | QuantConv):
    return quantizers.get(module.kernel_quantizer)
  return None


def kernel_quantizers(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
  """`{latent kernel path: its quantizer}` of a linen model, for OvSW's `levels=`.

  Runs `model.init(key, *args, **kwargs)` abstractly (`jax.eval_shape`, no
  compute) and records every quantized layer it calls (`BinaryConv`: sign).

  >>> import jax.numpy as jnp, flax.linen as nn
  >>> model = nn.Sequential([QuantDense(8, kernel_quantizer='ternary'), QuantDense(2)])
  >>> kernel_quantizers(model, jnp.ones((1, 4)))
  {'layers_0/latent_kernel': Ternary(rule='absmean', axis=None),
   'layers_1/latent_kernel': Sign(clip_value=None)}
  """
  found: dict[str, Any] = {}

  def record(next_fun, call_args, call_kwargs, context):
    q = kernel_quantizer_of(context.module)
    if q is not None and context.method_name == "__call__":
      found["/".join(str(p) for p in context.module.path) + "/" + LATENT_KERNEL] = q
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return found
