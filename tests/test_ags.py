"""Adaptive Gradient Scaling (`scale_by_ags`) against numpy and the release's vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ovsw_jax as ow

from helpers import load_oracle


def ags_ref(g, w, delta, axis=-1, grad_eps=1e-6, param_eps=1e-3):
  """AGS (paper Eq. 6, docs/method.md §2) in float64.

  Returns (scaled gradient, per-channel 'scaled' flags).
  """
  g64 = np.moveaxis(np.asarray(g, np.float64), axis, -1)
  w64 = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  c = g64.shape[-1]
  gn = np.maximum(np.sqrt((g64.reshape(-1, c) ** 2).sum(0)), grad_eps)
  pn = np.maximum(np.sqrt((w64.reshape(-1, c) ** 2).sum(0)), param_eps)
  scaled = gn / pn < delta
  out = np.where(scaled, g64 * delta * pn / gn, g64)
  return np.moveaxis(out, -1, axis), scaled


def channel_norms(x, axis=-1):
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  return np.sqrt((x.reshape(-1, x.shape[-1]) ** 2).sum(0))


def mixed_case(seed=0, delta=0.04, shape=(3, 3, 4, 8)):
  """Weights and gradients whose per-channel ratio ||g|| / ||w|| sits on both sides of delta.

  Channel 0: zero gradient; 1: gradient below grad_eps; 2: zero weights (pn clamps
  to param_eps); others: ratios spread from 1e-3 * delta to 20 * delta.
  """
  rs = np.random.RandomState(seed)
  c = shape[-1]
  w = rs.randn(*shape).astype(np.float32) * rs.uniform(0.05, 1.0, size=c).astype(np.float32)
  g = rs.randn(*shape).astype(np.float32)
  target = delta * np.array([1.0, 1.0, 1.0, 1e-3, 0.5, 0.9, 2.0, 20.0])[:c]
  g = g / channel_norms(g) * target * channel_norms(w)
  g[..., 0] = 0.0
  g[..., 1] = g[..., 1] / channel_norms(g)[1] * 1e-8
  w[..., 2] = 0.0
  g[..., 2] = g[..., 2] / channel_norms(g)[2] * 1e-5
  return g.astype(np.float32), w.astype(np.float32)


def run_steps(tx, grads, params, jit=False):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params[0])
  outs = []
  for g, w in zip(grads, params):
    u, state = update(g, state, w)
    outs.append(u)
  return outs, state


def test_matches_numpy_on_channels_above_and_below_delta():
  delta = 0.04
  g, w = mixed_case(delta=delta)
  ref, scaled = ags_ref(g, w, delta)
  # The case really covers both branches, and the clamps. A zero gradient's norm
  # clamps to grad_eps, so its channel counts as scaled (and stays zero).
  np.testing.assert_array_equal(scaled, [True, True, True, True, True, True, False, False])
  tx = ow.scale_by_ags(delta)
  params = jnp.asarray(w)
  u, state = tx.update(jnp.asarray(g), tx.init(params), params)
  assert u.dtype == jnp.float32 and u.shape == g.shape
  np.testing.assert_allclose(np.asarray(u), ref, rtol=2e-6, atol=1e-12)
  u = np.asarray(u)
  # Channels at or above delta are untouched, bit for bit.
  np.testing.assert_array_equal(u[..., ~scaled], g[..., ~scaled])
  # Scaled channels reach norm delta * max(||w||, 1e-3).
  pn = np.maximum(channel_norms(w), 1e-3)
  for o in [3, 4, 5]:
    np.testing.assert_allclose(channel_norms(u)[o], delta * pn[o], rtol=1e-5)
  # Channel 2 (zero weights): scaled to delta * 1e-3.
  np.testing.assert_allclose(channel_norms(u)[2], delta * 1e-3, rtol=1e-5)
  # Channel 1 (||g|| = 1e-8 < grad_eps): factor delta * pn / 1e-6, as the release.
  np.testing.assert_allclose(channel_norms(u)[1], delta * pn[1] * 1e-2, rtol=1e-4)
  np.testing.assert_allclose(float(state.scaled_fraction), scaled.mean(), rtol=1e-7)
  assert int(state.count) == 1


def test_zero_gradient_channel_stays_exactly_zero():
  g, w = mixed_case(3)
  g[..., 5] = 0.0
  params = jnp.asarray(w)
  tx = ow.scale_by_ags(0.04)
  for update in [tx.update, jax.jit(tx.update)]:
    u, _ = update(jnp.asarray(g), tx.init(params), params)
    u = np.asarray(u)
    assert np.all(np.isfinite(u))
    assert np.all(u[..., 0] == 0) and np.all(u[..., 5] == 0)
  # An all-zero gradient, also with all-zero weights.
  for wz in [w, np.zeros_like(w)]:
    u, _ = tx.update(jnp.zeros(g.shape), tx.init(jnp.asarray(wz)), jnp.asarray(wz))
    np.testing.assert_array_equal(np.asarray(u), np.zeros(g.shape))


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("jit", [False, True])
def test_teacher_forced_against_oracle(case, jit):
  d = load_oracle(f"ovsw_steps_public_{case}")
  tx = ow.scale_by_ags(float(d["delta"]))
  outs, state = run_steps(tx, list(d["g_raw"]), list(d["w"]), jit=jit)
  for t, u in enumerate(outs):
    expected = d["g_ags"][t]
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max(), err_msg=f"step {t}")
  assert int(state.count) == len(outs)


@pytest.mark.parametrize("case", [0, 1])
def test_numpy_reference_matches_oracle(case):
  # Guards the numpy model used by the other tests.
  d = load_oracle(f"ovsw_steps_public_{case}")
  any_scaled = False
  for t in range(d["w"].shape[0]):
    ref, scaled = ags_ref(d["g_raw"][t], d["w"][t], float(d["delta"]))
    any_scaled |= scaled.any()
    np.testing.assert_allclose(ref, d["g_ags"][t], rtol=1e-5, atol=1e-6 * np.abs(ref).max())
  assert any_scaled


def test_axis_argument_pytorch_layout():
  g, w = mixed_case(5)
  delta = 0.04
  tx_hwio = ow.scale_by_ags(delta)
  tx_oihw = ow.scale_by_ags(delta, axis=0)
  to_oihw = lambda a: np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1)))
  u_hwio, s_hwio = tx_hwio.update(jnp.asarray(g), tx_hwio.init(jnp.asarray(w)), jnp.asarray(w))
  w_o, g_o = jnp.asarray(to_oihw(w)), jnp.asarray(to_oihw(g))
  u_oihw, s_oihw = tx_oihw.update(g_o, tx_oihw.init(w_o), w_o)
  np.testing.assert_allclose(np.asarray(u_oihw), to_oihw(np.asarray(u_hwio)), rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(u_oihw), ags_ref(to_oihw(g), to_oihw(w), delta, axis=0)[0],
                             rtol=2e-6, atol=1e-12)
  assert float(s_oihw.scaled_fraction) == float(s_hwio.scaled_fraction)
  # Dense kernels (in, out) with axis=-1, and axis=1 on a 2-D array.
  g2, w2 = g.reshape(-1, 8), w.reshape(-1, 8)
  for axis in (-1, 1):
    tx = ow.scale_by_ags(delta, axis=axis)
    u, _ = tx.update(jnp.asarray(g2), tx.init(jnp.asarray(w2)), jnp.asarray(w2))
    np.testing.assert_allclose(np.asarray(u), ags_ref(g2, w2, delta)[0], rtol=2e-6, atol=1e-12)


def test_delta_schedule():
  g, w = mixed_case(7)
  schedule = optax.piecewise_constant_schedule(0.004, {1: 10.0, 2: 10.0})  # 0.004, 0.04, 0.4
  tx = ow.scale_by_ags(schedule)
  params = jnp.asarray(w)
  state = tx.init(params)
  for t, delta in enumerate([0.004, 0.04, 0.4]):
    u, state = tx.update(jnp.asarray(g), state, params)
    ref, scaled = ags_ref(g, w, delta)
    np.testing.assert_allclose(np.asarray(u), ref, rtol=2e-6, atol=1e-12, err_msg=f"step {t}")
    np.testing.assert_allclose(float(state.scaled_fraction), scaled.mean())
  # And the schedule under jit.
  state = tx.init(params)
  update = jax.jit(tx.update)
  for delta in [0.004, 0.04, 0.4]:
    u, state = update(jnp.asarray(g), state, params)
    np.testing.assert_allclose(np.asarray(u), ags_ref(g, w, delta)[0], rtol=2e-6, atol=1e-12)


def _inject_vs_plain(jit):
  g, w = mixed_case(9)
  rs = np.random.RandomState(0)
  grads = [jnp.asarray(g * rs.uniform(0.5, 2.0)) for _ in range(3)]
  params = [jnp.asarray(w + 0.01 * t) for t in range(3)]
  plain, _ = run_steps(ow.scale_by_ags(0.04), grads, params, jit=jit)
  injected_tx = optax.inject_hyperparams(ow.scale_by_ags)(delta=0.04)
  injected, state = run_steps(injected_tx, grads, params, jit=jit)
  for a, b in zip(plain, injected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(float(state.hyperparams["delta"]), 0.04, rtol=1e-7)


def test_inject_hyperparams_identical_updates():
  _inject_vs_plain(jit=False)


def test_inject_hyperparams_identical_updates_under_jit():
  # inject_hyperparams turns every numeric argument (with its default) into a
  # traced array in the jitted update, `axis` included.
  _inject_vs_plain(jit=True)


def test_inject_hyperparams_changes_delta_at_run_time():
  g, w = mixed_case(2)
  tx = optax.inject_hyperparams(ow.scale_by_ags)(delta=0.04)
  params = jnp.asarray(w)
  state = tx.init(params)
  state.hyperparams["delta"] = jnp.asarray(0.4, jnp.float32)
  u, _ = tx.update(jnp.asarray(g), state, params)
  np.testing.assert_allclose(np.asarray(u), ags_ref(g, w, 0.4)[0], rtol=2e-6, atol=1e-12)


def test_under_jit_matches_numpy():
  g, w = mixed_case(11)
  tx = ow.scale_by_ags(0.04)
  params = {"a": jnp.asarray(w), "b": jnp.asarray(w[..., :3] * 2)}
  grads = {"a": jnp.asarray(g), "b": jnp.asarray(g[..., :3])}
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(u["a"]), ags_ref(g, w, 0.04)[0], rtol=2e-6, atol=1e-12)
  np.testing.assert_allclose(np.asarray(u["b"]), ags_ref(g[..., :3], w[..., :3] * 2, 0.04)[0],
                             rtol=2e-6, atol=1e-12)


def test_bf16_gradients_keep_dtype():
  g, w = mixed_case(13)
  gb = jnp.asarray(g, jnp.bfloat16)
  for wb in [jnp.asarray(w), jnp.asarray(w, jnp.bfloat16)]:
    tx = ow.scale_by_ags(0.04)
    u, _ = tx.update(gb, tx.init(wb), wb)
    assert u.dtype == jnp.bfloat16
    ref = ags_ref(np.asarray(gb, np.float32), np.asarray(wb, np.float32), 0.04)[0]
    np.testing.assert_allclose(np.asarray(u, np.float32), ref, rtol=2e-2, atol=1e-12)
    assert np.all(np.asarray(u, np.float32)[..., 0] == 0)


def test_errors():
  w = jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError):
    ow.scale_by_ags(-0.01)
  tx = ow.scale_by_ags(0.01)
  with pytest.raises(ValueError):
    tx.init({"w": w, "bias": jnp.ones((4,))})
  with pytest.raises(ValueError):
    tx.init(jnp.ones(()))
  state = tx.init(w)
  with pytest.raises(ValueError):
    tx.update(w, state)
  with pytest.raises(ValueError):
    tx.update(w, state, None)
  with pytest.raises(ValueError):
    tx.update(jnp.ones((4,)), state, jnp.ones((4,)))


def test_scaled_fraction_per_leaf_matches_numpy():
  rs = np.random.RandomState(4)
  params, grads, expected = {}, {}, {}
  for name, (shape, frac) in {"conv1": ((3, 3, 2, 8), 0.25), "conv2": ((1, 1, 4, 5), 0.6),
                              "dense": ((6, 10), 0.0)}.items():
    w = rs.randn(*shape).astype(np.float32)
    c = shape[-1]
    n_small = int(round(frac * c))
    ratio = np.where(np.arange(c) < n_small, 0.001, 1.0)
    g = rs.randn(*shape).astype(np.float32)
    g = (g / channel_norms(g) * ratio * channel_norms(w)).astype(np.float32)
    params[name], grads[name] = jnp.asarray(w), jnp.asarray(g)
    expected[name] = ags_ref(g, w, 0.01)[1].mean()
    assert expected[name] == n_small / c
  tx = ow.scale_by_ags(0.01)
  _, state = tx.update(grads, tx.init(params), params)
  fractions = optax.tree.get(state, "scaled_fraction")
  for name in params:
    assert fractions[name].dtype == jnp.float32 and fractions[name].shape == ()
    np.testing.assert_allclose(float(fractions[name]), expected[name], rtol=1e-7)
    np.testing.assert_allclose(float(state.scaled_fraction[name]), expected[name], rtol=1e-7)


def test_tuple_and_list_params():
  g, w = mixed_case(17)
  g2, w2 = g[..., :5] * 3, w[..., :5] + 1
  tx = ow.scale_by_ags(0.04)
  for container in (tuple, list):
    params = container([jnp.asarray(w), jnp.asarray(w2)])
    grads = container([jnp.asarray(g), jnp.asarray(g2)])
    u, state = tx.update(grads, tx.init(params), params)
    assert isinstance(u, container) and len(u) == 2
    np.testing.assert_allclose(np.asarray(u[0]), ags_ref(g, w, 0.04)[0], rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(u[1]), ags_ref(g2, w2, 0.04)[0], rtol=2e-6, atol=1e-12)


def test_mask_leaves_other_leaves_untouched():
  g, w = mixed_case(19)
  params = {"conv": {"latent_kernel": jnp.asarray(w)}, "bn": {"scale": jnp.ones((8,))},
            "head": {"kernel": jnp.asarray(w.reshape(-1, 8))}}
  grads = {"conv": {"latent_kernel": jnp.asarray(g)}, "bn": {"scale": jnp.full((8,), 1e-9)},
           "head": {"kernel": jnp.asarray(g.reshape(-1, 8))}}
  tx = ow.scale_by_ags(0.04, mask=ow.binary_weight_mask)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(u["conv"]["latent_kernel"]), ags_ref(g, w, 0.04)[0],
                             rtol=2e-6, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(u["bn"]["scale"]), np.asarray(grads["bn"]["scale"]))
  np.testing.assert_array_equal(np.asarray(u["head"]["kernel"]), g.reshape(-1, 8))


# ---------------------------------------------------------------------------
# Hyperparameter checks: NaN, Inf, negative values and foreign axes are errors.


@pytest.mark.parametrize("delta, problem", [
    (float("nan"), "not a finite number"), (float("inf"), "not a finite number"),
    (-float("inf"), "not a finite number"), (-0.01, "out of range"),
    (np.float32("nan"), "not a finite number"), (np.array(-1.0), "out of range")])
def test_bad_delta_is_rejected_at_construction(delta, problem):
  with pytest.raises(ValueError, match=problem) as error:
    ow.scale_by_ags(delta)
  message = str(error.value)
  assert message.startswith(f"scale_by_ags: delta={delta}")
  assert "[0, inf)" in message and "0.01 (ImageNet)" in message  # the range and the fix
  assert isinstance(error.value, ow.optim.HyperparameterError)
  assert error.value.argument == "delta"


def test_bad_eps_are_rejected():
  with pytest.raises(ValueError, match=r"grad_eps=0.0 is out of range; it must lie in \(0, inf\)"):
    ow.scale_by_ags(0.01, grad_eps=0.0)
  with pytest.raises(ValueError, match="param_eps=nan is not a finite number"):
    ow.scale_by_ags(0.01, param_eps=float("nan"))
  ow.scale_by_ags(0.0, param_eps=0.0)  # the bounds are allowed


def test_delta_schedule_checked_at_init_for_step_zero():
  w = jnp.ones((3, 3, 2, 4))
  tx = ow.scale_by_ags(lambda count: jnp.nan * count)  # Constructing it cannot tell.
  with pytest.raises(ValueError, match=r"delta \(a schedule, at step 0\)=nan"):
    tx.init(w)
  tx = ow.scale_by_ags(lambda count: -0.01 + 0.0 * count)
  with pytest.raises(ValueError, match="out of range"):
    tx.init(w)
  good = ow.scale_by_ags(optax.linear_schedule(0.1, 0.0, 10))
  jax.jit(good.init)(w)  # Traced at init: passes unchecked.
  u, _ = good.update(jnp.full_like(w, 1e-4), good.init(w), w)
  np.testing.assert_allclose(np.asarray(u), ags_ref(np.full(w.shape, 1e-4), np.ones(w.shape),
                                                    0.1)[0], rtol=2e-6)


def test_inject_hyperparams_values_are_not_checked_and_trace():
  # Injected values are JAX arrays (traced under jit): they cannot be checked
  # where the transform is built, and checking must not break tracing.
  g, w = mixed_case(3)
  tx = optax.inject_hyperparams(ow.scale_by_ags)(delta=0.04)
  state = jax.jit(tx.init)(jnp.asarray(w))
  u, _ = jax.jit(tx.update)(jnp.asarray(g), state, jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(u), ags_ref(g, w, 0.04)[0], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("axis", [4, 7, -5])
def test_out_of_range_axis_is_an_error_at_init(axis):
  tx = ow.scale_by_ags(0.01, axis=axis)
  with pytest.raises(ValueError) as error:
    tx.init({"w": jnp.ones((3, 3, 2, 4))})
  message = str(error.value)
  assert f"axis={axis} is out of range for a parameter of shape (3, 3, 2, 4)" in message
  assert "valid axes are -4..3" in message


def test_out_of_range_axis_is_an_error_at_update():
  # A state made for rank-4 kernels, then a rank-2 gradient: axis 3 would wrap to 1.
  tx = ow.scale_by_ags(0.01, axis=3)
  state = tx.init(jnp.ones((3, 3, 2, 4)))
  with pytest.raises(ValueError, match=r"axis=3 is out of range .* valid axes are -2..1"):
    tx.update(jnp.ones((6, 4)), state, jnp.ones((6, 4)))
  for axis in (-4, 3):  # the ends of the range are fine
    tx = ow.scale_by_ags(0.01, axis=axis)
    tx.update(jnp.ones((3, 3, 2, 4)), tx.init(jnp.ones((3, 3, 2, 4))), jnp.ones((3, 3, 2, 4)))


def test_axis_must_be_a_static_int():
  with pytest.raises(ValueError, match="axis=1.5 must be a Python int"):
    ow.scale_by_ags(0.01, axis=1.5)
  g, w = mixed_case(5)
  params = jnp.asarray(np.moveaxis(w, -1, 0))
  grads = jnp.asarray(np.moveaxis(g, -1, 0))
  # Injected without static_args, the axis is traced under jit: say how to fix it.
  tx = optax.inject_hyperparams(ow.scale_by_ags)(delta=0.04, axis=0)
  with pytest.raises(ValueError, match=r"static_args=\('axis',\)"):
    jax.jit(tx.update)(grads, tx.init(params), params)
  tx = optax.inject_hyperparams(ow.scale_by_ags, static_args=("axis",))(delta=0.04, axis=0)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(np.asarray(u), ags_ref(grads, params, 0.04, axis=0)[0],
                             rtol=2e-6, atol=1e-12)
