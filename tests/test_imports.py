"""What importing the package pulls in: the library stays light, the Optax part stands alone."""

import subprocess
import sys

import pytest

from helpers import ROOT

TRAINER_ONLY = ("tensorflow", "tensorflow_datasets", "clu", "orbax", "ml_collections")


def modules_after(code: str) -> set[str]:
  """The top-level module names in `sys.modules` after running `code` in a fresh interpreter."""
  probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=120)
  return set(out.stdout.split())


def test_import_ovsw_jax_loads_no_trainer_stack():
  loaded = modules_after(
      "import ovsw_jax as ow\now.ovsw, ow.BinaryConv, ow.nnx.BinaryConv, ow.xnor_conv")
  assert "flax" in loaded  # the layers were really imported
  assert not loaded & set(TRAINER_ONLY), sorted(loaded & set(TRAINER_ONLY))


def test_optax_transforms_import_without_flax():
  loaded = modules_after("import ovsw_jax.optim\nimport ovsw_jax as ow\now.ovsw, ow.scale_by_ags")
  assert "optax" in loaded
  assert not loaded & {"flax", "ml_collections"}, sorted(loaded & {"flax", "ml_collections"})


def test_lazy_names_are_the_defining_modules_objects():
  import ovsw_jax as ow
  from ovsw_jax import layers, nnx, optim, quantizers
  assert ow.ovsw is optim.ovsw and ow.BinaryConv is layers.BinaryConv
  assert ow.ste_sign is quantizers.ste_sign and ow.nnx is nnx
  assert set(ow.__all__) <= set(dir(ow))
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    ow.no_such_name  # noqa: B018
