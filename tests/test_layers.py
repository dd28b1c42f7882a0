"""The binary ("xnor") convolution and BinaryConv, against the release's vectors and numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ovsw_jax as ow
from helpers import assert_close, load_oracle

ORACLE_CASES = ["xnor_conv_public_0", "xnor_conv_public_1", "xnor_conv_public_2"]


# ---------------------------------------------------------------------------
# An independent numpy model of docs/method.md §5 (float64, explicit loops over taps).


def _pad_pairs(padding, kernel_hw):
  if isinstance(padding, int):
    return [(padding, padding)] * 2
  return [tuple(p) for p in padding]


def xnor_ref(x, kernel, strides, padding, training):
  """Returns y and a function dy -> (dx, dkernel), all in float64."""
  x = np.asarray(x, np.float64)
  k = np.asarray(kernel, np.float64)
  n = x.shape[0]
  if training:
    var = x.reshape(n, -1).var(axis=1, ddof=1)
    std = np.sqrt(var + 1e-5).reshape(n, 1, 1, 1)
  else:
    std = np.ones((n, 1, 1, 1))
  xs = x / std
  a = np.sign(xs)
  wb = np.sign(k)
  flat = k.reshape(-1, k.shape[-1])
  alpha = np.mean(np.abs((flat - flat.mean(0)) / np.sqrt(flat.var(0, ddof=1) + 1e-5)), axis=0)
  (pt, pb), (pl, pr) = _pad_pairs(padding, k.shape[:2])
  sh, sw = (strides, strides) if isinstance(strides, int) else strides
  ap = np.pad(a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = k.shape[:2]
  ho = (ap.shape[1] - kh) // sh + 1
  wo = (ap.shape[2] - kw) // sw + 1
  y = np.zeros((n, ho, wo, k.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = ap[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
      y += np.einsum("nhwc,co->nhwo", patch, wb[i, j])
  y = y * alpha

  def backward(dy):
    dys = np.asarray(dy, np.float64) * alpha
    dap = np.zeros_like(ap)
    dwb = np.zeros_like(wb)
    for i in range(kh):
      for j in range(kw):
        sl = (slice(None), slice(i, i + sh * (ho - 1) + 1, sh), slice(j, j + sw * (wo - 1) + 1, sw))
        dap[sl] += np.einsum("nhwo,co->nhwc", dys, wb[i, j])
        dwb[i, j] = np.einsum("nhwc,nhwo->co", ap[sl], dys)
    da = dap[:, pt:pt + a.shape[1], pl:pl + a.shape[2], :]
    dx = da * np.maximum(0.0, 2.0 - 2.0 * np.abs(xs)) / std
    return dx, dwb  # ste_sign is the identity backward; alpha has no gradient

  return y, backward


def run_xnor(x, kernel, strides, padding, training, dy=None, jit=False):
  f = lambda x_, k_: ow.xnor_conv(x_, k_, strides=strides, padding=padding, training=training)
  if jit:
    f = jax.jit(f)
  y, pull = jax.vjp(f, jnp.asarray(x), jnp.asarray(kernel))
  if dy is None:
    return y
  dx, dk = pull(jnp.asarray(dy, y.dtype))
  return y, dx, dk


# ---------------------------------------------------------------------------
# The release's vectors.


@pytest.mark.slow
@pytest.mark.parametrize("name", ORACLE_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_xnor_conv_matches_oracle(name, jit):
  d = load_oracle(name)
  assert np.any(d["x"] == 0), "the oracle input should hold exact zeros"
  s, p = int(d["strides"]), int(d["padding"])
  y, dx, dk = run_xnor(d["x"], d["kernel"], s, p, True, d["dy"], jit=jit)
  assert y.dtype == jnp.float32
  assert_close(y, d["y_train"])
  assert_close(dx, d["dx"])
  assert_close(dk, d["dkernel"])
  y_eval = run_xnor(d["x"], d["kernel"], s, p, False, jit=jit)
  assert_close(y_eval, d["y_eval"])


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_numpy_reference_matches_oracle(name):
  # Guards the numpy model used by the tests below.
  d = load_oracle(name)
  s, p = int(d["strides"]), int(d["padding"])
  y, back = xnor_ref(d["x"], d["kernel"], s, p, True)
  dx, dk = back(d["dy"])
  assert_close(y, d["y_train"])
  assert_close(dx, d["dx"])
  assert_close(dk, d["dkernel"])
  assert_close(xnor_ref(d["x"], d["kernel"], s, p, False)[0], d["y_eval"])


@pytest.mark.parametrize("name", ORACLE_CASES)
def test_binary_conv_module_matches_oracle(name):
  d = load_oracle(name)
  kh, kw, _, c_out = d["kernel"].shape
  s, p = int(d["strides"]), int(d["padding"])
  module = ow.BinaryConv(features=c_out, kernel_size=(kh, kw), strides=s, padding=p)
  variables = {"params": {"latent_kernel": jnp.asarray(d["kernel"])}}
  x = jnp.asarray(d["x"])
  assert_close(module.apply(variables, x, train=True), d["y_train"])
  assert_close(module.apply(variables, x, train=False), d["y_eval"])
  grad = jax.grad(
      lambda v: jnp.sum(module.apply(v, x, train=True) * d["dy"]))(variables)
  assert_close(grad["params"]["latent_kernel"], d["dkernel"])


# ---------------------------------------------------------------------------
# Numpy reference on random data: strides, asymmetric padding, zeros in x and w.


def _random_case(seed, n=2, hw=(7, 6), c_in=3, k=(3, 3), c_out=5):
  rs = np.random.RandomState(seed)
  x = rs.randn(n, *hw, c_in).astype(np.float32)
  x.reshape(-1)[rs.choice(x.size, 5, replace=False)] = 0.0
  w = (rs.randn(*k, c_in, c_out) * 0.1).astype(np.float32)
  w.reshape(-1)[rs.choice(w.size, 3, replace=False)] = 0.0
  return x, w, rs


@pytest.mark.slow
@pytest.mark.parametrize("strides,padding", [
    (1, 1), (2, 1), ((1, 2), 0), (1, ((0, 1), (2, 1))), (2, ((1, 0), (0, 1))), (1, "VALID"),
])
@pytest.mark.parametrize("training", [True, False])
def test_xnor_conv_matches_numpy(strides, padding, training):
  x, w, rs = _random_case(7)
  ref_pad = 0 if padding == "VALID" else padding
  y_ref, back = xnor_ref(x, w, strides, ref_pad, training)
  dy = rs.randn(*y_ref.shape).astype(np.float32)
  y, dx, dk = run_xnor(x, w, strides, padding, training, dy)
  assert y.shape == y_ref.shape
  dx_ref, dk_ref = back(dy)
  assert_close(y, y_ref)
  assert_close(dx, dx_ref)
  assert_close(dk, dk_ref)
  if not training:
    # Eval mode has no normalisation: ApproxSign sees x itself.
    assert np.any(np.abs(x) >= 1.0) and np.any((np.abs(x) > 0) & (np.abs(x) < 1.0))


def test_zero_weight_binarises_to_zero():
  # sign(0) = 0 for weights: a zero tap contributes nothing.
  x = jnp.ones((1, 1, 1, 2))
  w = jnp.asarray([[[[0.0], [1.0]]]])  # (1, 1, 2, 1)
  y = ow.xnor_conv(x, w, padding=0, training=False)
  alpha = np.mean(np.abs((np.array([0.0, 1.0]) - 0.5) / np.sqrt(0.5 + 1e-5)))
  np.testing.assert_allclose(np.asarray(y).ravel(), [alpha], rtol=1e-6)


def test_padding_forms_equivalent():
  x, w, _ = _random_case(11, hw=(6, 6))
  ys = {}
  for pad in [1, ((1, 1), (1, 1)), [(1, 1), (1, 1)], "SAME", "same"]:
    ys[str(pad)] = np.asarray(run_xnor(x, w, 1, pad, True))
  for key, y in ys.items():
    np.testing.assert_array_equal(y, ys["1"], err_msg=key)
  assert ys["1"].shape == (2, 6, 6, 5)
  y_valid = [np.asarray(run_xnor(x, w, 1, pad, True)) for pad in [0, "VALID", ((0, 0), (0, 0))]]
  for y in y_valid:
    np.testing.assert_array_equal(y, y_valid[0])
  assert y_valid[0].shape == (2, 4, 4, 5)
  # Different paddings really differ (the border rows see zero-padded inputs).
  np.testing.assert_array_equal(ys["1"][:, 1:-1, 1:-1], y_valid[0])
  assert not np.allclose(ys["1"][:, 0], ys["1"][:, 1])


@pytest.mark.parametrize("padding", ["FULL", -1, ((1, 1),), ((1, 1, 1), (1, 1))])
def test_bad_padding_raises(padding):
  x, w, _ = _random_case(0)
  with pytest.raises(ValueError):
    ow.xnor_conv(jnp.asarray(x), jnp.asarray(w), padding=padding)


def test_rank_mismatch_raises():
  with pytest.raises(ValueError):
    ow.xnor_conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3)))
  with pytest.raises(ValueError):
    ow.xnor_conv(jnp.ones((2, 5, 3)), jnp.ones((3, 3, 3, 4)))


@pytest.mark.slow
def test_one_dimensional_and_dense_forms():
  # A kernel of rank 3 (W, I, O) is a 1-D conv over NWC inputs, a kernel of rank 2
  # (I, O) a binary dense layer on (N, C): the same op as the 2-D conv with
  # singleton spatial axes (xnor_conv accepts any kernel of rank >= 2).
  x, w, _ = _random_case(5, hw=(1, 7), k=(1, 3))
  y2d = np.asarray(run_xnor(x, w, 1, ((0, 0), (1, 1)), True))[:, 0]
  y1d = run_xnor(x[:, 0], w[0], 1, [(1, 1)], True)
  assert y1d.shape == y2d.shape
  np.testing.assert_allclose(np.asarray(y1d), y2d, rtol=1e-6, atol=1e-6)

  xd, wd = x[:, 0, 0, :], w[0, 0]  # (N, C_in), (C_in, C_out)
  y_dense = run_xnor(xd, wd, (), (), False)
  alpha = np.mean(np.abs((wd - wd.mean(0)) / np.sqrt(wd.var(0, ddof=1) + 1e-5)), axis=0)
  np.testing.assert_allclose(np.asarray(y_dense), np.sign(xd) @ np.sign(wd) * alpha,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bf16_input_gives_bf16_output():
  x, w, rs = _random_case(3)
  y32 = np.asarray(run_xnor(x, w, 1, 1, True))
  xb = jnp.asarray(x, jnp.bfloat16)
  for training in (True, False):
    y = ow.xnor_conv(xb, jnp.asarray(w), padding=1, training=training)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=1e-2, atol=1e-2)
  dy = jnp.asarray(rs.randn(*y32.shape), jnp.bfloat16)
  _, pull = jax.vjp(lambda a, k: ow.xnor_conv(a, k, padding=1), xb, jnp.asarray(w))
  dx, dk = pull(dy)
  assert dx.dtype == jnp.bfloat16
  assert dk.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(dx, np.float32)))


# ---------------------------------------------------------------------------
# The Flax module.


@pytest.mark.slow
def test_binary_conv_params_and_init():
  module = ow.BinaryConv(features=256)
  x = jnp.zeros((1, 5, 5, 64))
  variables = module.init(jax.random.key(0), x)
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"latent_kernel"}
  assert ow.LATENT_KERNEL == "latent_kernel"
  k = np.asarray(variables["params"]["latent_kernel"])
  assert k.shape == (3, 3, 64, 256)
  assert k.dtype == np.float32
  std = np.sqrt(2.0 / (3 * 3 * 64))
  assert abs(k.std() / std - 1) < 0.02
  assert abs(k.mean()) < 0.01 * std
  # Untruncated normal (as torch's kaiming_normal_): ~4.55% beyond 2 std.
  beyond = np.mean(np.abs(k) > 2 * std)
  assert 0.04 < beyond < 0.051
  assert np.abs(k).max() > 3.5 * std


@pytest.mark.slow
def test_binary_conv_shapes_and_eval_train_agree():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32))
  cases = [(1, 1, (3, 3), (2, 8, 8, 6)), (2, 1, (3, 3), (2, 4, 4, 6)),
           (2, 0, (1, 1), (2, 4, 4, 6)), (1, "VALID", (3, 3), (2, 6, 6, 6))]
  for strides, padding, k, shape in cases:
    module = ow.BinaryConv(features=6, kernel_size=k, strides=strides, padding=padding)
    variables = module.init(jax.random.key(1), x)
    y_train = module.apply(variables, x, train=True)
    y_eval = module.apply(variables, x, train=False)
    assert y_train.shape == shape
    # The training-only normalisation does not change the signs: same forward.
    np.testing.assert_allclose(np.asarray(y_train), np.asarray(y_eval), rtol=1e-6, atol=1e-6)
    y_ref, _ = xnor_ref(np.asarray(x), np.asarray(variables["params"]["latent_kernel"]),
                        strides, 0 if padding == "VALID" else padding, False)
    assert_close(y_eval, y_ref)


@pytest.mark.slow
def test_binary_conv_bf16_compute_dtype():
  x = jnp.asarray(np.random.RandomState(2).randn(2, 6, 6, 3).astype(np.float32))
  module = ow.BinaryConv(features=4, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert variables["params"]["latent_kernel"].dtype == jnp.float32
  y = module.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  y32 = ow.BinaryConv(features=4).apply(variables, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_binary_conv_inside_a_model_trains_latent_kernel():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = ow.BinaryConv(4, name="b")(x, train)
      return nn.Dense(1)(x.mean(axis=(1, 2)))

  x = jnp.asarray(np.random.RandomState(1).randn(2, 6, 6, 3).astype(np.float32))
  variables = Net().init(jax.random.key(0), x)
  grads = jax.grad(lambda v: jnp.sum(Net().apply(v, x) ** 2))(variables)
  g = np.asarray(grads["params"]["b"]["latent_kernel"])
  assert g.shape == (3, 3, 3, 4)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
