"""Inference of an exported network: binary convs as exact integer arithmetic.

The architecture is the model's own Flax code (named in the header), run
under a method interceptor that replaces each `BinaryConv` with an integer
convolution of the packed signs and each BatchNorm with its folded affine;
full-precision layers run unchanged from the stored float parameters.

Binary conv backends (`backend=`), all exact on -1/0/+1 operands:
  "int8"    int8 signs, int32 accumulation (`lax.conv_general_dilated` with
            `preferred_element_type=int32`); XLA's CPU int8 kernel makes it
            the fastest for wide layers (64 input channels and more).
  "xnor"    XOR + population count on channel-packed uint32 words
            (`xnor_popcount_conv`); the fastest for narrow layers (up to 32
            input channels, one word per pixel). A kernel with an exactly-zero
            weight is not 1-bit: such a layer runs "int8" instead.
  "auto"    the default: "xnor" up to 32 input channels, else "int8" (the
            measured crossover on the CPU of docs/export.md).
  "float32" the same product in float32 (exact: sums of +-1 stay far below
            2**24); kept as the reference point of the benchmark.
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

from ovsw_jax import layers
from ovsw_jax.export.build import unpack_kernel
from ovsw_jax.export.network import ExportedNetwork
from ovsw_jax.layer_calls import module_kind, module_path

BACKENDS = ("auto", "int8", "xnor", "float32")
# "auto" takes the XOR + popcount path up to this many input channels.
XNOR_MAX_CHANNELS = 32
_DN = ("NHWC", "HWIO", "NHWC")


def _window(module) -> tuple[tuple[int, int], Any]:
  strides = module.strides
  if isinstance(strides, int):
    strides = (strides,) * len(module.kernel_size)
  return tuple(strides), layers._lax_padding(module.padding, len(module.kernel_size))  # pylint: disable=protected-access


# XLA's CPU int8 convolution ran 5-20x slower when the output channels were not
# a multiple of 32 (ResNet-20's 16-channel stage; measured, docs/export.md):
# zero output channels up to the next multiple cost little and are sliced off.
INT8_CHANNEL_MULTIPLE = 32


def int8_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """Exact int32 conv of int8 sign activations with an int8 sign kernel."""
  out = kernel.shape[-1]
  extra = -out % INT8_CHANNEL_MULTIPLE
  if extra:
    kernel = jnp.pad(kernel, [(0, 0)] * (kernel.ndim - 1) + [(0, extra)])
  y = jax.lax.conv_general_dilated(
      signs, kernel, window_strides=strides, padding=padding, dimension_numbers=_DN,
      preferred_element_type=jnp.int32)
  return y[..., :out] if extra else y


def float32_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """The same product in float32, rounded back to int32 (exact)."""
  y = jax.lax.conv_general_dilated(
      signs.astype(jnp.float32), kernel.astype(jnp.float32), window_strides=strides,
      padding=padding, dimension_numbers=_DN)
  return jnp.round(y).astype(jnp.int32)


def pack_channels(bits: jax.Array) -> jax.Array:
  """Packs a boolean `(..., C)` into uint32 words `(..., ceil(C / 32))`.

  Bit i of word j holds channel 32j+i.
  """
  c = bits.shape[-1]
  words = -(-c // 32)
  bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, words * 32 - c)])
  bits = bits.reshape(bits.shape[:-1] + (words, 32)).astype(jnp.uint32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def xnor_popcount_conv(signs: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """Exact conv of -1/0/+1 activations with a +-1 kernel by XOR and population count.

  Channels are packed 32 to a uint32 word in two planes: `pos` (sign > 0) and
  `nz` (sign != 0). For one output position and channel,
  `dot = popcount(nz) - 2 * popcount((pos XOR w_pos) AND nz)`, summed over
  the kernel taps: positions where the activation is 0 (sign(0) = 0, the zero
  border, the channels padding the last word) have `nz = 0` and add nothing,
  exactly as in the simulation. The kernel must have no zero weight (the
  predictor routes such layers to `int8_conv`).
  """
  kh, kw, _, _ = kernel.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(signs.shape[1:3], (kh, kw), strides, padding)
  (pt, pb), (pl, pr) = padding
  n, h, w, _ = signs.shape
  pad = ((0, 0), (pt, pb), (pl, pr), (0, 0))
  pos = pack_channels(jnp.pad(signs > 0, pad))
  nz = pack_channels(jnp.pad(signs != 0, pad))
  wk = pack_channels(jnp.moveaxis(kernel > 0, 2, 3))  # (kh, kw, O, words)
  sh, sw = strides
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  mismatches = jnp.zeros((n, ho, wo, kernel.shape[-1]), jnp.int32)
  count = jnp.zeros((n, ho, wo, 1), jnp.int32)
  window = lambda x, i, j: x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
  for i in range(kh):
    for j in range(kw):
      p, m = window(pos, i, j)[..., None, :], window(nz, i, j)[..., None, :]
      differ = jax.lax.population_count((p ^ wk[i, j]) & m)
      mismatches = mismatches + jnp.sum(differ, axis=-1, dtype=jnp.int32)
      count = count + jnp.sum(jax.lax.population_count(m), axis=-1, dtype=jnp.int32)
  return count - 2 * mismatches


_CONVS = {"int8": int8_conv, "float32": float32_conv, "xnor": xnor_popcount_conv}


def choose_conv(backend: str, in_channels: int, has_zero_weights: bool):
  """The conv function one binary layer runs under `backend` (see the module docstring)."""
  if backend == "auto":
    backend = "xnor" if in_channels <= XNOR_MAX_CHANNELS else "int8"
  if backend == "xnor" and has_zero_weights:
    backend = "int8"
  return _CONVS[backend]


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


def _interceptor(arrays: Mapping[str, Any], backend: str, zero_kernels: frozenset):

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
    conv = choose_conv(backend, x.shape[-1], path in zero_kernels)
    acc = conv(jnp.sign(x).astype(jnp.int8), arrays["kernels"][path], strides, padding)
    y = acc.astype(jnp.float32)
    if path in arrays["alpha"]:
      y = y * arrays["alpha"][path]
    return y

  return intercept


def zero_kernels(net: ExportedNetwork) -> frozenset:
  """Paths of the binary layers with an exactly-zero weight (a `zeros` plane)."""
  return frozenset(p for p, e in net.payload["binary"].items() if "zeros" in e)


def forward(model: nn.Module, arrays: Mapping[str, Any], images: jax.Array,
            backend: str = "auto", zero_kernels: frozenset = frozenset()) -> jax.Array:
  """Logits of the exported network (pure; jit it, or use `predictor`).

  `zero_kernels`: the layers whose kernel has zero weights (they never run "xnor").
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}.")
  with nn.intercept_methods(_interceptor(arrays, backend, zero_kernels)):
    return model.apply({"params": arrays["float"]}, images, train=False)


def predictor(net: ExportedNetwork, backend: str = "auto"):
  """A jitted `images -> float32 logits` for `net` (arrays passed as arguments, not constants)."""
  model = net.model()
  arrays = device_arrays(net)
  fn = jax.jit(functools.partial(forward, model, backend=backend,
                                 zero_kernels=zero_kernels(net)))
  return lambda images: fn(arrays, jnp.asarray(images, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _simulate(model, variables, images):
  return model.apply(variables, images, train=False)


def simulate(model: nn.Module, params, batch_stats, images) -> jax.Array:
  """The float simulation the export must match: the trained model, train=False (jitted)."""
  return _simulate(model, {"params": params, "batch_stats": batch_stats},
                   jnp.asarray(images, jnp.float32))
