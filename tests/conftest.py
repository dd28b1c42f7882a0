"""Test set-up: 4 CPU devices, so the pmap and jit paths split batches as on a multi-GPU host;
XLA's backend optimisation level 0 (`helpers.XLA_TEST_FLAGS`: the same numbers, shorter
compilations); one compilation cache for the whole session, shared with the processes
the tests start.

The cache (jax's persistent compilation cache, in a fresh folder removed at the end)
only skips compiling again what an earlier test or process already compiled: the
executable, and so every number, is the one a compilation gives. It has no size
limit: with one, jax scans every entry of the folder on every write (its LRU
eviction), and the suite's thousands of entries made that scan most of the
suite's time (docs/design.md). Without one, jax neither locks nor evicts: a process
that reads an entry another is still writing gets a truncated file, which jax
reports as a warning and compiles instead (the same executable); `PYTHONWARNINGS`
keeps that warning out of the output the tests read.
"""

import atexit
import os
import shutil
import tempfile

import pytest

import helpers  # tests/ is on the path of its own conftest

os.environ.setdefault("XLA_FLAGS", helpers.xla_flags())  # 4 devices, optimisation level 0
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ovsw-jax-test-compilation-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = "-1"  # no eviction: no scan, no lock
# A truncated read of an entry being written: compiled instead (same executable), not shown.
os.environ.setdefault("PYTHONWARNINGS", "ignore:Error reading persistent compilation cache entry")


# Module fixtures that train a run (or build a wheel) for the tests that read it: every test
# that uses one is slow, however quick its own body (`-m "not slow"` is the quick loop).
TRAINING_FIXTURES = {"digits_run", "trained_run", "trained_export", "store", "wheel",
                     "straight", "trained", "study", "resumed_run"}


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
  """`(config, workdir, result)`: the embedded default's recipe with a small binary ResNet,
  100 steps (still in warm-up), evaluated once at the end; checkpoints and events written.

  Trained once per worker for every test that reads a briefly trained digits run
  (test_train, test_export).
  """
  from helpers import load_config  # pylint: disable=g-import-not-at-top
  from ovsw_jax.trainer import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("digits_run")
  config = load_config("default", "")
  config.model_kwargs.widths = (16, 32)
  config.model_kwargs.blocks_per_stage = 1
  config.num_train_steps = 100
  config.eval_every_epochs = 100  # evaluate once, at the end
  return config, workdir, train.train_and_evaluate(config, str(workdir))


# The files that take longest (worker seconds in `pytest --durations`), longest first. The
# suite runs on 3 workers one file at a time in collection order (README: `--dist loadfile
# --no-loadscope-reorder`; xdist's own reorder puts the files with the fewest tests, often
# the slowest, last): these start first so that no worker ends long after the others.
# A stale list costs balance, never a test.
LONGEST_FIRST = ("test_multihost_faults.py", "test_train.py", "test_multihost.py",
                 "test_reliability.py", "test_config_checks.py", "test_layers.py",
                 "test_export.py", "test_main.py", "test_packaging.py", "test_repro.py",
                 "test_ovsw_chain.py", "test_parallelism.py", "test_object_store.py",
                 "test_language_model.py", "test_tasks.py")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
