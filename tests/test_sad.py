"""Silence Awareness Decaying (`add_sad_penalty`) against numpy and the release's vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ovsw_jax as ow

from helpers import load_oracle, release_float


class SadRef:
  """SAD (paper Eqs. 8-9, docs/method.md §3) in numpy, with the release's float32 tracker.

  The release (torch, float32 tensors, Python-float m) multiplies by m rounded to
  float32 and by (1 - m) computed in double, then rounded to float32: one flip
  lifts s to float32(1e-3) exactly.
  """

  def __init__(self, w0):
    self.prev = np.sign(np.asarray(w0, np.float32))
    self.s = np.zeros(np.shape(w0), np.float32)

  def step(self, g, w, gamma, m=0.999, sigma=1e-4):
    w = np.asarray(w, np.float32)
    one_minus_m = np.float32(1.0 - float(m))
    m = np.float32(m)
    flipped = (np.sign(w) != self.prev).astype(np.float32)
    self.s = (m * self.s + one_minus_m * flipped).astype(np.float32)
    silent = self.s < np.float32(sigma)
    out = np.asarray(g, np.float64) + gamma * silent * np.asarray(w, np.float64)
    self.prev = np.sign(w)
    return out, silent


def run_steps(tx, grads, params, jit=False):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params[0])
  outs, states = [], []
  for g, w in zip(grads, params):
    u, state = update(g, state, w)
    outs.append(u)
    states.append(state)
  return outs, states


def random_walk(steps=8, shape=(3, 3, 4, 6), seed=0, zeros=True):
  """Weights that drift across zero (with exact zeros) and gradients."""
  rs = np.random.RandomState(seed)
  w = [rs.randn(*shape).astype(np.float32) * 0.1]
  for _ in range(steps - 1):
    nxt = w[-1] + rs.randn(*shape).astype(np.float32) * 0.05
    if zeros:
      nxt.reshape(-1)[rs.choice(nxt.size, 4, replace=False)] = 0.0
    w.append(nxt.astype(np.float32))
  g = [rs.randn(*shape).astype(np.float32) * 0.01 for _ in range(steps)]
  return w, g


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("jit", [False, True])
def test_teacher_forced_against_oracle(case, jit):
  d = load_oracle(f"ovsw_steps_public_{case}")
  tx = ow.add_sad_penalty(release_float(d["dampen_weight"]), release_float(d["track_momentum"]),
                          release_float(d["track_threshold"]))
  outs, states = run_steps(tx, list(d["g_ags"]), list(d["w"]), jit=jit)
  for t, (u, state) in enumerate(zip(outs, states)):
    expected = d["g_sad"][t]
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max(), err_msg=f"step {t}")
    tracker = optax.tree.get(state, "tracker")
    # The README promises float32 agreement to about 1e-6 relative.
    np.testing.assert_allclose(np.asarray(tracker), d["tracker"][t], rtol=2e-6, atol=1e-12,
                               err_msg=f"tracker, step {t}")
    np.testing.assert_array_equal(np.asarray(state.tracker), np.asarray(tracker))
    assert state.tracker.dtype == jnp.float32
    np.testing.assert_allclose(
        float(state.silent_fraction),
        np.mean(d["tracker"][t] < d["track_threshold"]), rtol=1e-6)
  assert int(states[-1].count) == len(outs)


@pytest.mark.parametrize("case", [0, 1])
def test_numpy_reference_matches_oracle(case):
  # Guards the numpy model used by the other tests, and checks that case 1
  # holds both silent and non-silent weights.
  d = load_oracle(f"ovsw_steps_public_{case}")
  ref = SadRef(d["w"][0])
  silent_seen = []
  for t in range(d["w"].shape[0]):
    out, silent = ref.step(d["g_ags"][t], d["w"][t], release_float(d["dampen_weight"]),
                           release_float(d["track_momentum"]), release_float(d["track_threshold"]))
    np.testing.assert_allclose(out, d["g_sad"][t], rtol=1e-5, atol=1e-6 * np.abs(out).max())
    np.testing.assert_allclose(ref.s, d["tracker"][t], rtol=2e-6, atol=1e-12)
    silent_seen.append(silent.mean())
  if case == 1:
    assert 0 < min(silent_seen) and max(silent_seen) <= 1
    assert any(0 < f < 1 for f in silent_seen)


def test_zero_weights_flip_semantics():
  # sign(0) = 0: 0.3 -> 0.0 and 0.0 -> 0.4 are flips, 0 -> 0 and 0 -> -0 are not.
  w0 = np.array([[0.3, 0.0, -0.2, 0.0, 0.5, 0.0, -0.7]], np.float32)
  w1 = np.array([[0.0, 0.0, -0.2, 0.4, -0.5, -0.0, -0.6]], np.float32)
  g = np.full(w0.shape, 0.01, np.float32)
  gamma, m, sigma = 0.5, 0.9, 0.05
  tx = ow.add_sad_penalty(gamma, m, sigma)
  state = tx.init(jnp.asarray(w0))
  u0, state = tx.update(jnp.asarray(g), state, jnp.asarray(w0))
  # Step 0 compares w0 with itself: nothing flipped, every weight silent.
  np.testing.assert_allclose(np.asarray(u0), g + gamma * w0, rtol=1e-6)
  u1, state = tx.update(jnp.asarray(g), state, jnp.asarray(w1))
  flipped = np.array([[1, 0, 0, 1, 1, 0, 0]], bool)
  np.testing.assert_allclose(np.asarray(state.tracker), np.where(flipped, 0.1, 0.0), rtol=1e-6)
  expected = np.where(flipped, g, g + gamma * w1)
  np.testing.assert_allclose(np.asarray(u1), expected, rtol=1e-6)
  np.testing.assert_allclose(float(state.silent_fraction), 4 / 7, rtol=1e-6)
  ref = SadRef(w0)
  ref.step(g, w0, gamma, m, sigma)
  np.testing.assert_allclose(ref.step(g, w1, gamma, m, sigma)[0], expected, rtol=1e-6)


@pytest.mark.parametrize("m,sigma", [(0.999, 1e-4), (0.5, 0.2), (0.0, 0.5)])
def test_random_walk_matches_numpy(m, sigma):
  w, g = random_walk(seed=int(m * 10))
  gamma = 0.3
  tx = ow.add_sad_penalty(gamma, m, sigma)
  outs, states = run_steps(tx, [jnp.asarray(x) for x in g], [jnp.asarray(x) for x in w])
  ref = SadRef(w[0])
  any_flip = False
  for t in range(len(w)):
    expected, silent = ref.step(g[t], w[t], gamma, m, sigma)
    any_flip |= not silent.all()
    np.testing.assert_allclose(np.asarray(outs[t]), expected, rtol=1e-6, atol=1e-8,
                               err_msg=f"t={t}")
    np.testing.assert_allclose(np.asarray(states[t].tracker), ref.s, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(states[t].silent_fraction), silent.mean(), rtol=1e-6)
  assert any_flip


def test_prev_signs_start_from_init_params():
  w0 = np.array([[0.5, -0.5]], np.float32)
  tx = ow.add_sad_penalty(1.0, 0.5, 0.1)
  state = tx.init(jnp.asarray(w0))
  # The first update's weights differ in sign from init's: both flipped.
  u, state = tx.update(jnp.zeros((1, 2)), state, jnp.asarray(-w0))
  np.testing.assert_array_equal(np.asarray(u), [[0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(state.tracker), [[0.5, 0.5]])


@pytest.mark.slow
def test_dampen_weight_schedule():
  w, g = random_walk(steps=4, seed=3)
  gammas = [0.1, 0.1, 0.0, 2.0]
  schedule = optax.piecewise_constant_schedule(0.1, {2: 0.0})
  schedule2 = lambda count: jnp.where(count < 2, 0.1, jnp.where(count < 3, 0.0, 2.0))
  for sched in [schedule, schedule2]:
    for jit in (False, True):
      tx = ow.add_sad_penalty(sched, 0.9, 0.05)
      outs, states = run_steps(tx, [jnp.asarray(x) for x in g], [jnp.asarray(x) for x in w], jit)
      ref = SadRef(w[0])
      for t in range(4):
        gamma = gammas[t] if sched is schedule2 else [0.1, 0.1, 0.0, 0.0][t]
        expected, _ = ref.step(g[t], w[t], gamma, 0.9, 0.05)
        np.testing.assert_allclose(np.asarray(outs[t]), expected, rtol=1e-6, atol=1e-8)
      np.testing.assert_array_equal(np.asarray(outs[2]), g[2])


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_inject_hyperparams_identical_updates(jit):
  w, g = random_walk(steps=4, seed=5)
  w, g = [jnp.asarray(x) for x in w], [jnp.asarray(x) for x in g]
  plain, plain_states = run_steps(ow.add_sad_penalty(0.2, 0.9, 0.05), g, w, jit)
  tx = optax.inject_hyperparams(ow.add_sad_penalty)(dampen_weight=0.2, track_momentum=0.9,
                                                     track_threshold=0.05)
  injected, states = run_steps(tx, g, w, jit)
  for a, b in zip(plain, injected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Injected, m is a float32 array, so 1 - m is rounded differently (by an ulp).
  np.testing.assert_allclose(np.asarray(optax.tree.get(states[-1], "tracker")),
                             np.asarray(plain_states[-1].tracker), rtol=1e-6)
  np.testing.assert_allclose(float(states[-1].hyperparams["dampen_weight"]), 0.2, rtol=1e-7)


@pytest.mark.slow
def test_bf16():
  w, g = random_walk(steps=3, seed=7, shape=(3, 3, 2, 4))
  wb = [jnp.asarray(x, jnp.bfloat16) for x in w]
  gb = [jnp.asarray(x, jnp.bfloat16) for x in g]
  outs, states = run_steps(ow.add_sad_penalty(0.3, 0.9, 0.05), gb, wb)
  ref = SadRef(np.asarray(wb[0], np.float32))
  for t in range(3):
    assert outs[t].dtype == jnp.bfloat16
    assert states[t].tracker.dtype == jnp.float32
    expected, _ = ref.step(np.asarray(gb[t], np.float32), np.asarray(wb[t], np.float32),
                           0.3, 0.9, 0.05)
    np.testing.assert_allclose(np.asarray(outs[t], np.float32), expected, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(np.asarray(states[t].tracker), ref.s, rtol=1e-6)
  # bf16 gradients on float32 weights.
  outs, _ = run_steps(ow.add_sad_penalty(0.3), gb, [jnp.asarray(x) for x in w])
  assert all(o.dtype == jnp.bfloat16 for o in outs)


def test_errors():
  with pytest.raises(ValueError):
    ow.add_sad_penalty(-1e-3)
  for m in [1.0, -0.1, 1.5]:
    with pytest.raises(ValueError):
      ow.add_sad_penalty(1e-3, track_momentum=m)
  with pytest.raises(ValueError):
    ow.add_sad_penalty(1e-3, track_threshold=-1e-4)
  ow.add_sad_penalty(0.0, track_momentum=0.0, track_threshold=0.0)  # bounds are allowed
  tx = ow.add_sad_penalty(1e-3)
  w = jnp.ones((3, 4))
  state = tx.init(w)
  with pytest.raises(ValueError):
    tx.update(w, state)
  with pytest.raises(ValueError):
    tx.update(w, state, None)


def test_state_memory_per_weight():
  shape = (3, 3, 64, 64)
  n = int(np.prod(shape))
  state = ow.add_sad_penalty().init({"w": jnp.ones(shape)})
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  prev_bytes = nbytes(state.prev_signs) / n
  tracker_bytes = nbytes(state.tracker) / n
  assert prev_bytes <= 1.0  # the release stores a whole float per weight
  assert prev_bytes == 0.25
  assert tracker_bytes == 4.0
  assert nbytes(state) / n < 4.3
  # After an update the sizes are the same.
  _, state2 = ow.add_sad_penalty().update({"w": jnp.ones(shape)}, state, {"w": -jnp.ones(shape)})
  assert nbytes(state2) == nbytes(state)


@pytest.mark.slow
def test_silent_fraction_per_leaf():
  rs = np.random.RandomState(2)
  w0 = {"a": rs.randn(3, 3, 2, 4).astype(np.float32), "b": rs.randn(5, 6).astype(np.float32)}
  # Flip a known fraction of each leaf's signs.
  w1 = {"a": w0["a"].copy(), "b": w0["b"].copy()}
  w1["a"].reshape(-1)[:18] *= -1
  w1["b"].reshape(-1)[:3] *= -1
  tx = ow.add_sad_penalty(1e-3, 0.9, 0.05)
  params0 = jax.tree.map(jnp.asarray, w0)
  state = tx.init(params0)
  _, state = tx.update(params0, state, params0)
  assert all(float(v) == 1.0 for v in jax.tree.leaves(state.silent_fraction))
  _, state = jax.jit(tx.update)(params0, state, jax.tree.map(jnp.asarray, w1))
  for k in w0:
    expected = np.mean(np.sign(w1[k]) == np.sign(w0[k]))
    np.testing.assert_allclose(float(state.silent_fraction[k]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(optax.tree.get(state, "silent_fraction")[k]), expected,
                               rtol=1e-6)
  np.testing.assert_allclose(float(state.silent_fraction["a"]), 1 - 18 / 72, rtol=1e-6)


@pytest.mark.slow
def test_tuple_params():
  w, g = random_walk(steps=2, seed=9, shape=(4, 5))
  w2, g2 = random_walk(steps=2, seed=10, shape=(3, 3))
  tx = ow.add_sad_penalty(0.3, 0.9, 0.05)
  params = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(w, w2)]
  grads = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(g, g2)]
  outs, states = run_steps(tx, grads, params)
  r1, r2 = SadRef(w[0]), SadRef(w2[0])
  for t in range(2):
    assert isinstance(outs[t], tuple) and len(outs[t]) == 2
    np.testing.assert_allclose(np.asarray(outs[t][0]), r1.step(g[t], w[t], 0.3, 0.9, 0.05)[0],
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(outs[t][1]), r2.step(g2[t], w2[t], 0.3, 0.9, 0.05)[0],
                               rtol=1e-6, atol=1e-8)
    assert states[t].tracker[0].shape == (4, 5)


def test_mask_leaves_other_leaves_untouched():
  w, g = random_walk(steps=3, seed=11)
  params = [{"b": {"latent_kernel": jnp.asarray(x)}, "bn": {"scale": jnp.full((6,), 0.5)}}
            for x in w]
  grads = [{"b": {"latent_kernel": jnp.asarray(x)}, "bn": {"scale": jnp.full((6,), 0.01)}}
           for x in g]
  tx = ow.add_sad_penalty(0.3, 0.9, 0.05, mask=ow.binary_weight_mask)
  outs, states = run_steps(tx, grads, params, jit=True)
  ref = SadRef(w[0])
  for t in range(3):
    np.testing.assert_allclose(np.asarray(outs[t]["b"]["latent_kernel"]),
                               ref.step(g[t], w[t], 0.3, 0.9, 0.05)[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(outs[t]["bn"]["scale"]),
                                  np.full((6,), 0.01, np.float32))
  tracker = optax.tree.get(states[-1], "tracker")
  np.testing.assert_allclose(np.asarray(tracker["b"]["latent_kernel"]), ref.s, rtol=1e-6, atol=1e-9)
  assert not jax.tree.leaves(tracker["bn"])


def test_silent_is_strictly_below_threshold():
  # m = 0.5: one flip lifts s to exactly 0.5, the next quiet step to 0.25.
  w0 = jnp.asarray([[1.0, 1.0]])
  w1 = jnp.asarray([[-1.0, 1.0]])
  g = jnp.zeros((1, 2))
  tx = ow.add_sad_penalty(1.0, track_momentum=0.5, track_threshold=0.5)
  state = tx.init(w0)
  u, state = tx.update(g, state, w1)
  np.testing.assert_array_equal(np.asarray(state.tracker), [[0.5, 0.0]])
  np.testing.assert_array_equal(np.asarray(u), [[0.0, 1.0]])  # s == sigma: not silent
  u, state = tx.update(g, state, w1)
  np.testing.assert_array_equal(np.asarray(state.tracker), [[0.25, 0.0]])
  np.testing.assert_array_equal(np.asarray(u), [[-1.0, 1.0]])
  # sigma = 0: nothing is ever silent.
  tx0 = ow.add_sad_penalty(1.0, track_momentum=0.5, track_threshold=0.0)
  u, _ = tx0.update(g, tx0.init(w0), w0)
  np.testing.assert_array_equal(np.asarray(u), np.zeros((1, 2)))


# ---------------------------------------------------------------------------
# Hyperparameter checks: NaN, Inf and out-of-range values are errors.


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dampen_weight=float("nan")), "dampen_weight=nan is not a finite number"),
    (dict(dampen_weight=float("inf")), "dampen_weight=inf is not a finite number"),
    (dict(dampen_weight=np.float32("nan")), "dampen_weight=nan is not a finite number"),
    (dict(dampen_weight=-2e-5), "dampen_weight=-2e-05 is out of range"),
    (dict(track_momentum=float("nan")), "track_momentum=nan is not a finite number"),
    (dict(track_momentum=1.0), r"track_momentum=1.0 is out of range; it must lie in \[0, 1\)"),
    (dict(track_momentum=-float("inf")), "track_momentum=-inf is not a finite number"),
    (dict(track_threshold=float("nan")), "track_threshold=nan is not a finite number"),
    (dict(track_threshold=float("inf")), "track_threshold=inf is not a finite number"),
    (dict(track_threshold=-1e-4), "track_threshold=-0.0001 is out of range"),
])
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, expected):
  with pytest.raises(ValueError, match=expected) as error:
    ow.add_sad_penalty(**kwargs)
  (name,) = kwargs
  assert str(error.value).startswith("add_sad_penalty: ")
  assert "the release uses" in str(error.value)  # the fix
  assert error.value.argument == name


def test_dampen_weight_schedule_checked_at_init_for_step_zero():
  w = jnp.ones((3, 4))
  tx = ow.add_sad_penalty(lambda count: jnp.inf + 0.0 * count)
  with pytest.raises(ValueError, match=r"dampen_weight \(a schedule, at step 0\)=inf"):
    tx.init(w)
  good = ow.add_sad_penalty(optax.constant_schedule(0.1))
  u, _ = good.update(jnp.zeros((3, 4)), good.init(w), w)
  np.testing.assert_allclose(np.asarray(u), 0.1 * np.ones((3, 4)), rtol=1e-7)


def test_ovsw_chain_rejects_bad_values():
  with pytest.raises(ValueError, match="scale_by_ags: delta=nan"):
    ow.ovsw(delta=float("nan"))
  with pytest.raises(ValueError, match="add_sad_penalty: dampen_weight=nan"):
    ow.ovsw(dampen_weight=float("nan"))
