"""Test set-up: 4 CPU devices, so the pmap and jit paths split batches as on a multi-GPU host;
one compilation cache for the whole session, shared with the processes the tests start.

The cache (jax's persistent compilation cache, in a fresh folder removed at the end)
only skips compiling again what an earlier test or process already compiled: the
executable, and so every number, is the one a compilation gives. With a size limit
set, jax takes a file lock around each read and write, so the several processes of
one test never read an entry half written.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="ovsw-jax-test-compilation-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)  # bytes: enables the file lock


# Module fixtures that train a run (or build a wheel) for the tests that read it: every test
# that uses one is slow, however quick its own body (`-m "not slow"` is the quick loop).
TRAINING_FIXTURES = {"trained_run", "trained_export", "store", "wheel", "straight", "trained",
                     "study", "resumed_run"}


def pytest_collection_modifyitems(config, items):
  import pytest  # pylint: disable=g-import-not-at-top
  for item in items:
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)
