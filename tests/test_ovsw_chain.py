"""The OvSW chain, its mask, and OvSW in front of Optax optimizers."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ovsw_jax as ow
from helpers import load_oracle, release_float
from ovsw_jax.naming import is_latent_kernel


def release_chain(d, mask):
  return optax.chain(
      ow.ovsw(release_float(d["delta"]), release_float(d["dampen_weight"]),
              release_float(d["track_momentum"]), release_float(d["track_threshold"]), mask=mask),
      optax.add_decayed_weights(release_float(d["weight_decay"])),
      optax.sgd(release_float(d["lr"]), momentum=release_float(d["momentum"])))


def assert_weights_close(actual, expected, t):
  scale = np.abs(expected).max()
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-6 * scale,
                             err_msg=f"step {t}")


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("form", ["bare", "dict"])
def test_free_run_reproduces_oracle(case, form):
  d = load_oracle(f"ovsw_steps_public_{case}")
  steps = d["w"].shape[0]
  # The oracle is self-consistent: w[t + 1] is w_next[t].
  np.testing.assert_array_equal(d["w"][1:], d["w_next"][:-1])
  if form == "bare":
    tx = release_chain(d, mask=None)
    wrap, unwrap = (lambda a: a), (lambda p: p)
  else:
    tx = release_chain(d, mask=ow.binary_weight_mask)
    wrap = lambda a: {"layer": {"latent_kernel": a}}
    unwrap = lambda p: p["layer"]["latent_kernel"]
  params = wrap(jnp.asarray(d["w"][0]))
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(wrap(g), state, params)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    params, state = step(params, state, jnp.asarray(d["g_raw"][t]))
    assert_weights_close(unwrap(params), d["w_next"][t], t)
  tracker = optax.tree.get(state, "tracker")
  # (The tracker's float32 rounding is checked tightly in test_sad.py.)
  np.testing.assert_allclose(np.asarray(unwrap(tracker)), d["tracker"][-1], rtol=2e-5, atol=1e-9)


def test_chain_order_is_ags_then_sad():
  # Teacher-forced through ovsw() alone: the output is the oracle's g_sad.
  d = load_oracle("ovsw_steps_public_1")
  tx = ow.ovsw(release_float(d["delta"]), release_float(d["dampen_weight"]),
               release_float(d["track_momentum"]), release_float(d["track_threshold"]), mask=None)
  state = tx.init(jnp.asarray(d["w"][0]))
  for t in range(d["w"].shape[0]):
    u, state = tx.update(jnp.asarray(d["g_raw"][t]), state, jnp.asarray(d["w"][t]))
    np.testing.assert_allclose(np.asarray(u), d["g_sad"][t], rtol=1e-5,
                               atol=1e-6 * np.abs(d["g_sad"][t]).max())
  ags_state, sad_state = state
  assert isinstance(ags_state, ow.ScaleByAgsState)
  assert isinstance(sad_state, ow.AddSadPenaltyState)


def model_like_params(seed=0):
  rs = np.random.RandomState(seed)
  f = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32))
  return {
      "stem": {"kernel": f(3, 3, 3, 8)},
      "bn": {"scale": f(8), "bias": f(8)},
      "block": {"conv1": {"latent_kernel": f(3, 3, 8, 8)}, "bn1": {"scale": f(8)},
                "shortcut": {"kernel": f(1, 1, 8, 8)}},
      "block2": {"latent_kernel": f(3, 3, 8, 16)},
      "head": {"kernel": f(16, 10), "bias": f(10)},
  }


def test_binary_weight_mask():
  params = model_like_params()
  params["other"] = {"latent_kernel_extra": jnp.ones((2, 2)), "kernel": jnp.ones((2, 2))}
  expected = {"block/conv1/latent_kernel", "block2/latent_kernel"}
  for tree in [params, flax.core.freeze(params)]:
    mask = ow.binary_weight_mask(tree)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    names = {"/".join(str(k.key) for k in path) for path, v in flat if v is True}
    assert names == expected
    assert all(isinstance(v, bool) for _, v in flat)
    assert len(flat) == len(jax.tree.leaves(params))
    # Same structure as the tree it masks (a FrozenDict mask for FrozenDict params),
    # so optax.masked can zip them.
    assert jax.tree.structure(mask) == jax.tree.structure(tree)
  # A bare array has no name: not a binary weight.
  assert ow.binary_weight_mask(jnp.ones((3, 3))) is False


def test_binary_weight_mask_sees_through_nnx_variables():
  # flax.nnx state: each array sits at the `.value` attribute of a Variable.
  param = lambda name: (jax.tree_util.DictKey(name), jax.tree_util.GetAttrKey("value"))
  assert is_latent_kernel(param("latent_kernel"))
  assert not is_latent_kernel(param("kernel"))
  # A dict key named "value" is a parameter name, not nnx's attribute.
  assert not is_latent_kernel((jax.tree_util.DictKey("latent_kernel"),
                               jax.tree_util.DictKey("value")))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("params", [
    {"dense": {"kernel": np.ones((4, 3), np.float32), "bias": np.ones((3,), np.float32)}},
    {"w": np.ones((3, 3, 2, 4), np.float32)},
    {},
], ids=["dense", "conv_not_binary", "empty"])
def test_ovsw_passes_a_tree_without_binary_leaves_through(params, jit):
  # Default mask, nothing binary in the tree: OvSW is the identity, as optax's
  # masked transforms are on a tree they select nothing from.
  params = jax.tree.map(jnp.asarray, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, -1e-3), params)
  tx = ow.ovsw(delta=0.04, dampen_weight=9e-4)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(3):
    updates, state = update(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(g))
  assert jax.tree.leaves(optax.tree.get(state, "tracker")) == []


def test_binary_weight_mask_on_flax_model_params():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = ow.BinaryConv(4)(x, train)
      x = ow.BinaryConv(4, name="conv_b")(x, train)
      return nn.Dense(2)(x.mean(axis=(1, 2)))

  variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  mask = ow.binary_weight_mask(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  true_paths = sorted("/".join(k.key for k in path) for path, v in flat if v)
  assert true_paths == ["BinaryConv_0/latent_kernel", "conv_b/latent_kernel"]
  assert sum(1 for _, v in flat if not v) == 6  # conv kernel+bias, bn scale+bias, dense kernel+bias


@pytest.mark.slow
def test_masked_chain_on_frozen_dict_params():
  params = flax.core.freeze(model_like_params())
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  tx = ow.ovsw(0.04, 9e-4)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  plain = flax.core.unfreeze(model_like_params())
  tx2 = ow.ovsw(0.04, 9e-4)
  updates2, _ = tx2.update(jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), plain),
                           tx2.init(plain), plain)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(updates2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _grads_like(params, seed=1):
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape).astype(np.float32) * 1e-3), params)


@pytest.mark.slow
def test_masked_chain_passes_full_precision_leaves_through():
  params = model_like_params()
  mask = ow.binary_weight_mask(params)
  tx_ovsw = optax.chain(ow.ovsw(0.04, 9e-4), optax.add_decayed_weights(5e-4),
                        optax.sgd(0.1, momentum=0.9))
  tx_plain = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  s_ovsw, s_plain = tx_ovsw.init(params), tx_plain.init(params)
  bare = ow.ovsw(0.04, 9e-4)
  s_bare = bare.init(params)
  p = params
  for step in range(3):
    grads = _grads_like(params, seed=step)
    u_ovsw, s_ovsw = tx_ovsw.update(grads, s_ovsw, p)
    u_plain, s_plain = tx_plain.update(grads, s_plain, p)
    u_bare, s_bare = bare.update(grads, s_bare, p)
    for m, a, b, g, ub in zip(jax.tree.leaves(mask), jax.tree.leaves(u_ovsw),
                              jax.tree.leaves(u_plain), jax.tree.leaves(grads),
                              jax.tree.leaves(u_bare)):
      if m:
        assert not np.allclose(np.asarray(a), np.asarray(b))
        assert not np.allclose(np.asarray(ub), np.asarray(g))
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(ub), np.asarray(g))
    p = optax.apply_updates(p, u_ovsw)
  # The masked leaves carry no OvSW state.
  tracker = optax.tree.get(s_ovsw, "tracker")
  assert tracker["block"]["conv1"]["latent_kernel"].shape == (3, 3, 8, 8)
  assert not jax.tree.leaves(tracker["head"]) and not jax.tree.leaves(tracker["bn"])


def _shapes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


@pytest.mark.slow
def test_state_shapes_and_dtypes_stable():
  params = model_like_params()
  for tx in [optax.chain(ow.ovsw(0.04, 9e-4), optax.add_decayed_weights(5e-4),
                         optax.sgd(0.1, momentum=0.9)),
             ow.ovsw(0.04, 9e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
             optax.MultiSteps(optax.chain(ow.ovsw(0.04, 9e-4), optax.adam(1e-3)), 2)]:
    state0 = tx.init(params)
    state = state0
    p = params
    update = jax.jit(tx.update)
    for step in range(2):
      u, state = update(_grads_like(params, step), state, p)
      p = optax.apply_updates(p, u)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert _shapes(state) == _shapes(state0)


@pytest.mark.slow
def test_masked_chain_under_multisteps():
  params = model_like_params()
  k = 2
  inner = optax.chain(ow.ovsw(0.04, 9e-4), optax.add_decayed_weights(5e-4),
                      optax.sgd(0.1, momentum=0.9))
  tx = optax.MultiSteps(inner, every_k_schedule=k)
  ref = optax.chain(ow.ovsw(0.04, 9e-4), optax.add_decayed_weights(5e-4),
                    optax.sgd(0.1, momentum=0.9))
  state, ref_state = tx.init(params), ref.init(params)
  update = jax.jit(tx.update)
  p, p_ref = params, params
  for outer in range(2):
    grads = [_grads_like(params, 10 * outer + i) for i in range(k)]
    for i, g in enumerate(grads):
      u, state = update(g, state, p)
      if i < k - 1:
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
      p = optax.apply_updates(p, u)
    mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads)
    u_ref, ref_state = ref.update(mean, ref_state, p_ref)
    p_ref = optax.apply_updates(p_ref, u_ref)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert int(state.gradient_step) == 2


# ---------------------------------------------------------------------------
# Training a small binary model with OvSW in front of SGD, Adam and AdamW.


class ToyBNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = ow.BinaryConv(8, name="b1")(x, train)
    x = jnp.clip(x, -1, 1)
    x = ow.BinaryConv(8, name="b2")(x, train)
    x = jnp.clip(x, -1, 1)
    return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))


def toy_data(n=64, seed=0):
  """Class 0: vertical stripes, class 1: horizontal stripes, plus noise."""
  rs = np.random.RandomState(seed)
  y = rs.randint(0, 2, size=n)
  stripes = np.where(np.arange(8) % 2 == 0, 1.0, -1.0)
  vertical = np.broadcast_to(stripes[None, :], (8, 8))
  x = np.where(y[:, None, None] == 0, vertical, vertical.T)[..., None]
  x = x * rs.uniform(0.5, 1.5, size=(n, 1, 1, 1)) + 0.3 * rs.randn(n, 8, 8, 1)
  return jnp.asarray(x.astype(np.float32)), jnp.asarray(y)


@pytest.mark.slow
@pytest.mark.parametrize("name,base", [
    ("sgd", optax.sgd(0.05, momentum=0.9)),
    ("adam", optax.adam(3e-3)),
    ("adamw", optax.adamw(3e-3, weight_decay=1e-4)),
])
def test_toy_training(name, base):
  x, y = toy_data()
  model = ToyBNN()
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  tx = optax.chain(ow.ovsw(delta=0.04, dampen_weight=9e-4), base)
  state = tx.init(params)

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(params, state):
    def body(carry, _):
      p, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (params, state), losses = jax.lax.scan(body, (params, state), None, length=40)
    return params, state, losses

  initial = float(jax.jit(loss_fn)(params))
  new_params, state, losses = train(params, state)
  final = float(jax.jit(loss_fn)(new_params))
  assert np.all(np.isfinite(np.asarray(losses)))
  assert final < 0.5 * initial, (name, initial, final)
  # The latent kernels moved, and some binary weights changed sign.
  for layer in ("b1", "b2"):
    before = np.asarray(params[layer]["latent_kernel"])
    after = np.asarray(new_params[layer]["latent_kernel"])
    assert not np.allclose(before, after)
  flips = sum(np.mean(np.sign(params[name]["latent_kernel"])
                      != np.sign(new_params[name]["latent_kernel"])) for name in ("b1", "b2"))
  assert flips > 0
  fractions = jax.tree.leaves(optax.tree.get(state, "silent_fraction"))
  assert len(fractions) == 2 and all(0.0 <= float(f) <= 1.0 for f in fractions)
