"""Inference of an exported network: binary convs as exact integer arithmetic.

The architecture is the model's own Flax code (named in the header), run
under a method interceptor that replaces each `BinaryConv` with an integer
convolution of the packed signs and each BatchNorm with its folded affine;
full-precision layers run unchanged from the stored float parameters.

Binary conv backends (`backend=`), all exact on -1/0/+1 operands:
  "int8"    int8 signs, int32 accumulation (`lax.conv_general_dilated` with
            `preferred_element_type=int32`). The default: fastest on the CPUs
            measured (docs/export.md), where XLA hands it to an int8 GEMM kernel.
  "float32" the same product in float32 (exact: sums of +-1 stay far below 2**24).
  "xnor"    XOR + population count on channel-packed uint32 words (see
            `xnor_popcount_conv`); 1-bit operands only, so it refuses kernels
            with zero weights. Slower on CPU: XLA has no GEMM-like kernel for it.
A packed-bit Pallas kernel for GPU/TPU is future work.

Zero padding is that of the release: the padded border holds 0 (not -1), so
it contributes nothing to the sum, exactly as the simulation pads its signs.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovsw_jax import layers
from ovsw_jax.export.build import unpack_kernel
from ovsw_jax.export.network import ExportedNetwork
from ovsw_jax.layer_calls import module_kind, module_path

BACKENDS = ("int8", "float32", "xnor")
_DN = ("NHWC", "HWIO", "NHWC")


def _window(module) -> tuple[tuple[int, int], Any]:
  strides = module.strides
  if isinstance(strides, int):
    strides = (strides,) * len(module.kernel_size)
  return tuple(strides), layers._lax_padding(module.padding, len(module.kernel_size))  # pylint: disable=protected-access


def int8_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """Exact int32 conv of int8 sign activations with an int8 sign kernel."""
  return jax.lax.conv_general_dilated(
      signs, kernel, window_strides=strides, padding=padding, dimension_numbers=_DN,
      preferred_element_type=jnp.int32)


def float32_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """The same product in float32, rounded back to int32 (exact)."""
  y = jax.lax.conv_general_dilated(
      signs.astype(jnp.float32), kernel.astype(jnp.float32), window_strides=strides,
      padding=padding, dimension_numbers=_DN)
  return jnp.round(y).astype(jnp.int32)


def pack_channels(bits: jax.Array) -> jax.Array:
  """Packs a boolean `(..., C)` into uint32 words `(..., ceil(C / 32))`, bit i of word j = channel 32j+i."""
  c = bits.shape[-1]
  words = -(-c // 32)
  bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, words * 32 - c)])
  bits = bits.reshape(bits.shape[:-1] + (words, 32)).astype(jnp.uint32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def xnor_popcount_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """Exact conv of +-1 operands by XOR and population count on packed words.

  For +-1 vectors of length K, `dot = K - 2 * popcount(a XOR w)` (bit 1 = +1).
  Channels are packed 32 to a uint32 word (padding channels are 0 in both
  operands, so they never differ). The spatial zero border cannot be a bit, so
  it is packed as -1 and its contribution, `-sum(w)` over the border taps, is
  added back: a one-channel conv of the border mask with the kernel summed
  over input channels. Zero activations are not representable either: callers
  pass `sign(x)` with no exact zeros (the int8 path has no such limit).
  """
  kh, kw, c, _ = kernel.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(signs.shape[1:3], (kh, kw), strides, padding)
  (pt, pb), (pl, pr) = padding
  n, h, w, _ = signs.shape
  a = pack_channels(jnp.pad(signs > 0, ((0, 0), (pt, pb), (pl, pr), (0, 0))))
  wk = pack_channels(jnp.moveaxis(kernel > 0, 2, 3))  # (kh, kw, O, words)
  sh, sw = strides
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  mismatches = jnp.zeros((n, ho, wo, kernel.shape[-1]), jnp.int32)
  for i in range(kh):
    for j in range(kw):
      patch = a[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
      x = jax.lax.population_count(patch[..., None, :] ^ wk[i, j])
      mismatches = mismatches + jnp.sum(x, axis=-1, dtype=jnp.int32)
  dot = kh * kw * c - 2 * mismatches
  border = jnp.pad(jnp.zeros((1, h, w, 1), jnp.float32), ((0, 0), (pt, pb), (pl, pr), (0, 0)),
                   constant_values=1.0)
  kernel_sum = jnp.sum(kernel, axis=2, keepdims=True, dtype=jnp.float32)
  correction = jax.lax.conv_general_dilated(  # small integers: exact in float32
      border, kernel_sum, window_strides=strides, padding="VALID", dimension_numbers=_DN)
  return dot + jnp.round(correction).astype(jnp.int32)


_CONVS = {"int8": int8_conv, "float32": float32_conv, "xnor": xnor_popcount_conv}


def device_arrays(net: ExportedNetwork) -> dict[str, Any]:
  """The arrays inference reads: int8 kernels, alphas, affines, float params."""
  binary = net.payload["binary"]
  return {
      "kernels": {p: jnp.asarray(unpack_kernel(e)) for p, e in binary.items()},
      "alpha": {p: jnp.asarray(e["alpha"]) for p, e in binary.items()
                if not e["folded_into"]},
      "affine": jax.tree.map(jnp.asarray, net.payload["affine"]),
      "float": jax.tree.map(jnp.asarray, net.payload["float"]),
  }


def _interceptor(arrays: Mapping[str, Any], backend: str):
  conv = _CONVS[backend]

  def intercept(next_fun, args, kwargs, context):
    kind = module_kind(context.module)
    if context.method_name != "__call__" or kind not in ("binary_conv", "batch_norm"):
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    x = args[0]
    if kind == "batch_norm":
      a = arrays["affine"][path]
      return x.astype(jnp.float32) * a["scale"] + a["shift"]
    strides, padding = _window(context.module)
    acc = conv(jnp.sign(x).astype(jnp.int8), arrays["kernels"][path], strides, padding)
    y = acc.astype(jnp.float32)
    if path in arrays["alpha"]:
      y = y * arrays["alpha"][path]
    return y

  return intercept


def forward(model: nn.Module, arrays: Mapping[str, Any], images: jax.Array,
            backend: str = "int8") -> jax.Array:
  """Logits of the exported network (pure; jit it, or use `predictor`)."""
  if backend not in _CONVS:
    raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}.")
  with nn.intercept_methods(_interceptor(arrays, backend)):
    return model.apply({"params": arrays["float"]}, images, train=False)


def predictor(net: ExportedNetwork, backend: str = "int8"):
  """A jitted `images -> float32 logits` for `net` (arrays passed as arguments, not constants)."""
  if backend == "xnor" and any("zeros" in e for e in net.payload["binary"].values()):
    raise ValueError("backend='xnor' needs 1-bit kernels, this export has zero weights: "
                     "use backend='int8'.")
  model = net.model()
  arrays = device_arrays(net)
  fn = jax.jit(functools.partial(forward, model, backend=backend))
  return lambda images: fn(arrays, jnp.asarray(images, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _simulate(model, variables, images):
  return model.apply(variables, images, train=False)


def simulate(model: nn.Module, params, batch_stats, images) -> jax.Array:
  """The float simulation the export must match: the trained model, train=False (jitted)."""
  return _simulate(model, {"params": params, "batch_stats": batch_stats},
                   jnp.asarray(images, jnp.float32))
