"""README's "OvSW in your own model" examples: each trains, OvSW acting on its binary kernels."""

import importlib.util
import re

import jax
import numpy as np
import optax
import pytest

import ovsw_jax as ow

from helpers import ROOT

# Example -> the leaves its OvSW state must cover: its binary kernels, nothing else.
BINARY_KERNELS = {
    "linen_model": {"BinaryConv_0/latent_kernel", "BinaryConv_1/latent_kernel"},
    "nnx_model": {"bin1/latent_kernel", "bin2/latent_kernel"},
    "plain_jax": {"bin1", "bin2"},
}
EXAMPLES = sorted(BINARY_KERNELS)
TERNARY_KERNELS = {"QuantDense_0/latent_kernel", "QuantDense_1/latent_kernel"}


def load_example(name):
  path = ROOT / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"example_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def leaf_paths(tree):
  """`/`-joined names of the array leaves (nnx's trailing `.value` dropped)."""
  names = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    names.add("/".join(k for k in keys if k != "value"))
  return names


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_trains_with_ovsw_on_the_binary_kernels(name):
  _, state, losses = load_example(name).main(steps=60)
  if name == "nnx_model":
    state = state.opt_state  # the nnx.Optimizer
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]
  binary = BINARY_KERNELS[name]
  tracker = optax.tree.get(state, "tracker")
  assert leaf_paths(tracker) == binary
  assert leaf_paths(optax.tree.get(state, "scaled_fraction")) == binary
  # Weights flipped sign during the run: SAD's flip tracker moved off zero.
  assert max(float(np.max(leaf)) for leaf in jax.tree.leaves(tracker)) > 0


@pytest.mark.slow
def test_the_ternary_mlp_learns_and_ovsw_tracks_its_ternary_levels():
  params, state, losses, accuracy = load_example("ternary_mlp").main(steps=150)
  assert losses[-1] < 0.3 * losses[0] and accuracy >= 0.9, (losses[-1], accuracy)
  tracker = optax.tree.get(state, "tracker")
  assert leaf_paths(tracker) == TERNARY_KERNELS  # the head and the biases are not tracked
  # Levels moved (SAD's tracker is off zero), and by ternary levels: a weight the
  # tracker saw flip at the last step changed its level there, not necessarily its sign.
  assert max(float(np.max(leaf)) for leaf in jax.tree.leaves(tracker)) > 0
  kernel = params["QuantDense_0"]["latent_kernel"]
  levels = np.asarray(ow.quantizers.get("ternary").levels(kernel))
  assert set(np.unique(levels)) == {-1, 0, 1}


@pytest.mark.parametrize("name", EXAMPLES + ["ternary_mlp"])
def test_readme_shows_the_example_as_it_is(name):
  code = (ROOT / "examples" / f"{name}.py").read_text()
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  assert code in blocks, f"README.md must quote examples/{name}.py verbatim"
