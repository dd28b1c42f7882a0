"""Flip and silent-weight metrics against numpy on a small two-layer tree."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np

from ovsw_jax import metrics


def tree(seed, zeros=0.2):
  rs = np.random.RandomState(seed)
  out = {"conv": {"latent_kernel": rs.randn(3, 3, 2, 5).astype(np.float32)},
         "dense": {"latent_kernel": rs.randn(7, 3).astype(np.float32)},
         "bn": {"scale": rs.randn(5).astype(np.float32)}}
  for leaf in jax.tree.leaves(out):
    leaf.reshape(-1)[rs.rand(leaf.size) < zeros] = 0.0
  return out


MASK = {"conv": {"latent_kernel": True}, "dense": {"latent_kernel": True},
        "bn": {"scale": False}}


def as_jax(t):
  return jax.tree.map(jnp.asarray, t)


def test_step_flip_fraction_counts_sign_changes_of_masked_leaves():
  old, new = tree(0), tree(1)
  new["conv"]["latent_kernel"][0] = old["conv"]["latent_kernel"][0]
  got = jax.jit(lambda a, b: metrics.step_flip_fraction(a, b, MASK))(as_jax(old), as_jax(new))
  changed = sum(int(np.sum(np.sign(old[k]["latent_kernel"]) != np.sign(new[k]["latent_kernel"])))
                for k in ("conv", "dense"))
  np.testing.assert_allclose(float(got), changed / (90 + 21), rtol=1e-6)


@pytest.mark.slow
def test_silent_and_flip_ratios_follow_the_sign_history():
  steps = [tree(s) for s in range(4)]
  flips = metrics.init_flip_state(as_jax(steps[0]), MASK)
  for params in steps[1:]:
    flips = metrics.update_flip_state(flips, as_jax(params), MASK)
  last = as_jax(steps[-1])
  silent = metrics.silent_ratio(flips, last, MASK)
  ratio = metrics.flip_ratio(flips, last, MASK)
  total_never, total_flip = 0, 0
  for k in ("conv", "dense"):
    init = np.sign(steps[0][k]["latent_kernel"])
    ever = np.zeros(init.shape, bool)
    for params in steps[1:]:
      ever |= np.sign(params[k]["latent_kernel"]) != init
    never = int(np.sum(~ever))
    flipped = int(np.sum(np.sign(steps[-1][k]["latent_kernel"]) != init))  # interval = start
    np.testing.assert_allclose(float(silent[f"silent_ratio/{k}"]), never / init.size, rtol=1e-6)
    np.testing.assert_allclose(float(ratio[f"flip_ratio/{k}"]), flipped / init.size, rtol=1e-6)
    total_never, total_flip = total_never + never, total_flip + flipped
  np.testing.assert_allclose(float(silent["silent_ratio"]), total_never / 111, rtol=1e-6)
  np.testing.assert_allclose(float(ratio["flip_ratio"]), total_flip / 111, rtol=1e-6)
  assert 0 < total_never < 111 and 0 < total_flip < 111
