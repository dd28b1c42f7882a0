"""Ternary, k-bit and int8 quantizers, their levels, packing, flips and SAD's targets.

Every value is checked against a NumPy formula written out here (float64), not
against the code under test (docs/method.md §10).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ovsw_jax as ow
from ovsw_jax import bitpack, metrics, quantizers as qz
from ovsw_jax.optim import levels as levels_lib

RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 5, 4, 6)).astype(np.float32)  # an HWIO kernel, 6 output channels
COT = RNG.normal(size=W.shape).astype(np.float32)


def reduce_axes(w, axis):
  return tuple(range(w.ndim)) if axis is None else tuple(
      a for a in range(w.ndim) if a != axis % w.ndim)


def np_round(x):
  return np.round(x)  # NumPy rounds half to even, as jnp.round


def ref_uniform(w, bits, rule, axis):
  """(levels, scale) of the symmetric k-bit grid, float64."""
  w = np.asarray(w, np.float64)
  q = 2 ** (bits - 1) - 1
  a = np.abs(w)
  ax = reduce_axes(w, axis)
  if rule == "absmax":
    s = a.max(axis=ax, keepdims=True) / q
  else:
    s = a.mean(axis=ax, keepdims=True) / ((q + 1) / 2)
  s = np.maximum(s, 1e-5)
  return np.clip(np_round(w / s), -q, q), s


def ref_twn(w, axis):
  w = np.asarray(w, np.float64)
  ax = reduce_axes(w, axis)
  t = 0.7 * np.abs(w).mean(axis=ax, keepdims=True)
  lv = np.sign(w) * (np.abs(w) > t)
  above = np.abs(w) > t
  count = np.maximum(above.sum(axis=ax, keepdims=True), 1)
  s = (np.abs(w) * above).sum(axis=ax, keepdims=True) / count
  return lv, s, t


QUANTIZERS = [
    ("ternary", None, lambda w: ref_uniform(w, 2, "absmean", None)),
    (qz.Ternary(axis=-1), -1, lambda w: ref_uniform(w, 2, "absmean", -1)),
    ("twn", None, lambda w: ref_twn(w, None)[:2]),
    (qz.Ternary(rule="twn", axis=-1), -1, lambda w: ref_twn(w, -1)[:2]),
] + [(f"uniform{k}", None, lambda w, k=k: ref_uniform(w, k, "absmax", None)) for k in (2, 3, 8)
     ] + [(f"uniform{k}_absmean", None, lambda w, k=k: ref_uniform(w, k, "absmean", None))
          for k in (4, 8)] + [
    (qz.Uniform(4, "absmax", axis=-1), -1, lambda w: ref_uniform(w, 4, "absmax", -1)),
    (qz.Uniform(2, "absmean", axis=-1), -1, lambda w: ref_uniform(w, 2, "absmean", -1)),
]
IDS = [str(q) for q, _, _ in QUANTIZERS]


@pytest.mark.parametrize("spec,axis,ref", QUANTIZERS, ids=IDS)
def test_values_levels_and_straight_through_gradient(spec, axis, ref):
  q = qz.get(spec)
  levels, scale = ref(W)

  @jax.jit  # one program per quantizer (eager dispatch compiles every op on its own)
  def run(w, cot):
    value, pull = jax.vjp(q, w)
    return q.levels(w), value, pull(cot)[0]

  got_levels, value, grad = run(jnp.asarray(W), jnp.asarray(COT))
  assert got_levels.dtype == jnp.int8
  np.testing.assert_array_equal(got_levels, levels)
  np.testing.assert_allclose(np.asarray(value), levels * scale, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grad), COT)  # identity
  assert value.dtype == jnp.float32
  if axis is not None:  # per channel: each output channel has its own scale
    assert len(np.unique(np.round(scale.ravel(), 6))) == W.shape[axis]


def ref_midrise(w, bits, rule, axis):
  """(levels, scale) of the 2**k-level grid without zero, values (l + 1/2) s, float64."""
  w = np.asarray(w, np.float64)
  half = 2 ** (bits - 1)
  a = np.abs(w)
  ax = reduce_axes(w, axis)
  s = a.max(axis=ax, keepdims=True) / half if rule == "absmax" else (
      a.mean(axis=ax, keepdims=True) / (half / 2))
  s = np.maximum(s, 1e-5)
  return np.clip(np.floor(w / s), -half, half - 1), s


@pytest.mark.parametrize("spec,bits,rule,axis", [
    ("midrise2", 2, "absmax", None), ("midrise2_absmean", 2, "absmean", None),
    ("midrise3", 3, "absmax", None), (qz.Midrise(2, "absmean", axis=-1), 2, "absmean", -1)],
    ids=str)
def test_midrise_uses_every_level_of_its_bits_and_passes_the_gradient_straight(
    spec, bits, rule, axis):
  q = qz.get(spec)
  levels, scale = ref_midrise(W, bits, rule, axis)

  @jax.jit
  def run(w, cot):
    value, pull = jax.vjp(q, w)
    low, high = q.cells(w)
    return q.levels(w), value, pull(cot)[0], low, high, q.pack(w)

  got, value, grad, low, high, packed = run(jnp.asarray(W), jnp.asarray(COT))
  np.testing.assert_array_equal(got, levels)
  assert set(np.unique(levels)) == set(range(-2 ** (bits - 1), 2 ** (bits - 1)))  # no code unused
  np.testing.assert_allclose(np.asarray(value), (levels + 0.5) * scale, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grad), COT)
  # Each weight lies in its level's cell, whose edges are multiples of the scale.
  w = W.astype(np.float64)
  assert np.all((np.asarray(low) <= w + 1e-6) & (w < np.asarray(high) + 1e-6))
  finite = np.isfinite(np.asarray(low))
  np.testing.assert_allclose(np.asarray(low)[finite], (levels * scale)[finite], rtol=1e-5)
  assert q.planes == q.bits == bits
  np.testing.assert_array_equal(bitpack.unpack_levels(packed, W.shape), levels)


def test_midrise_two_bit_boundaries_by_hand_and_bad_arguments():
  w = np.array([0.1, -0.4, 0.9, -1.6, 3.0], np.float32)  # mean |w| = 1.2 = s (2-bit absmean)
  q = qz.get("midrise2_absmean")
  np.testing.assert_array_equal(q.levels(w), [0, -1, 0, -2, 1])
  np.testing.assert_allclose(q(w), [0.6, -0.6, 0.6, -1.8, 1.8], rtol=1e-6)
  # Level changes at 0 and +-1.2: the nearest to each weight (ties up).
  np.testing.assert_allclose(q.boundary(w), [0.0, 0.0, 1.2, -1.2, 1.2], rtol=1e-6)
  for bad in (dict(bits=1), dict(bits=9), dict(scale_rule="max")):
    with pytest.raises(ValueError, match="Midrise"):
      qz.Midrise(**bad)


def test_a_ternary_kernel_has_three_levels_and_the_bitnet_scale():
  w = np.array([[0.5, -1.0], [0.25, 0.25]], np.float32)  # mean |w| = 0.5
  np.testing.assert_array_equal(ow.quantizers.get("ternary").levels(w), [[1, -1], [0, 0]])
  np.testing.assert_allclose(ow.quantizers.get("ternary")(w), [[0.5, -0.5], [0.0, 0.0]])
  assert qz.Ternary().reported_bits == pytest.approx(1.585, abs=1e-3) and qz.Ternary.bits == 2


def test_int8_per_token_matches_bitnet():
  x = RNG.normal(size=(2, 3, 16)).astype(np.float32)
  s = np.maximum(np.abs(x.astype(np.float64)).max(-1, keepdims=True), 1e-5) / 127
  want = np.clip(np_round(x / s), -128, 127) * s
  value, pull = jax.vjp(qz.int8_per_token, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(value), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(pull(jnp.ones_like(x))[0], np.ones_like(x))
  np.testing.assert_array_equal(qz.get("int8").levels(x), np.clip(np_round(x / s), -128, 127))


def test_an_all_zero_kernel_gets_level_zero_not_nan():
  names = ("ternary", "twn", "uniform4", "uniform3_absmean")
  values = jax.jit(lambda w: [qz.get(name)(w) for name in names])(jnp.zeros((4, 3)))
  for name, value in zip(names, values):
    assert np.all(np.asarray(value) == 0), name


@pytest.mark.parametrize("bad", ["uniform9", "uniform1", "binary", 3])
def test_unknown_names_are_refused_with_the_choices(bad):
  with pytest.raises(ValueError, match="uniform<k>"):
    qz.get(bad)
  with pytest.raises(ValueError, match="bits=9"):
    qz.Uniform(9)
  with pytest.raises(ValueError, match="rule='xnor'"):
    qz.Ternary(rule="xnor")


# --- packing and level changes ------------------------------------------------------------


@pytest.mark.parametrize("planes", [2, 3, 8])
def test_levels_pack_and_unpack_exactly_and_changes_are_found_packed(planes):
  q = 2 ** (planes - 1) - 1
  a = RNG.integers(-q, q + 1, size=203)
  b = np.where(RNG.random(203) < 0.3, RNG.integers(-q, q + 1, size=203), a)

  @jax.jit
  def run(a, b):
    pa, pb = bitpack.pack_levels(a, planes), bitpack.pack_levels(b, planes)
    return pa, bitpack.unpack_levels(pa, (203,)), bitpack.unpack_bits(
        bitpack.changed_bits(pa, pb), (203,))

  pa, unpacked, changed = run(jnp.asarray(a), jnp.asarray(b))
  assert pa.shape == (planes, 26) and pa.dtype == jnp.uint8
  np.testing.assert_array_equal(unpacked, a)
  np.testing.assert_array_equal(changed, a != b)


def test_ternary_packing_is_the_sign_packing():
  lv = jnp.asarray([-1, 0, 1, 1, 0], jnp.int8)
  np.testing.assert_array_equal(qz.Ternary().pack(jnp.asarray([-2.0, 0.1, 1.0, 3.0, -0.2])),
                                bitpack.pack_signs(lv))


def test_a_move_from_zero_to_one_counts_as_a_ternary_flip_but_not_a_sign_flip():
  before = {"k": jnp.asarray([[0.1, 1.0], [-1.0, 1.0]])}   # mean |w| 0.775: levels 0, 1, -1, 1
  after = {"k": jnp.asarray([[0.7, 1.0], [-1.0, 1.0]])}    # mean 0.925: 0.7 -> level 1
  mask = {"k": True}
  assert float(metrics.step_flip_fraction(before, after, mask)) == 0.0  # no sign changed
  assert float(metrics.step_flip_fraction(before, after, mask, levels="ternary")) == 0.25


def test_a_scale_change_that_moves_levels_counts_as_a_flip():
  # Only the last weight moves, yet mean |w| doubles and the first weight drops from 1 to 0.
  before = jnp.asarray([0.6, 1.0, -1.0, 1.0])   # mean 0.9: levels 1, 1, -1, 1
  after = jnp.asarray([0.6, 1.0, -1.0, 5.0])    # mean 1.9: 0.6 / 1.9 rounds to 0
  mask, lv = {"k": True}, {"k": "ternary"}
  flips = metrics.init_flip_state({"k": before}, mask, lv)
  flips = metrics.update_flip_state(flips, {"k": after}, mask, lv)
  assert float(metrics.silent_ratio(flips, {"k": after}, mask)["silent_ratio"]) == 0.75
  assert float(metrics.flip_ratio(flips, {"k": after}, mask, lv)["flip_ratio"]) == 0.25
  np.testing.assert_array_equal(qz.get("ternary").levels(after), [0, 1, -1, 1])


def test_sign_levels_given_explicitly_change_nothing():
  params = {"k": jnp.asarray(W)}
  grads = {"k": jnp.asarray(COT)}
  default = ow.add_sad_penalty(0.1)
  explicit = ow.add_sad_penalty(0.1, levels={"k": "sign"}, toward="boundary")
  sd, se = default.init(params), explicit.init(params)
  step_d, step_e = jax.jit(default.update), jax.jit(explicit.update)
  for i in range(3):
    p = {"k": params["k"] - 0.3 * i * grads["k"]}
    ud, sd = step_d(grads, sd, p)
    ue, se = step_e(grads, se, p)
    np.testing.assert_array_equal(ud["k"], ue["k"])
  jax.tree.map(np.testing.assert_array_equal, sd, se)


# --- SAD on levels ------------------------------------------------------------------------


def test_sad_tracks_ternary_levels_and_pulls_to_the_nearest_threshold_by_hand():
  # mean |w| = 1.0, so s = 1: levels 0 (w = 0.2, -0.3), 1 (w = 1.2), -1 (w = -2.3).
  w = jnp.asarray([0.2, -0.3, 1.2, -2.3])
  gamma = 0.5
  tx = ow.add_sad_penalty(gamma, levels="ternary", toward="boundary")
  state = tx.init({"w": w})
  upd, state = tx.update({"w": jnp.zeros(4)}, state, {"w": w})
  # Nearest thresholds: 0.2 -> +0.5, -0.3 -> -0.5, 1.2 -> +0.5 (no threshold above +1),
  # -2.3 -> -0.5. Every weight is silent (nothing flipped yet): g = gamma * (w - b).
  np.testing.assert_allclose(upd["w"], gamma * (np.array([0.2, -0.3, 1.2, -2.3])
                                                - np.array([0.5, -0.5, 0.5, -0.5])), rtol=1e-6)
  zero = ow.add_sad_penalty(gamma, levels="ternary")  # toward='zero': the release's pull
  upd0, _ = zero.update({"w": jnp.zeros(4)}, zero.init({"w": w}), {"w": w})
  np.testing.assert_allclose(upd0["w"], gamma * np.asarray(w), rtol=1e-6)
  # A level change (0.2 -> 0.6 keeps the scale at 1.1: level 0 -> 1) is a flip, a sign
  # change is not needed: the weight is no longer silent and gets no penalty.
  w2 = jnp.asarray([0.6, -0.3, 1.2, -2.3])
  upd2, state = tx.update({"w": jnp.zeros(4)}, state, {"w": w2})
  assert float(upd2["w"][0]) == 0.0 and float(upd2["w"][1]) != 0.0
  np.testing.assert_allclose(state.tracker["w"], [1e-3, 0, 0, 0], rtol=1e-5)


def test_sad_boundary_of_twn_and_uniform_by_hand():
  w = np.array([0.1, -0.4, 0.9, -1.6, 3.0], np.float32)  # mean |w| = 1.2: TWN threshold 0.84
  b_twn = np.asarray(qz.Ternary(rule="twn").boundary(w))
  np.testing.assert_allclose(b_twn, [0.84, -0.84, 0.84, -0.84, 0.84], rtol=1e-6)
  # 3-bit absmax: q = 3, s = 1; cells at +-0.5, +-1.5, +-2.5.
  b_u = np.asarray(qz.Uniform(3).boundary(w))
  np.testing.assert_allclose(b_u, [0.5, -0.5, 0.5, -1.5, 2.5], rtol=1e-6)


def test_toward_boundary_with_a_bare_level_function_is_refused_clearly():
  tx = ow.add_sad_penalty(0.1, levels=lambda w: jnp.sign(w).astype(jnp.int8), toward="boundary")
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="toward='boundary' needs each leaf's quantizer"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="toward='middle'"):
    ow.add_sad_penalty(0.1, toward="middle")


def test_levels_read_off_a_tree_must_cover_every_tracked_leaf():
  params = {"a": {"latent_kernel": jnp.ones((2, 2))}, "b": {"latent_kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match="no quantizer for b/latent_kernel"):
    levels_lib.resolve({"a/latent_kernel": "ternary"}, params)
  tree = levels_lib.resolve({"a": {"latent_kernel": "ternary"}, "b": {"latent_kernel": None}},
                            params)
  assert tree["a"]["latent_kernel"] == qz.Ternary() and tree["b"]["latent_kernel"] == qz.SIGN
  with pytest.raises(ValueError, match="quantizer 'tern' is unknown"):
    ow.ovsw(levels={"a/latent_kernel": "tern"})


def test_ovsw_with_levels_under_jit_and_inside_a_chain():
  params = {"dense": {"latent_kernel": jnp.asarray(W.reshape(-1, 6)), "bias": jnp.zeros(6)}}
  tx = optax.chain(ow.ovsw(0.04, 9e-4, levels={"dense/latent_kernel": "uniform4"},
                           toward="boundary"), optax.sgd(0.1))
  state = tx.init(params)
  prev = optax.tree.get(state, "prev_signs")["dense"]["latent_kernel"]
  assert prev.shape == (4, W.size // 8)  # 4 bit-planes: the 4-bit levels
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    upd, state = step(grads, state, params)
    params = optax.apply_updates(params, upd)
  assert np.isfinite(np.asarray(params["dense"]["latent_kernel"])).all()
