"""The synthetic mechanism study (ovsw_jax/repro/mechanism.py) against NumPy formulas.

The release's binary layer's gradient, the magnitude-dependent transform, and a
few training steps are recomputed here in float64 NumPy; the summaries are
checked against NumPy means and standard deviations.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ovsw_jax.repro import mechanism as mech

D_IN, D_OUT = 16, 4


def np_alpha(w):
  """The release's per-channel scale: mean |standardised channel| (unbiased variance)."""
  z = (w - w.mean(0)) / np.sqrt(w.var(0, ddof=1) + 1e-5)
  return np.abs(z).mean(0)


def np_forward(w, x):
  return x @ (np.sign(w) * np_alpha(w)) / math.sqrt(w.shape[0])


def np_grad(w, x, teacher):
  """The straight-through gradient of the MSE: d/dsign(w) times alpha (no gradient in alpha)."""
  y, t = np_forward(w, x), np_forward(teacher, x)
  dy = 2.0 * (y - t) / y.size
  return (x.T @ dy) / math.sqrt(w.shape[0]) * np_alpha(w)


def problem():
  w0, teacher, key = mech.problem(3, D_IN, D_OUT)
  return np.asarray(w0, np.float64), np.asarray(teacher, np.float64), key


def test_the_loss_gradient_is_the_straight_through_one():
  w, teacher, key = problem()
  x = np.asarray(mech.batch(key, 0, D_IN, 32), np.float64)
  got = jax.grad(mech.loss_fn)(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32),
                               jnp.asarray(teacher, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np_grad(w, x, teacher), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("power,floor", [(0.0, False), (0.5, False), (1.0, False), (1.0, True)])
def test_scale_by_magnitude_matches_its_formula(power, floor):
  w, _, _ = problem()
  g = np.random.default_rng(0).normal(size=w.shape)
  r = np.abs(w) / np.abs(w).mean(0)
  m = (np.maximum(r, 1.0) if floor else r) ** power
  want = g * m / m.mean(0)
  tx = mech.scale_by_magnitude(power, floor)
  got, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(w), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  if power == 0:  # the release's gradient, untouched
    np.testing.assert_allclose(np.asarray(got), g, rtol=1e-6)


def test_a_few_steps_of_sgd_match_numpy_and_the_never_flipped_mask_follows():
  w0, teacher, key = problem()
  steps, size, lr, mom = 5, 8, 0.5, mech.MOMENTUM  # a large rate, so that signs change
  transforms = {"sgd": optax.sgd(lr, momentum=mom)}
  r = mech.simulate("sgd", 3, steps=steps, size=size, d_in=D_IN, d_out=D_OUT,
                    transforms=transforms)
  w, trace, ever, moves = w0.copy(), np.zeros_like(w0), np.zeros(w0.shape, bool), []
  for t in range(steps):
    x = np.asarray(mech.batch(key, t, D_IN, size), np.float64)
    trace = np_grad(w, x, teacher) + mom * trace
    moves.append(np.abs(lr * trace).mean())
    w = w - lr * trace
    ever |= np.sign(w) != np.sign(w0)
  np.testing.assert_allclose(r["w"], w, rtol=1e-4, atol=1e-6)
  assert ever.any() and not ever.all()
  np.testing.assert_array_equal(r["ever_flipped"], ever)
  assert r["silent_ratio"] == pytest.approx(1 - ever.mean())
  wrong = np.sign(w0) != np.sign(teacher)
  assert r["wrong_stuck"] == pytest.approx((~ever)[wrong].mean())
  assert r["agreement"] == pytest.approx((np.sign(w) == np.sign(teacher)).mean())
  assert r["mean_step"] == pytest.approx(np.mean(moves), rel=1e-4)
  # Quintiles of |w0| / channel mean: each holds a fifth of the weights; their mean is the ratio.
  assert np.mean(r["silent_by_quintile"]) == pytest.approx(r["silent_ratio"], abs=0.02)


def test_summaries_are_means_and_sample_stds_over_seeds():
  rng = np.random.default_rng(1)
  results = [{"arm": arm, "seed": s, **{c: float(rng.random()) for c in mech.SUMMARY},
              "silent_by_quintile": list(rng.random(mech.QUINTILES))}
             for arm in ("a", "b") for s in range(3)]
  summary = mech.summarize(results)
  assert [r["arm"] for r in summary] == ["a", "b"]
  for row in summary:
    mine = [r for r in results if r["arm"] == row["arm"]]
    for col in mech.SUMMARY:
      v = [r[col] for r in mine]
      assert row[f"{col}_mean"] == pytest.approx(np.mean(v))
      assert row[f"{col}_std"] == pytest.approx(np.std(v, ddof=1))
    q5 = [r["silent_by_quintile"][4] for r in mine]
    assert row["silent_q5_mean"] == pytest.approx(np.mean(q5))
  md = mech.markdown(summary, {"max_abs_diff": 0.0, "max_abs_grad": 1.0,
                               "grad_weight_corr": 0.01})
  assert md.count("\n| a | 3 |") == 1 and "Gradient independence" in md


def test_gradient_independence_figures_are_what_they_say():
  g = mech.gradient_independence(0, D_IN, D_OUT)
  assert 0.0 <= g["max_abs_diff"] < g["max_abs_grad"]
  w = np.random.default_rng(2).normal(size=(50, 3))
  assert mech.magnitude_correlation(np.abs(w) * 2.0, w) == pytest.approx(1.0)
  assert math.isnan(mech.magnitude_correlation(np.zeros_like(w), w))
