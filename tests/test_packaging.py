"""The wheel: what it carries, and that an install without a checkout runs the default config."""

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
