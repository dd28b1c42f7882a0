"""The flax.nnx BinaryConv and OvSW under nnx.Optimizer, against the release and linen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ovsw_jax as ow
from helpers import assert_close, load_oracle, release_float
from ovsw_jax.nnx import BinaryConv, LatentKernel

XNOR_CASES = ["xnor_conv_public_0", "xnor_conv_public_1", "xnor_conv_public_2"]


def conv_with_kernel(kernel, **kwargs):
  """An nnx BinaryConv whose latent weight is `kernel` (HWIO)."""
  kh, kw, c_in, c_out = kernel.shape
  conv = BinaryConv(c_in, c_out, (kh, kw), rngs=nnx.Rngs(0), **kwargs)
  conv.latent_kernel[...] = jnp.asarray(kernel)
  return conv


@pytest.mark.slow
@pytest.mark.parametrize("name", XNOR_CASES)
def test_nnx_binary_conv_matches_release(name):
  d = load_oracle(name)
  conv = conv_with_kernel(d["kernel"], strides=int(d["strides"]), padding=int(d["padding"]))
  x = jnp.asarray(d["x"])
  assert_close(conv(x), d["y_train"])
  grads = nnx.grad(lambda m, x: jnp.sum(m(x) * d["dy"]), argnums=(0, 1))(conv, x)
  assert_close(grads[0].latent_kernel[...], d["dkernel"])
  assert_close(grads[1], d["dx"])
  conv.eval()  # evaluation mode: no per-example normalisation
  assert_close(conv(x), d["y_eval"])
  assert_close(conv(x, deterministic=False), d["y_train"])


@pytest.mark.slow
@pytest.mark.parametrize("strides,padding,kernel_size", [
    (1, 1, (3, 3)), (2, 1, (3, 3)), (2, 0, (1, 1)), (1, "VALID", (3, 3)),
    (1, ((0, 1), (2, 0)), (2, 3))])
@pytest.mark.parametrize("train", [True, False])
def test_nnx_equals_linen_given_the_same_kernel(strides, padding, kernel_size, train):
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.randn(2, 9, 8, 4).astype(np.float32))
  kernel = rs.randn(*kernel_size, 4, 6).astype(np.float32)
  linen = ow.BinaryConv(6, kernel_size, strides=strides, padding=padding)
  expected = linen.apply({"params": {"latent_kernel": jnp.asarray(kernel)}}, x, train=train)
  conv = conv_with_kernel(kernel, strides=strides, padding=padding)
  np.testing.assert_array_equal(np.asarray(conv(x, deterministic=not train)),
                                np.asarray(expected))


def test_init_is_kaiming_normal_fan_in_under_the_shared_name():
  conv = BinaryConv(64, 128, (3, 3), rngs=nnx.Rngs(0))
  assert ow.LATENT_KERNEL == "latent_kernel" and hasattr(conv, ow.LATENT_KERNEL)
  w = np.asarray(conv.latent_kernel[...])
  assert w.shape == (3, 3, 64, 128) and w.dtype == np.float32
  # torch's kaiming_normal_(mode='fan_in'): std sqrt(2 / fan_in), untruncated.
  std = np.sqrt(2.0 / (3 * 3 * 64))
  assert abs(w.std() / std - 1) < 0.02 and abs(w.mean()) < 0.02 * std
  assert np.abs(w).max() > 3 * std  # not truncated at 2 std
  assert isinstance(conv.latent_kernel, LatentKernel)
  assert isinstance(conv.latent_kernel, nnx.Param)


@pytest.mark.slow
def test_bad_arguments_give_clear_errors():
  with pytest.raises(TypeError, match="one size per spatial axis"):
    BinaryConv(3, 8, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="out_features"):
    BinaryConv(3, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expects 3 input channels"):
    BinaryConv(3, 8, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 5)))


class TinyBinaryCNN(nnx.Module):
  """Full-precision stem and head around two binary convs, with BatchNorm."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bin1 = BinaryConv(8, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.bin2 = BinaryConv(8, 8, strides=2, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.bn(self.bin1(self.stem(x)))
    return self.head(self.bin2(h).mean(axis=(1, 2)))


def _paths_with_state(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_nnx_optimizer_trains_and_tracks_exactly_the_binary_kernels():
  model = TinyBinaryCNN(nnx.Rngs(0))
  lr = 0.05
  optimizer = nnx.Optimizer(
      model, optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4), optax.sgd(lr)),
      wrt=nnx.Param)
  # SAD's and AGS's per-weight state exists for the two binary kernels only.
  binary = {"['bin1']['latent_kernel'].value", "['bin2']['latent_kernel'].value"}
  for field in ("tracker", "prev_signs", "silent_fraction", "scaled_fraction"):
    assert _paths_with_state(optax.tree.get(optimizer.opt_state, field)) == binary, field
  x = jax.random.normal(jax.random.key(1), (32, 8, 8, 1))
  y = jnp.arange(32) % 3
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))  # not the live Variables
    optimizer.update(model, grads)
    return loss, grads, before

  losses = []
  for t in range(40):
    loss, grads, before = step(model, optimizer)
    losses.append(float(loss))
    if t == 0:
      # The full-precision parameters get plain SGD: w - lr * g, untouched by OvSW.
      for name in ("stem", "head"):
        np.testing.assert_allclose(
            np.asarray(getattr(model, name).kernel[...]),
            np.asarray(before[name]["kernel"][...] - lr * grads[name]["kernel"][...]),
            rtol=1e-6, atol=1e-7)
  assert losses[-1] < 0.7 * losses[0]
  assert int(optimizer.step[...]) == 40
  tracker = optax.tree.get(optimizer.opt_state, "tracker")
  assert float(jnp.max(tracker["bin1"]["latent_kernel"][...])) > 0  # some weights flipped


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1])
def test_nnx_optimizer_reproduces_the_release_step(case):
  # The release's AGS -> SAD -> SGD (weight decay, momentum) on one binary conv,
  # fed the release's gradients, through nnx state and the default mask.
  d = load_oracle(f"ovsw_steps_public_{case}")
  conv = conv_with_kernel(d["w"][0])
  tx = optax.chain(
      ow.ovsw(release_float(d["delta"]), release_float(d["dampen_weight"]),
              release_float(d["track_momentum"]), release_float(d["track_threshold"])),
      optax.add_decayed_weights(release_float(d["weight_decay"])),
      optax.sgd(release_float(d["lr"]), momentum=release_float(d["momentum"])))
  optimizer = nnx.Optimizer(conv, tx, wrt=nnx.Param)

  @nnx.jit
  def step(conv, optimizer, g):
    # A new tree: setting a leaf of nnx.state(conv) would set the model's own weight.
    grads = jax.tree.map(lambda _: g, nnx.state(conv, nnx.Param))
    optimizer.update(conv, grads)

  for t in range(d["w"].shape[0]):
    step(conv, optimizer, jnp.asarray(d["g_raw"][t]))
    expected = d["w_next"][t]
    np.testing.assert_allclose(np.asarray(conv.latent_kernel[...]), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max(), err_msg=f"step {t}")


def test_latent_kernel_filter_selects_the_binary_kernels_alone():
  model = TinyBinaryCNN(nnx.Rngs(0))
  binary = nnx.state(model, LatentKernel)
  assert _paths_with_state(binary) == {"['bin1']['latent_kernel'].value",
                                       "['bin2']['latent_kernel'].value"}
  # An optimizer of their own: OvSW on every leaf it is given (no mask needed).
  optimizer = nnx.Optimizer(model, optax.chain(ow.ovsw(mask=None), optax.sgd(0.1)),
                            wrt=LatentKernel)
  assert _paths_with_state(optax.tree.get(optimizer.opt_state, "tracker")) == \
      _paths_with_state(binary)
