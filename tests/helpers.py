"""Helpers shared by the test modules (importable as `helpers`: see pyproject's pytest pythonpath).

- `load_oracle`: the reference vectors of the authors' PyTorch release, committed
  under `tests/data/oracle` (their README there says how they were made).
- `assert_close`: float32 agreement with a reference array.
- `release_float`: an oracle hyperparameter as the Python float the release was given.
- `load_config`: a config file of `configs/` by name or path, with its `:arg`.
- `module_command`: a `python -m MODULE` subprocess with this checkout importable.
- `signalled_after`, `final_state`: a run stopped by a signal mid-run, and the state a
  workdir's newest checkpoint holds (the in-process resume tests).
- `take`, `assert_batch_equal`: the first batches of an iterator (closed after), and
  two batches equal bit for bit (the input pipeline tests).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
ORACLE_DIR = pathlib.Path(__file__).resolve().parent / "data" / "oracle"
# Host CPU devices of the test process (tests/conftest.py) and, unless a test
# asks for another layout, of the processes it starts.
DEVICES = 4
# XLA's backend optimisation level 0, in the test process and every process it starts (the
# flags are part of a compilation's cache key): LLVM's own passes are skipped, which keep
# IEEE semantics (XLA compiles CPU code without fast-math); XLA's HLO passes, which decide
# fusion and so the rounding, run as always. Measured: the smoke run's losses the same bit
# for bit, compilations about 30% shorter (docs/design.md, the test suite's traps).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = DEVICES) -> str:
  """`XLA_FLAGS` for a test process with `devices` host CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"


def load_oracle(name: str) -> dict[str, np.ndarray]:
  """The arrays of `ORACLE_DIR / name` (".npz" optional) as a dict of numpy arrays.

  A missing file raises FileNotFoundError: the comparison with the release is
  the evidence, so its absence fails the test instead of skipping it.
  """
  path = ORACLE_DIR / (name if name.endswith(".npz") else name + ".npz")
  if not path.is_file():
    raise FileNotFoundError(f"oracle vector file {path} is missing from the checkout")
  with np.load(path) as data:
    return {k: np.asarray(data[k]) for k in data.files}


def assert_close(actual, expected, rtol=1e-5, atol=1e-4, rel_to_max=2e-6):
  """Elementwise float32 tolerance, plus a bound relative to the largest magnitude."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
  scale = max(np.abs(expected).max(), 1.0)
  assert np.abs(actual - expected).max() <= rel_to_max * scale


def release_float(value) -> float:
  """An oracle hyperparameter (stored as float32) as the Python float the release was given.

  The release passed Python floats such as 0.999; the file holds float32(0.999).
  Printing the float32 with its shortest repr gives back the original literal.
  """
  return float(str(np.float32(value)))


def load_config(name_or_path: str | os.PathLike, arg: str | None = None):
  """`get_config(arg)` of a config file, given its stem (`"default"`) or its path."""
  path = pathlib.Path(name_or_path)
  if path.suffix != ".py":
    path = CONFIG_DIR / f"{name_or_path}.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def module_command(module: str, args, *, cwd=ROOT, devices: int = DEVICES,
                   pythonpath: str | os.PathLike | None = ROOT, **kwargs) -> subprocess.Popen:
  """Starts `python -m module *args` with stdout and stderr merged into one text pipe.

  `pythonpath` (the checkout by default) is what the child imports `ovsw_jax`
  and `configs` from; `devices` host CPU devices are simulated (by default as
  many as in this process: a run the tests also train here then compiles to the
  same programs, which the suite's compilation cache holds, tests/conftest.py).
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  if pythonpath is not None:
    env["PYTHONPATH"] = str(pythonpath)
  return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def signalled_after(train_batches, count: int, signum: int):
  """A `Task.train_batches` to patch in: sends this process `signum` once `count`
  batches were read, as a preemption mid-run would."""
  def batches(self, **kwargs):
    for i, batch in enumerate(train_batches(self, **kwargs)):
      if i == count:
        os.kill(os.getpid(), signum)
      yield batch
  return batches


def final_state(config, workdir):
  """The train state of `workdir`'s newest checkpoint of `config`'s run."""
  from ovsw_jax.trainer import checkpointing, train  # pylint: disable=g-import-not-at-top
  manager = checkpointing.create_manager(f"{workdir}/checkpoints")
  return checkpointing.restore_latest(manager, train.setup(config).initial_state)


def fake_stdlib(folder, n=40):
  """A `Lib` folder: n modules, a test module, a non-Python file and a subpackage."""
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    (folder / f"mod{i:02d}.py").write_text(
        f'"""Module {i}."""\n\n' + "".join(f"def f{j}(x):\n    return x * {i} + {j}\n"
                                         for j in range(i % 7 + 1)))
  (folder / "test_me.py").write_text("assert False\n")
  (folder / "notes.txt").write_text("not python\n")
  (folder / "pkg").mkdir(exist_ok=True)
  (folder / "pkg" / "inner.py").write_text("x = 1\n")
  return folder


def take(iterator, n: int) -> list:
  """The first `n` items of `iterator`, which is then closed (its data workers stop)."""
  out = [next(iterator) for _ in range(n)]
  iterator.close()
  return out


def assert_batch_equal(x: dict, y: dict) -> None:
  """Same keys, dtypes, shapes and values, bit for bit (signed zeros, NaNs)."""
  assert x.keys() == y.keys()
  for k in x:
    assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
    np.testing.assert_array_equal(x[k], y[k])
    assert np.asarray(x[k]).tobytes() == np.asarray(y[k]).tobytes(), k
