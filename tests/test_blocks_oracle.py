"""Residual blocks against the authors' PyTorch release (docs/method.md §5, §6).

Each oracle file holds one training-mode forward and backward of one of the
release's own blocks with given parameters (see tests/data/oracle/README.md). The
Flax block is loaded with those parameters and must reproduce the output, the
input gradient, every parameter gradient and the BatchNorm running statistics.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_oracle
from ovsw_jax.models import BasicBlockCifar, BasicBlockImageNet

# XLA's CPU optimisation passes dominate these tests' run time (many small
# programs, each run once); turning them down changes no result.
_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


# The release's block -> the Flax block built with the same shapes.
BLOCKS = {
    "r20_down": lambda: BasicBlockCifar(32, strides=2),
    "r20_same": lambda: BasicBlockCifar(16, strides=1),
    "r18in_down": lambda: BasicBlockImageNet(32, strides=2),
}

# Torch's `downsample` is an nn.Sequential: index 0 the conv, 1 the BatchNorm.
_SEQUENTIAL = {"0": "conv", "1": "bn"}
# Torch leaf name -> the Flax leaf names it may be, depending on the layer.
_LEAF = {"weight": ("latent_kernel", "kernel", "scale"), "bias": ("bias",),
         "running_mean": ("mean",), "running_var": ("var",)}


def _flax_path(tree: dict, torch_name: str) -> tuple[str, ...]:
  """The path in `tree` of the release's `a/b/leaf` (fails if there is none)."""
  *modules, leaf = torch_name.split("/")
  path, node = [], tree
  for i, part in enumerate(modules):
    if i > 0 and modules[i - 1] == "downsample":
      part = _SEQUENTIAL[part]
    path.append(part)
    node = node[part]
  matches = [name for name in _LEAF[leaf] if name in node]
  assert len(matches) == 1, f"{torch_name}: no unique Flax leaf in {list(node)}"
  return tuple(path) + (matches[0],)


def _get(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _set(tree, path, value):
  for part in path[:-1]:
    tree = tree[part]
  assert tree[path[-1]].shape == value.shape, (path, tree[path[-1]].shape, value.shape)
  tree[path[-1]] = jnp.asarray(value)


def _assert_close(actual, expected, what, rtol=1e-5, atol=1e-5):
  """Float32 agreement, the absolute part scaled to the array's magnitude."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale,
                             err_msg=what)


@pytest.mark.parametrize("case", sorted(BLOCKS))
def test_block_matches_release(case):
  data = load_oracle(f"block_{case}_public")
  block = BLOCKS[case]()
  x, dy = jnp.asarray(data["x"]), jnp.asarray(data["dy"])
  # Shapes only (nothing runs); every value then comes from the oracle.
  shapes = jax.eval_shape(
      lambda x: block.init(jax.random.key(0), x, train=True), x)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])
  # Torch's initial running statistics: mean 0, var 1 (Flax's too).
  batch_stats = flax.traverse_util.unflatten_dict({
      path: (np.zeros if path[-1] == "mean" else np.ones)(s.shape, s.dtype)
      for path, s in flax.traverse_util.flatten_dict(shapes["batch_stats"]).items()})

  # Every Flax parameter is loaded from the oracle, and nothing is left over.
  names = sorted(k[len("param:"):] for k in data if k.startswith("param:"))
  paths = {name: _flax_path(params, name) for name in names}
  assert len(paths) == len(jax.tree.leaves(params))
  for name, path in paths.items():
    _set(params, path, data["param:" + name])

  @_jit
  def step(params, x, dy):
    def forward(params, x):
      return block.apply({"params": params, "batch_stats": batch_stats}, x,
                         train=True, mutable=["batch_stats"])
    y, vjp, updates = jax.vjp(forward, params, x, has_aux=True)
    grads, dx = vjp(dy)
    return y, updates, grads, dx

  y, updates, grads, dx = step(params, x, dy)
  _assert_close(y, data["y"], "y")
  _assert_close(dx, data["dx"], "dx")
  for name, path in paths.items():
    _assert_close(_get(grads, path), data["grad:" + name], "grad:" + name)

  # Running statistics after one step from torch's defaults (mean 0, var 1),
  # torch momentum 0.1. Torch folds in the unbiased batch variance, Flax the
  # biased one: undo Bessel's correction on the oracle's batch-variance term.
  n = x.shape[0] * y.shape[1] * y.shape[2]
  stats = [k[len("stat:"):] for k in data if k.startswith("stat:")]
  assert len(stats) == len(jax.tree.leaves(updates["batch_stats"]))
  for name in stats:
    actual = _get(updates["batch_stats"], _flax_path(updates["batch_stats"], name))
    expected = data["stat:" + name]
    if name.endswith("running_var"):
      batch_var_unbiased = (expected - 0.9) / 0.1
      expected = 0.9 + 0.1 * batch_var_unbiased * (n - 1) / n
    _assert_close(actual, expected, "stat:" + name)
