"""The wheel: what it carries, and that an install without a checkout runs the default config."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT, module_command

pytestmark = pytest.mark.slow  # builds a wheel and trains in a subprocess

# What a build needs from the checkout; nothing else is copied.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ovsw_jax", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  for name in SOURCES:
    copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
    copy(ROOT / name, src / name)
  out = tmp_path_factory.mktemp("dist")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(out), str(src)], check=True, timeout=300)
  (path,) = out.glob("ovsw_jax-*.whl")
  return path


def test_wheel_carries_every_package_the_configs_and_the_license(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  packages = {p.parent.relative_to(ROOT).as_posix()
              for p in (ROOT / "ovsw_jax").rglob("__init__.py")}
  for package in packages:
    assert f"{package}/__init__.py" in names, package
  configs = {f"ovsw_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
  assert configs <= names
  assert not any(n.startswith(("configs/", "tests/", "examples/")) for n in names)
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_wheel_requires_only_the_core_stack(wheel):
  with zipfile.ZipFile(wheel) as zf:
    meta = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
  core = [line.split(":", 1)[1].strip() for line in meta.splitlines()
          if line.startswith("Requires-Dist:") and "extra ==" not in line]
  assert sorted(r.split(">")[0].split("=")[0].strip() for r in core) == [
      "flax", "jax", "numpy", "optax"]
  import ovsw_jax
  assert f"Version: {ovsw_jax.__version__}" in meta


def test_installed_package_runs_its_default_config_outside_a_checkout(wheel, tmp_path):
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  # The smoke run's model and batches (its programs are in the suite's compilation cache).
  proc = module_command(
      "ovsw_jax.main", ["--workdir=wd", "--config.model=tiny", "--config.num_train_steps=3",
                        "--config.batch_size=8", "--config.eval_batch_size=8",
                        "--config.log_every_steps=1", "--config.checkpoint_every_steps=3"],
      cwd=tmp_path, pythonpath=site)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert (tmp_path / "wd" / "checkpoints" / "3").is_dir(), out


# A user's code outside the checkout: the wheel alone on the path, no TensorFlow imported.
USER_SCRIPT = '''
import sys
import flax.linen as nn
import jax, jax.numpy as jnp, optax
from flax import nnx
import ovsw_jax as ow

x = jax.random.normal(jax.random.key(0), (32, 6, 6, 2))
y = (x.mean((1, 2, 3)) > 0).astype(jnp.int32)

class Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = ow.QuantConv(8, (3, 3), kernel_quantizer="ternary", name="conv")(x)
    x = ow.QuantDense(8, kernel_quantizer="uniform4", name="four")(x.mean((1, 2)))
    x = ow.QuantDense(8, name="sign")(nn.relu(x))
    return nn.Dense(2, name="head")(x)

class Nnx(nnx.Module):
  def __init__(self, rngs):
    self.conv = ow.nnx.QuantConv(2, 8, (3, 3), kernel_quantizer="ternary", rngs=rngs)
    self.four = ow.nnx.QuantDense(8, 8, kernel_quantizer="uniform4", rngs=rngs)
    self.sign = ow.nnx.QuantDense(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)
  def __call__(self, x):
    return self.head(self.sign(nnx.relu(self.four(self.conv(x).mean((1, 2))))))

def tracked(state):
  """{kernel: bit-planes of its packed levels}: every tracked leaf, by SAD's state."""
  leaves = jax.tree_util.tree_flatten_with_path(optax.tree.get(state, "prev_signs"))[0]
  return {ow.naming.path_name(ow.naming.parameter_path(p)): v.shape[0] for p, v in leaves}

for base in (optax.sgd(0.05, momentum=0.9), optax.adam(1e-2)):
  model = Linen()
  params = model.init(jax.random.key(1), x)["params"]
  tx = optax.chain(ow.ovsw(0.04, 9e-4, levels=ow.kernel_quantizers(model, x)), base)
  state = tx.init(params)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, x), y).mean()

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(20):
    params, state, value = step(params, state)
    losses.append(float(value))
  print("linen", tracked(state), losses[-1] < losses[0])
  net = Nnx(nnx.Rngs(1))
  opt = nnx.Optimizer(net, optax.chain(
      ow.ovsw(0.04, 9e-4, levels=ow.nnx.kernel_quantizers(net)), base), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(net, opt):
    value, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(net)
    opt.update(net, grads)
    return value

  losses = [float(nnx_step(net, opt)) for _ in range(20)]
  print("nnx", tracked(opt.opt_state), losses[-1] < losses[0])
print("tensorflow loaded:", "tensorflow" in sys.modules)
'''


def test_a_users_quantized_models_train_with_ovsw_from_the_wheel_alone(wheel, tmp_path):
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  (tmp_path / "user.py").write_text(USER_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(site))
  out = subprocess.run([sys.executable, "user.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  # Exactly the quantized kernels are tracked (the head is not), each by its levels' planes
  # (2 for ternary and sign, 4 for 4 bits), and the loss went down, with SGD and with Adam.
  kernels = "{'conv/latent_kernel': 2, 'four/latent_kernel': 4, 'sign/latent_kernel': 2} True"
  assert out.stdout.splitlines() == [f"linen {kernels}", f"nnx {kernels}"] * 2 + [
      "tensorflow loaded: False"], out.stdout
