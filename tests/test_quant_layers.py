"""QuantDense and QuantConv (linen and nnx) against flax's own layers fed NumPy-quantized
kernels, and the quantizers OvSW reads off a model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ovsw_jax as ow
from test_multilevel import ref_uniform

RNG = np.random.default_rng(1)


def np_quantize(kernel, name):
  """A kernel quantized by NumPy formulas (values, not the code under test)."""
  k = np.asarray(kernel, np.float64)
  if name == "sign":
    return np.sign(k)
  if name == "ternary":
    levels, scale = ref_uniform(k, 2, "absmean", None)
    return levels * scale
  if name == "uniform4":
    levels, scale = ref_uniform(k, 4, "absmax", None)
    return levels * scale
  raise AssertionError(name)


@pytest.mark.parametrize("name", ["sign", "ternary", "uniform4"])
def test_quant_dense_is_flax_dense_with_the_quantized_kernel(name):
  x = jnp.asarray(RNG.normal(size=(5, 7)), jnp.float32)
  layer = ow.QuantDense(3, kernel_quantizer=name)
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"latent_kernel", "bias"}
  params = {"latent_kernel": params["latent_kernel"], "bias": jnp.asarray(RNG.normal(size=3))}
  ref = nn.Dense(3).apply({"params": {"kernel": np_quantize(params["latent_kernel"], name),
                                      "bias": params["bias"]}}, x)
  np.testing.assert_allclose(layer.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)


def test_input_quantizer_and_float_kernel():
  x = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32)
  layer = ow.QuantDense(2, kernel_quantizer=None, input_quantizer="approx_sign", use_bias=False)
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"kernel"}  # a float kernel is not a latent one: OvSW's mask skips it
  want = np.sign(np.asarray(x)) @ np.asarray(params["kernel"], np.float64)
  np.testing.assert_allclose(layer.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda x: layer.apply({"params": params}, x).sum())(x)
  # ApproxSign's gradient: 2 - 2|x| inside [-1, 1], times the kernel's row sums.
  want = np.maximum(0, 2 - 2 * np.abs(np.asarray(x))) * np.asarray(params["kernel"]).sum(1)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial,kwargs,name", [
    (1, dict(kernel_size=(3,), strides=2, padding="SAME"), "ternary"),
    (2, dict(kernel_size=(3, 3), strides=1, padding=1, kernel_dilation=2), "sign"),
    (2, dict(kernel_size=(2, 2), padding="VALID", feature_group_count=2), "ternary"),
])
def test_quant_conv_is_flax_conv_with_the_quantized_kernel(spatial, kwargs, name):
  x = jnp.asarray(RNG.normal(size=(2,) + (9,) * spatial + (4,)), jnp.float32)
  layer = ow.QuantConv(6, kernel_quantizer=name, input_quantizer="sign", **kwargs)
  params = layer.init(jax.random.key(0), x)["params"]
  ref = nn.Conv(6, **kwargs).apply(
      {"params": {"kernel": np_quantize(params["latent_kernel"], name), "bias": params["bias"]}},
      np.sign(np.asarray(x)))
  got = layer.apply({"params": params}, x)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_nnx_layers_compute_what_the_linen_layers_compute():
  x = jnp.asarray(RNG.normal(size=(2, 8, 8, 3)), jnp.float32)
  conv = ow.nnx.QuantConv(3, 5, (3, 3), strides=2, kernel_quantizer="uniform4",
                          input_quantizer="int8", rngs=nnx.Rngs(0))
  linen = ow.QuantConv(5, (3, 3), strides=2, kernel_quantizer="uniform4", input_quantizer="int8")
  params = {"latent_kernel": conv.latent_kernel[...], "bias": conv.bias[...]}
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(conv, x),
                                jax.jit(linen.apply)({"params": params}, x))
  dense = ow.nnx.QuantDense(3, 4, kernel_quantizer="twn", rngs=nnx.Rngs(1))
  assert isinstance(dense.latent_kernel, ow.nnx.LatentKernel)
  params = {"latent_kernel": dense.latent_kernel[...], "bias": dense.bias[...]}
  np.testing.assert_array_equal(
      nnx.jit(lambda m, x: m(x))(dense, x),
      jax.jit(ow.QuantDense(4, kernel_quantizer="twn").apply)({"params": params}, x))
  with pytest.raises(ValueError, match="quantizer 'ternery' is unknown"):
    ow.nnx.QuantDense(3, 4, kernel_quantizer="ternery", rngs=nnx.Rngs(0))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = ow.QuantDense(16, kernel_quantizer="ternary", name="ternary")(x)
    x = ow.QuantDense(16, kernel_quantizer="uniform4", name="four_bit")(nn.relu(x))
    x = ow.QuantDense(16, name="binary")(nn.relu(x))
    return nn.Dense(2, name="head")(x)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.ternary = ow.nnx.QuantDense(4, 16, kernel_quantizer="ternary", rngs=rngs)
    self.four_bit = ow.nnx.QuantDense(16, 16, kernel_quantizer="uniform4", rngs=rngs)
    self.binary = ow.nnx.QuantDense(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    x = self.four_bit(nnx.relu(self.ternary(x)))
    return self.head(self.binary(nnx.relu(x)))


WANT = {"ternary/latent_kernel": ow.quantizers.Ternary(),
        "four_bit/latent_kernel": ow.quantizers.Uniform(4),
        "binary/latent_kernel": ow.quantizers.Sign()}


def test_kernel_quantizers_are_read_off_linen_and_nnx_models():
  assert ow.kernel_quantizers(LinenNet(), jnp.ones((1, 4))) == WANT
  assert ow.nnx.kernel_quantizers(NnxNet(nnx.Rngs(0))) == WANT


class CostNet(nn.Module):
  """One layer of each cost kind: integer, binary, float-input quantized, float."""

  @nn.compact
  def __call__(self, x, train=True):
    x = ow.QuantConv(8, (3, 3), padding="VALID", kernel_quantizer="ternary",
                     input_quantizer="int8", name="ternary_int8")(x)
    x = ow.QuantConv(8, (3, 3), padding="VALID", use_bias=False, input_quantizer="sign",
                     name="binary")(x)
    x = ow.QuantDense(4, kernel_quantizer="uniform4", name="four_bit_float_in")(x.reshape(1, -1))
    return nn.Dense(2, name="head")(x)


def test_the_cost_summary_counts_bits_memory_and_macs_of_quantized_layers():
  from ovsw_jax import summary
  s = summary.summarize(CostNet(), (7, 7, 3))
  rows = {row.path: row for row in s.layers}
  t, b, f, h = (rows[k] for k in ("ternary_int8", "binary", "four_bit_float_in", "head"))
  # ternary 3x3x3->8 on 7x7 VALID: 5x5 outputs; 216 weights at 2 bits + 8 biases in float32.
  assert (t.weight_bits, t.activation_bits) == (pytest.approx(np.log2(3)), 8)
  assert (t.integer_macs, t.binary_macs, t.float_macs) == (25 * 8 * 27, 0, 0)
  assert t.deployed_bytes == 216 * 2 / 8 + 8 * 4
  # binary 3x3x8->8 on 5x5: 3x3 outputs, 576 weights at 1 bit, no bias.
  assert (b.weight_bits, b.activation_bits, b.deployed_bytes) == (1, 1, 576 / 8)
  assert (b.binary_macs, b.integer_macs, b.float_macs) == (9 * 8 * 72, 0, 0)
  # 4-bit kernel on float inputs: compact weights, float MACs.
  assert (f.weight_bits, f.activation_bits, f.deployed_bytes) == (4, 32, 72 * 4 * 4 / 8 + 16)
  assert (f.float_macs, f.integer_macs) == (72 * 4, 0)
  assert h.float_macs == 8 and s.binary_params == 576
  assert s.ops == b.binary_macs / 64 + t.integer_macs + f.float_macs + h.float_macs
  table = summary.format_totals(s)
  assert "| integer MACs | 5.40k | 0 | |" in table and "integer MACs + FLOPs" in table
  assert "1.58/8" in summary.format_layers(s)
